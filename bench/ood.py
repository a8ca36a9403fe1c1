"""Out-of-distribution gate benchmark: how often the bundle refuses what is not dermoscopy
(higher is better) and dermoscopy (lower is better), per source. Prints one JSON object on
stdout, a short table on stderr.

    .venv/bin/python bench/ood.py [--model BUNDLE] [--images N] [--per-source N] > bench/ood_results.json

- Everyday (non-skin) images: every sample photo of scikit-image, scikit-learn and matplotlib,
  200 LFW faces, blank frames and pages of text (dermsight.evaluation.ood_images). A blank frame
  is refused when it is loaded (ImageError), before the gate: counted as refused, reason "blank".
- Ordinary close-up photos of moles: Derm7pt's clinical photos of its published valid split
  (cases no detector was fitted on), as taken and, 50 of them, as re-takes (crop, 128 px, heavy
  JPEG, phone colour), and 150 of its train split (the photo detector's training photos).
- Dermoscopy, by the shipped gate, images the photo detector was not fitted on: a random sample
  (--images, default 200; twice that of SIIM-ISIC 2020 test_128, 128 px images no fit used) of HAM10000, Derm7pt, the isic2017
  archive, ISIC 2020 train_extra (320 px) and train_sample (512 px, all 203), isic9 (squashed),
  and 128 px / squashed re-takes of 50 HAM10000 and 50 Derm7pt images.
- The detector's ROC AUC: each dermoscopy set against the held-out clinical photos. And the
  detector held out by source (scripts/fit_photo_detector.py's sample, refitted here): each
  dermoscopy source family scored by a regression that never saw it, with a threshold set on the others.
- CPU per image: the photo detector (its network + regression) against the scoring pass (ONNX
  Runtime, every view) on the same batch of 64 test_128 images (process time, all threads).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def refused_share(table: pd.DataFrame) -> dict:
    refused = int((~table["looks_dermoscopic"].astype(bool)).sum())
    return {"images": int(len(table)), "refused": refused, "refused_rate": refused / max(1, len(table))}


def predict_bytes(predictor, images: list[bytes]) -> tuple[np.ndarray, list[str]]:
    """(accepted per image, reason per image: "" / "gate" / "blank" or the load error)."""
    from dermsight.imaging.decode import ImageError

    accepted, reasons = [], []
    for start in range(0, len(images), 32):
        chunk = images[start : start + 32]
        try:
            _, scores, _ = predictor.predict_images(chunk, pd.DataFrame({"age": [None] * len(chunk)}))
            ok = scores.looks_dermoscopic.tolist()
            accepted += ok
            reasons += ["" if a else "gate" for a in ok]
        except ImageError:  # one image of the chunk is unusable: score them one by one
            for data in chunk:
                try:
                    _, scores, _ = predictor.predict_images([data], pd.DataFrame({"age": [None]}))
                    accepted.append(bool(scores.looks_dermoscopic[0]))
                    reasons.append("" if accepted[-1] else "gate")
                except ImageError as err:
                    accepted.append(False)
                    reasons.append("blank" if "blank" in str(err) else str(err))
    return np.asarray(accepted, bool), reasons


def detector_auc(predictor, dermoscopy: dict[str, list[str]], photos: list[str]) -> dict:
    """ROC AUC of the shipped detector's probability: each dermoscopy set against the held-out
    clinical photos (both never fitted on)."""
    from sklearn.metrics import roc_auc_score

    from dermsight.training.photo_gate import image_photo_features

    prep, detector = predictor.bundle.preprocessing, predictor.ood_gate.photo
    photo = detector.probability_of(image_photo_features(photos, prep, detector.network)[0])
    scores = {name: detector.probability_of(image_photo_features(refs, prep, detector.network)[0]) for name, refs in dermoscopy.items()}
    scores["all"] = np.concatenate(list(scores.values()))
    return {name: roc_auc_score(np.r_[np.zeros(len(x)), np.ones(len(photo))], np.r_[x, photo]) for name, x in scores.items()}


def held_out_by_source(data: Path, per_source: int, prep, network) -> dict:
    """scripts/fit_photo_detector.py's sample and settings, each dermoscopy source family scored
    by a regression (on the shipped detector's network) fitted without it."""
    from dermsight.training.photo_gate import gate_images, image_photo_features, shared_dermoscopy, source_held_out

    items, frame = gate_images(shared_dermoscopy(data, per_source), [data / "derm7pt"])
    features, rows = image_photo_features(items, prep, network)
    return source_held_out(features, frame.iloc[rows].reset_index(drop=True))


def cpu_cost(predictor, data: Path) -> dict:
    """CPU seconds per image of the photo detector and of the scoring pass on 64 test_128 images."""
    from dermsight.imaging.batches import iter_batches

    refs = sorted((data / "isic2020" / "test_128").glob("*.jpg"))[:64]
    # iter_batches ramps up (4, 8, 16, ... images): join its batches into the one batch of 64
    batches = list(iter_batches([str(r) for r in refs], predictor.bundle.preprocessing, 64, views=predictor.bundle.views))
    images = np.concatenate([batch.images for batch in batches], axis=1)
    n_images = images.shape[1]
    metadata = np.zeros((n_images, len(predictor.bundle.metadata_features)), np.float32)
    predictor.score_views(images, metadata)  # warm up
    timings = {"scoring_pass": [], "photo_detector": []}
    for _ in range(3):
        start = time.process_time()
        predictor.score_views(images, metadata)
        timings["scoring_pass"].append(time.process_time() - start)
        start = time.process_time()
        predictor.ood_gate.photo.probability(images[0])
        timings["photo_detector"].append(time.process_time() - start)
    per_image = {k: 1000 * min(v) / n_images for k, v in timings.items()}
    return {
        "images": n_images, "views": len(predictor.bundle.views),
        "scoring_pass_ms_per_image": per_image["scoring_pass"], "photo_detector_ms_per_image": per_image["photo_detector"],
        "photo_detector_share_of_scoring_pass": per_image["photo_detector"] / per_image["scoring_pass"],
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: bundles/default).")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets")))
    parser.add_argument("--images", type=int, default=200, help="Dermoscopy images per source (default 200).")
    parser.add_argument("--per-source", type=int, default=300, help="Dermoscopy per source in the held-out refit (default 300).")
    args = parser.parse_args()

    from dermsight.data.inputs import records_from_inputs
    from dermsight.data.readers import derm7pt_clinical_photos
    from dermsight.data.sources import read_source
    from dermsight.evaluation.ood_images import acquisition_variant, non_dermoscopic_images
    from dermsight.inference.predictor import Predictor
    from dermsight.training.photo_gate import shared_dermoscopy

    predictor = Predictor(args.model)
    if predictor.ood_gate is None or predictor.ood_gate.photo is None:
        sys.exit(f"{predictor.bundle.path} has no photo detector: fit one with scripts/fit_photo_detector.py")
    rng = np.random.default_rng(0)
    result: dict = {
        "bundle": predictor.bundle.name, "distance_threshold": predictor.ood_gate.threshold,
        "photo_threshold": predictor.ood_gate.photo.threshold, "everyday": {},
    }

    images = non_dermoscopic_images()
    accepted, reasons = predict_bytes(predictor, [data for _, _, data in images])
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, (category, _, _) in enumerate(images):
        by_category[category].append(i)
    for category, rows in by_category.items():
        result["everyday"][category] = {
            "images": len(rows), "refused": int((~accepted[rows]).sum()), "refused_rate": float(np.mean(~accepted[rows])),
            "accepted": [images[i][1] for i in rows if accepted[i]],
            "refused_at_loading": sum(reasons[i] not in ("", "gate") for i in rows),
        }
    result["everyday_refused_rate"] = float(np.mean(~accepted))

    result["clinical_photos"] = {}
    photo_splits = {split: derm7pt_clinical_photos(args.data / "derm7pt", split=split) for split in ("valid", "train")}
    for split, name in (("valid", "valid split (cases never fitted on)"), ("train", "train split, 150 (the detector's photos)")):
        photos = photo_splits[split] if split == "valid" else photo_splits[split].sample(150, random_state=0)
        records = pd.DataFrame({"image_id": photos["image_id"], "image_ref": photos["clinical_ref"], "patient_id": None,
                                "age": None, "sex": None, "site": None, "patient_images": None})
        table, _ = predictor.predict_records(records, progress=False, cache=None)
        result["clinical_photos"][name] = refused_share(table)
    valid_refs = photo_splits["valid"]["clinical_ref"].tolist()
    for how in ("crop", "rescale", "jpeg", "phone"):
        retaken, _ = predict_bytes(predictor, [acquisition_variant(Path(r).read_bytes(), how, rng) for r in valid_refs[:50]])
        result["clinical_photos"][f"valid split, re-taken: {how}"] = {
            "images": len(retaken), "refused": int((~retaken).sum()), "refused_rate": float(np.mean(~retaken)),
        }

    result["dermoscopy"] = {}
    # Only images the shipped detector was not fitted on (scripts/fit_photo_detector.py's default sample).
    fitted = set(shared_dermoscopy(args.data, args.per_source)["image_ref"])
    test_128, _ = records_from_inputs([str(args.data / "isic2020" / "test_128")])
    sets = {"isic2020 test_128 (128 px, no fit used it)": test_128.sample(2 * args.images, random_state=0)}
    for name, spec in (("HAM10000", "ham10000"), ("Derm7pt dermoscopy", "derm7pt"), ("isic2017 archive", "isic2017"),
                       ("ISIC 2020 train_extra (320 px)", "isic2020/train_extra.csv"),
                       ("ISIC 2020 train_sample (512 px)", "isic2020/train_sample.csv"), ("isic9 (squashed)", "isic9/train")):
        records = read_source(str(args.data / spec)).records
        records = records[records["image_ref"].notna() & ~records["image_ref"].isin(fitted)]
        if len(records):  # all 203 train_sample images are in the detector's fit
            sets[name] = records.sample(min(args.images, len(records)), random_state=0)
    for name, records in sets.items():
        table, _ = predictor.predict_records(records, progress=False, cache=None)
        result["dermoscopy"][name] = refused_share(table)
    for name, records in (("HAM10000", sets["HAM10000"].head(50)), ("Derm7pt", sets["Derm7pt dermoscopy"].head(50))):
        for how in ("rescale", "squash"):
            retaken, _ = predict_bytes(predictor, [acquisition_variant(Path(r).read_bytes(), how, rng) for r in records["image_ref"]])
            result["dermoscopy"][f"{name} re-taken: {'128 px' if how == 'rescale' else 'squashed 180x180'}"] = {
                "images": len(retaken), "refused": int((~retaken).sum()), "refused_rate": float(np.mean(~retaken)),
            }

    result["detector_roc_auc"] = detector_auc(predictor, {k: v["image_ref"].tolist() for k, v in sets.items()}, valid_refs)
    result["dermoscopy_refused_source_held_out"] = held_out_by_source(
        args.data, args.per_source, predictor.bundle.preprocessing, predictor.ood_gate.photo.network
    )
    result["cpu"] = cpu_cost(predictor, args.data)

    print(json.dumps(result, indent=1))
    table = functools.partial(print, file=sys.stderr)
    table(f"\n{'set':58} {'images':>7} {'refused':>8} {'rate':>7}")
    for group in ("everyday", "clinical_photos", "dermoscopy"):
        for name, row in result[group].items():
            table(f"{group + ': ' + name:58.58} {row['images']:7d} {row['refused']:8d} {row['refused_rate']:7.1%}")
    for name, row in result["dermoscopy_refused_source_held_out"].items():
        table(f"{'detector without this source: ' + name:58.58} {row['images']:7d} {'':8} {row['refused']:7.1%}")
    table(f"detector ROC AUC vs held-out photos: {json.dumps({k: round(v, 4) for k, v in result['detector_roc_auc'].items()})}")
    cpu = result["cpu"]
    table(f"CPU per image: detector {cpu['photo_detector_ms_per_image']:.2f} ms, scoring pass {cpu['scoring_pass_ms_per_image']:.2f} ms "
          f"({cpu['photo_detector_share_of_scoring_pass']:.1%})")


if __name__ == "__main__":
    main()
