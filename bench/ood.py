"""Out-of-distribution gate benchmark: how often the bundle refuses real non-skin images
(rejection rate, higher is better) and real dermoscopic ones (false rejection, lower is
better). Prints one JSON object on stdout, a short table on stderr.

    .venv/bin/python bench/ood.py [--model BUNDLE] [--ham N]

Non-skin: every sample photo of scikit-image, scikit-learn and matplotlib, 200 LFW faces,
blank frames and pages of text (dermsight.evaluation.ood_images). Ordinary close-up photos
of moles, the commonest wrong input: Derm7pt's clinical photos, its published valid split
(never used by any gate) and train split (the gate's negatives when the bundle was trained
with --gate-negatives). Dermoscopy: all 5,545 SIIM-ISIC 2020 test_128 images (never used in
training, downsampled to 128 px), every image of Derm7pt, the ISIC 2017-era archive export,
ISIC 2020 train_extra and isic9, and a random sample of HAM10000 (the gate's threshold is a
held-out 99th percentile, so about 1% is expected on images like its training ones).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: bundles/default).")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets")))
    parser.add_argument("--ham", type=int, default=2000, help="HAM10000 images to sample (default 2000).")
    args = parser.parse_args()

    from dermsight.data.readers import derm7pt_clinical_photos, read_ham10000
    from dermsight.data.sources import read_source
    from dermsight.evaluation.ood_images import non_dermoscopic_images
    from dermsight.data.inputs import records_from_inputs
    from dermsight.inference.predictor import Predictor

    predictor = Predictor(args.model)
    result: dict = {"bundle": predictor.bundle.name, "threshold": predictor.ood_gate.threshold, "non_dermoscopic": {}}

    images = non_dermoscopic_images()
    refused: dict[str, list[str]] = defaultdict(list)
    accepted: dict[str, list[str]] = defaultdict(list)
    for start in range(0, len(images), 32):
        chunk = images[start : start + 32]
        _, scores, _ = predictor.predict_images([data for _, _, data in chunk], pd.DataFrame({"age": [None] * len(chunk)}))
        for (category, name, _), ok in zip(chunk, scores.looks_dermoscopic):
            (accepted if ok else refused)[category].append(name)
    for category in dict.fromkeys(c for c, _, _ in images):
        n = len(refused[category]) + len(accepted[category])
        result["non_dermoscopic"][category] = {
            "images": n, "rejected": len(refused[category]), "rejection_rate": len(refused[category]) / n,
            "accepted": accepted[category],
        }
    total = len(images)
    result["non_dermoscopic_rejection_rate"] = sum(len(v) for v in refused.values()) / total

    result["clinical_photos"] = {}
    for split, name in (("valid", "Derm7pt clinical photos, valid split (held out)"),
                        ("train", "Derm7pt clinical photos, train split (gate negatives if trained with them)")):
        photos = derm7pt_clinical_photos(args.data / "derm7pt", split=split)
        records = pd.DataFrame({"image_id": photos["image_id"], "image_ref": photos["clinical_ref"], "patient_id": None,
                                "age": None, "sex": None, "site": None, "patient_images": None})
        table, _ = predictor.predict_records(records, progress=False, cache=None)
        rejected = int((~table["looks_dermoscopic"].astype(bool)).sum())
        result["clinical_photos"][name] = {"images": len(table), "rejected": rejected, "rejection_rate": rejected / len(table)}

    result["dermoscopic"] = {}
    test_128, _ = records_from_inputs([str(args.data / "isic2020" / "test_128")])
    ham = read_ham10000(args.data / "ham10000").records.sample(args.ham, random_state=0)
    sets = [("isic2020 test_128 (unseen)", test_128), ("HAM10000 sample", ham)]
    for name, spec in (("Derm7pt dermoscopy", "derm7pt"), ("isic2017 archive export", "isic2017"),
                       ("isic2020 train_extra", "isic2020/train_extra.csv"), ("isic9", "isic9/train")):
        sets.append((name, read_source(str(args.data / spec)).records))
    for name, records in sets:
        table, errors = predictor.predict_records(records[records["image_ref"].notna()], progress=False)
        rejected = int((~table["looks_dermoscopic"].astype(bool)).sum())
        result["dermoscopic"][name] = {"images": len(table), "rejected": rejected, "false_rejection_rate": rejected / len(table)}

    print(json.dumps(result, indent=1))
    table = functools.partial(print, file=sys.stderr)
    table(f"\n{'set':45} {'images':>7} {'refused':>8} {'rate':>7}")
    for category, row in result["non_dermoscopic"].items():
        table(f"{'non-skin: ' + category:45} {row['images']:7d} {row['rejected']:8d} {row['rejection_rate']:7.1%}")
    for name, row in result["clinical_photos"].items():
        table(f"{'photo: ' + name[:38]:45} {row['images']:7d} {row['rejected']:8d} {row['rejection_rate']:7.1%}")
    for name, row in result["dermoscopic"].items():
        table(f"{'dermoscopy: ' + name:45} {row['images']:7d} {row['rejected']:8d} {row['false_rejection_rate']:7.1%}")


if __name__ == "__main__":
    main()
