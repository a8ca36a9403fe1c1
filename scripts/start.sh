#!/usr/bin/env bash
# The main job on a fresh machine: install, look at the shared data, score the real
# multi-image patients of ISIC 2020 with the committed bundle, then serve the web app
# on http://127.0.0.1:8000 (dev mode: loopback only, no API key). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
D=$DERMSIGHT_DATA
SOURCES=("$D/ham10000" "$D/isic9/train" "$D/isic2020" "$D/isic2019" "$D/isic2017" "$D/derm7pt")
.venv/bin/dermsight data summary "${SOURCES[@]}"
# the default bundle's folds: HAM10000 in grouped folds, every other dermoscopy source left out whole in one
.venv/bin/dermsight data build "${SOURCES[@]}" --folds 4 --source-folds --output runs/manifest.csv
.venv/bin/dermsight predict "$D/isic2020/test_128" --output runs/test_128_predictions.csv
exec .venv/bin/dermsight serve --dev --host 127.0.0.1 --port "${PORT:-8000}"
