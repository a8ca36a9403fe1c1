#!/usr/bin/env bash
# The test suite: install (quick when already installed), the system packages, the import layers
# (lint-imports), then pytest on the real shared data.
# `scripts/test.sh --slow` also runs the slow end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/system_deps.sh  # Chromium, PostgreSQL and Java; with CI=true, missing ones fail the run
# axe-core (pinned in tests/js/package-lock.json), which the browser tests inject into every page.
[ -f tests/js/node_modules/axe-core/axe.min.js ] || npm ci --prefix tests/js --no-audit --no-fund >/dev/null
source scripts/env.sh
.venv/bin/lint-imports  # the one-way layers ([tool.importlinter] in pyproject.toml)
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/pytest -n 2 -m "" "$@"; fi
exec .venv/bin/pytest -n 2 -m "not slow" "$@"
