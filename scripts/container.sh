#!/usr/bin/env bash
# DermSight's OCI image (the Dockerfile at the repository root) with podman, no daemon:
#   scripts/container.sh build           build it as $IMAGE (default localhost/dermsight:latest)
#   scripts/container.sh run [ARGS...]   run it on http://127.0.0.1:$PORT (default 8000), data in the
#                                        volume $VOLUME (default dermsight-data); ARGS go to `dermsight serve`
#   scripts/container.sh smoke           the smoke test (tests/test_container.py)
# Installs podman, runc and debootstrap with apt-get where missing (when root), as scripts/system_deps.sh
# does for Chromium, PostgreSQL and Java. No registry is reachable here, so when the Dockerfile's FROM
# image is absent, `build` makes it: Debian bookworm from apt's configured mirror (debootstrap minbase,
# trimmed like the official -slim image) named as the FROM line names it. A real site pulls that image.
# Outside CI a missing tool is a warning and exit 3 (the smoke test skips); with CI=true, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/dermsight:latest}
PORT=${PORT:-8000}
VOLUME=${VOLUME:-dermsight-data}
APT_GET=${APT_GET:-apt-get}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# This sandbox's podman settings (runc, ulimits it can hold); a normal host can point elsewhere.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/containers.conf}
BASE=$(awk 'toupper($1) == "FROM" { print $2; exit }' Dockerfile)
case $BASE in */*) BASE_REF=$BASE ;; *) BASE_REF=docker.io/library/$BASE ;; esac
TOOLS=(podman runc debootstrap)
PACKAGES=(podman buildah runc debootstrap fuse-overlayfs slirp4netns uidmap containernetworking-plugins iptables)

missing_tools() {
  missing=()
  for tool in "${TOOLS[@]}"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
}

install_tools() {
  missing_tools
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ]; then
    ("$APT_GET" update -qq && DEBIAN_FRONTEND=noninteractive "$APT_GET" install -y -qq --no-install-recommends \
      "${PACKAGES[@]}") >/dev/null || echo "apt-get could not install ${PACKAGES[*]}" >&2
    missing_tools
    [ ${#missing[@]} -gt 0 ] || return 0
  else
    echo "not root: cannot apt-get install ${missing[*]}" >&2
  fi
  case "${CI:-}" in
    true | TRUE | True | 1)
      echo "error: CI=true and ${missing[*]} not installed: the container smoke test must run in CI" >&2
      exit 1 ;;
  esac
  echo "warning: ${missing[*]} not installed; the container cannot be built (with CI=true this is an error)" >&2
  exit 3
}

# The first URI of apt's configured Debian mirror (deb822 .sources or one-line .list files).
debian_mirror() {
  { sed -n -e 's/^URIs: *\([^ ]*\).*/\1/p' -e 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' \
      /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null || true; } \
    | { grep -v -- '-security' || true; } | head -n1
}

# The FROM image, made locally when absent: debootstrap minbase of bookworm, then what the official
# -slim image leaves out (documentation, manuals, locales: dpkg's path-exclude keeps them out of later
# installs too) and apt's lists, imported and named like the FROM line.
build_base() {
  podman image exists "$BASE_REF" && return 0
  local mirror rootfs started
  mirror=$(debian_mirror)
  if [ -z "$mirror" ]; then
    echo "error: no Debian mirror in /etc/apt/sources.list*; cannot debootstrap $BASE" >&2
    exit 1
  fi
  rootfs=$(mktemp -d /var/tmp/dermsight-base.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  started=$SECONDS
  echo "building $BASE_REF: debootstrap --variant=minbase bookworm from $mirror" >&2
  nice -n 10 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    cp /etc/apt/sources.list.d/*.sources "$rootfs/etc/apt/sources.list.d/" && rm -f "$rootfs/etc/apt/sources.list"
  fi
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale,lintian}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  tar -C "$rootfs" -c . | podman import --quiet - "$BASE_REF" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "built $BASE_REF in $((SECONDS - started)) s" >&2
}

build() {
  install_tools
  build_base
  local started=$SECONDS
  # --network=host and this machine's CA bundle (for pip: PyPI through this machine's proxy); the
  # docker format keeps the HEALTHCHECK (OCI's has none).
  nice -n 10 podman build --format docker --network=host \
    -v "$CA_BUNDLE:/run/host-ca-bundle.crt:ro" --build-arg CA_BUNDLE=/run/host-ca-bundle.crt \
    -t "$IMAGE" "$@" .
  echo "built $IMAGE in $((SECONDS - started)) s" >&2
}

run() {
  install_tools
  podman image exists "$IMAGE" || build
  podman rm -f -t0 dermsight >/dev/null 2>&1 || true
  podman run -d --name dermsight -p "127.0.0.1:$PORT:8000" -v "$VOLUME:/data" \
    ${DERMSIGHT_DATABASE_URL:+-e DERMSIGHT_DATABASE_URL} ${DERMSIGHT_SITE:+-e DERMSIGHT_SITE} "$IMAGE" \
    serve --host 0.0.0.0 --port 8000 "$@" >/dev/null
  local deadline=$((SECONDS + 60))
  until curl -fsS "http://127.0.0.1:$PORT/api/health" >/dev/null 2>&1; do
    if [ "$(podman inspect -f '{{.State.Running}}' dermsight)" != true ]; then
      podman logs dermsight >&2
      echo "error: the container stopped. No API key yet? podman run --rm -v $VOLUME:/data $IMAGE keys create NAME" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "error: no answer from /api/health within 60 s; see podman logs dermsight" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "DermSight on http://127.0.0.1:$PORT (container dermsight, volume $VOLUME); stop: podman rm -f -t0 dermsight"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  smoke) install_tools; shift; exec .venv/bin/pytest -p no:cacheprovider -n 0 -m "" tests/test_container.py "$@" ;;
  *) echo "usage: $0 build [PODMAN BUILD ARGS] | run [SERVE ARGS] | smoke [PYTEST ARGS]" >&2; exit 2 ;;
esac
