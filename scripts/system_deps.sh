#!/usr/bin/env bash
# The system packages some tests drive: Debian's Chromium for the browser tests (Playwright never
# downloads a browser here), PostgreSQL for the storage tests (a throwaway cluster) and Java 17 for
# the Spark engine's tests (PySpark starts a JVM). Installs the missing ones with apt-get when root.
# One still missing afterwards: outside CI a warning (its tests skip); in CI (CI=true) an error, so
# a run that could not test the browser, PostgreSQL or Spark fails.
# CHROMIUM, INITDB_GLOB, JAVA and APT_GET can be overridden (tests/test_system_deps.py does).
set -euo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
INITDB_GLOB=${INITDB_GLOB:-/usr/lib/postgresql/*/bin/initdb}
APT_GET=${APT_GET:-apt-get}

# The java PySpark starts: $JAVA (when set), else $JAVA_HOME/bin/java, else java on PATH (where
# Debian's openjdk-17-jre-headless puts it).
find_java() {
  if [ -n "${JAVA:-}" ]; then java=$JAVA
  elif [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then java=$JAVA_HOME/bin/java
  else java=$(command -v java || true); fi
}

find_missing() {
  missing=()
  [ -x "$CHROMIUM" ] || missing+=(chromium)
  compgen -G "$INITDB_GLOB" >/dev/null || missing+=(postgresql)
  find_java
  { [ -n "$java" ] && [ -x "$java" ]; } || missing+=(openjdk-17-jre-headless)
}

find_missing
[ ${#missing[@]} -gt 0 ] || exit 0
if [ "$(id -u)" = 0 ]; then
  ("$APT_GET" update -qq && DEBIAN_FRONTEND=noninteractive "$APT_GET" install -y -qq "${missing[@]}") >/dev/null \
    || echo "apt-get could not install ${missing[*]}" >&2
  find_missing
  [ ${#missing[@]} -gt 0 ] || exit 0
else
  echo "not root: cannot apt-get install ${missing[*]}" >&2
fi
case "${CI:-}" in
  true | TRUE | True | 1)
    echo "error: CI=true and ${missing[*]} not installed (want $CHROMIUM, $INITDB_GLOB and ${java:-java on PATH}):" \
      "the browser, PostgreSQL and Spark tests must run in CI" >&2
    exit 1 ;;
esac
echo "warning: ${missing[*]} not installed; their tests will be skipped (with CI=true this is an error)" >&2
