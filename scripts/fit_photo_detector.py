"""Refit the gate's photo detector (dermoscopy or an ordinary photo?) into a bundle.

    .venv/bin/python scripts/fit_photo_detector.py [--model bundles/default] [--per-source 300]

Reads the shared datasets ($DERMSIGHT_DATA), exports the detector's network (ImageNet
EfficientNet-Lite0, first five stages, into the gate file), fits its logistic regression
(dermsight.training.photo_gate), rewrites the bundle's ood_gate.npz (the distance part is kept)
and prints the held-out validation as JSON: ~5 minutes of CPU for ~3,900 images. With
--distance-gate the distance part is refitted first, on the network's gate features of the
same dermoscopy sample (each source family a fold).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dermsight.models.bundle import load_bundle
from dermsight.training.photo_gate import fit_photo_gate, refit_distance_gate, shared_dermoscopy

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: bundles/default).")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets")))
    parser.add_argument("--per-source", type=int, default=300, help="Dermoscopy images per source (default 300).")
    parser.add_argument("--max-false-rejection", type=float, default=0.01, help="Share of held-out dermoscopy refused (default 0.01).")
    parser.add_argument("--distance-gate", action="store_true", help="Also refit the gate's distance part (runs the network on the sample).")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    dermoscopy = shared_dermoscopy(args.data, args.per_source)
    if args.distance_gate:
        print(json.dumps({"distance_gate": refit_distance_gate(bundle, dermoscopy)}), flush=True)
    validation = fit_photo_gate(bundle, dermoscopy, [args.data / "derm7pt"], args.max_false_rejection)
    print(json.dumps(validation, indent=1))


if __name__ == "__main__":
    main()
