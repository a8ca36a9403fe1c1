"""Frozen ImageNet features with a linear head, alone and stacked with the fine-tuned fold networks,
on sources left out whole.

    python bench/frozen_heads.py FINETUNED_BUNDLE FROZEN_BUNDLE [FROZEN_BUNDLE ...] > bench/frozen_heads_results.json

FROZEN_BUNDLE is an embed-mode bundle trained on the same sources with the same leave-one-source-out
folds (`dermsight train ... --mode embed --folds 4 --source-folds`, see README "Levers"): its
out_of_fold.csv.gz holds, for every image, the melanoma probability of the linear head fitted without
that image's source (HAM10000: without its lesion's fold). The folds must match the fine-tuned
bundle's image by image; the script stops otherwise. Per source: melanoma AUC and specificity at the
source's own 90%-sensitivity threshold of

- the fine-tuned fold networks' out-of-fold predictions (the shipped bundle's);
- each frozen head's;
- the stack "logit mean": the mean of the two melanoma logits, equal weights fixed beforehand (no
  weight is fitted, so nothing is tuned on the held-out source; a single image can be scored so);
- the stack "rank mean": the mean of the two within-source percentile ranks (needs the whole batch
  of a source; an upper reference for what a fixed-weight combination of the two can do).

Each stack's AUC gain over the fine-tuned networks comes with a 95% paired bootstrap interval
(images resampled within the source, N_BOOT times). Cost: each bundle's CPU seconds per image
(process time of its ONNX graph over its views, CPU_IMAGES isic2017 images, batch 32; on a shared
machine, with the load average recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logit
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from dermsight.evaluation.held_out import SOURCE_NAMES, load_out_of_fold
from dermsight.evaluation.robustness import decode_all
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import Bundle, load_bundle
from dermsight.models.metadata import encode_metadata

N_BOOT = 1000
EPS = 1e-6
CPU_IMAGES = 128
DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def specificity_at(y: np.ndarray, score: np.ndarray, sensitivity: float = 0.9) -> float:
    """Specificity at the highest threshold reaching `sensitivity` on these images."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(1 - fpr[np.argmax(tpr >= sensitivity)])


def melanoma_logit(probability: np.ndarray) -> np.ndarray:
    return logit(np.clip(probability, EPS, 1 - EPS))


def joined(finetuned: pd.DataFrame, frozen: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per image: source, truth, fold and each model's melanoma probability."""
    table = finetuned[["image_id", "source", "diagnosis", "fold", "MEL"]].rename(columns={"MEL": "finetuned"})
    for name, oof in frozen.items():
        other = oof.set_index("image_id")
        missing = ~table["image_id"].isin(other.index)
        if missing.any():
            raise SystemExit(f"{name}: {int(missing.sum())} images of the fine-tuned bundle are not in its out-of-fold "
                             "table")
        folds = table["image_id"].map(other["fold"])
        if (folds != table["fold"]).any():
            moved = int((folds != table["fold"]).sum())
            raise SystemExit(f"{name}: {moved} images sit in another fold than in the fine-tuned bundle")
        table[name] = table["image_id"].map(other["MEL"]).to_numpy()
    return table


def paired_gain(y: np.ndarray, base: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> list[float]:
    """95% bootstrap interval of AUC(other) - AUC(base) over images resampled with replacement."""
    gains = []
    for _ in range(N_BOOT):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            gains.append(roc_auc_score(y[pick], other[pick]) - roc_auc_score(y[pick], base[pick]))
    return [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))]


def per_source(table: pd.DataFrame, frozen_names: list[str]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    order = sorted(table["source"].unique(), key=lambda s: (s == "ham10000", s))  # sources left out whole first
    for source in order:
        part = table[table["source"] == source]
        y = (part["diagnosis"] == "MEL").to_numpy().astype(int)
        base = part["finetuned"].to_numpy()
        scores = {"finetuned": base}
        for name in frozen_names:
            frozen = part[name].to_numpy()
            scores[name] = frozen
            scores[f"logit mean (finetuned, {name})"] = (melanoma_logit(base) + melanoma_logit(frozen)) / 2
            scores[f"rank mean (finetuned, {name})"] = (rankdata(base) + rankdata(frozen)) / 2
        entry = {"source": source, "name": SOURCE_NAMES.get(source, source),
                 "held_out": "grouped_cv" if source == "ham10000" else "left_out_source",
                 "images": int(len(part)), "melanomas": int(y.sum())}
        for label, score in scores.items():
            entry[label] = {"auc": float(roc_auc_score(y, score)), "specificity_at_90": specificity_at(y, score)}
            if label != "finetuned":
                entry[label]["auc_gain_ci95"] = paired_gain(y, base, score, rng)
        rows.append(entry)
    return rows


def cpu_per_image(bundle: Bundle) -> float:
    """Process seconds per image of the bundle's graph over its views (decode and resize excluded)."""
    predictor = Predictor(bundle)
    refs = sorted((DATA / "isic2017" / "images").glob("*.jpg"))[:CPU_IMAGES]
    images = np.stack([bundle.preprocessing.normalise(bundle.preprocessing.resize(rgb)) for rgb in decode_all(refs)])
    unknown = pd.DataFrame({"age": [None] * len(refs), "sex": None, "site": None})
    metadata = encode_metadata(unknown, bundle.metadata_features)
    predictor.score(images[:32], metadata[:32])  # warm-up
    began = time.process_time()
    for start in range(0, len(images), 32):
        predictor.score(images[start : start + 32], metadata[start : start + 32])
    return (time.process_time() - began) / len(images)


def main(finetuned_path: str, frozen_paths: list[str]) -> dict:
    finetuned = load_bundle(finetuned_path)
    frozen_bundles = {load_bundle(p).name: load_bundle(p) for p in frozen_paths}
    table = joined(load_out_of_fold(finetuned), {name: load_out_of_fold(b) for name, b in frozen_bundles.items()})
    return {
        "load_average": open("/proc/loadavg").read().split()[:3],
        "finetuned": {"name": finetuned.name, "training_seconds": finetuned.training.get("duration_seconds"),
                      "cpu_seconds_per_image": cpu_per_image(finetuned)},
        "frozen": {name: {"command": b.training.get("command"), "training_seconds": b.training.get("duration_seconds"),
                          "cpu_seconds_per_image": cpu_per_image(b)} for name, b in frozen_bundles.items()},
        "per_source": per_source(table, list(frozen_bundles)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="The fine-tuned ensemble bundle (bundles/default).")
    parser.add_argument("frozen", nargs="+", help="Embed-mode bundles on the same folds (see above).")
    args = parser.parse_args()
    print(json.dumps(main(args.bundle, args.frozen), indent=1))
