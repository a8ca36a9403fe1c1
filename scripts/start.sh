#!/usr/bin/env bash
# The main job on a fresh machine: install, then a working DermSight on the shared data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
D=$DERMSIGHT_DATA
.venv/bin/dermsight data summary "$D/ham10000" "$D/isic9/train" "$D/isic2020"
.venv/bin/dermsight data build "$D/ham10000" "$D/isic9/train" "$D/isic2020" "$D/isic2019" --output runs/manifest.csv
