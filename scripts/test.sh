#!/usr/bin/env bash
# The test suite: install (quick when already installed), then pytest on the real shared data.
# `scripts/test.sh --slow` also runs the slow end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The browser tests drive Debian's Chromium (Playwright never downloads a browser here);
# the storage tests also run against a throwaway PostgreSQL cluster.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
    || echo "warning: could not install ${missing[*]}; their tests will be skipped" >&2
fi
source scripts/env.sh
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/pytest -n 2 -m "" "$@"; fi
exec .venv/bin/pytest -n 2 -m "not slow" "$@"
