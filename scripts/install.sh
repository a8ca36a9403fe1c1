#!/usr/bin/env bash
# Create .venv (Python 3.11) and install DermSight with its training, test and scale-out (Ray, Spark) extras.
# torch/torchvision are pinned to the releases on this machine's disk (no multi-GB download).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
.venv/bin/pip install --quiet -e ".[train,dev,scale,spark]"
