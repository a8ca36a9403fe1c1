#!/usr/bin/env bash
# The test suite: install (quick when already installed), then pytest on the real shared data.
# `scripts/test.sh --slow` also runs the slow end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/pytest -n 2 -m "" "$@"; fi
exec .venv/bin/pytest -n 2 -m "not slow" "$@"
