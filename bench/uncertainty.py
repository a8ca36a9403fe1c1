"""Fit the level at which an ensemble bundle calls a result "unsure", and test what it means.

    .venv/bin/python bench/uncertainty.py [BUNDLE] [--per-source 400] [--write] > bench/uncertainty_results.json

The uncertainty is the spread (standard deviation) of the fold networks' calibrated melanoma
risks, the `risk_spread` column. The level is its 90th percentile over a source-balanced sample
of the shared labelled images (`--per-source` of each source), so about one result in ten of
the sources we have is called unsure. In that sample three of the four networks saw each
image, so on a new clinic's images, which none saw, spreads run larger and the level is
passed more often: the rule errs towards "unsure".

What "unsure" means is then measured with the one honest prediction each image has, that of
the network that never saw its source (or HAM10000 fold): its melanoma AUC, how often its
referral decision differs from the ensemble's, and how far its risk is from the ensemble's,
for the sure and the unsure images, per source and pooled.

`--write` stores the level in the bundle's bundle.json ("uncertainty"), which the Predictor
reads, and rewrites its model card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dermsight.data.dataset import deduplicate, load_sources
from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.evaluation.robustness import members_of
from dermsight.imaging.batches import iter_batches
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import load_bundle
from dermsight.models.metadata import encode_metadata
from dermsight.models.model_card import write_model_card

DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SOURCES = ["ham10000", "isic9/train", "isic2020", "isic2017", "derm7pt"]
LEVEL_QUANTILE = 0.90


def member_risks(predictor: Predictor, records: pd.DataFrame) -> tuple[np.ndarray, list[int]]:
    """(N, members) calibrated melanoma risks of each fold network (views averaged, as the
    Predictor scores), and the rows that could be read."""
    bundle = predictor.bundle
    metadata = encode_metadata(records, bundle.metadata_features)
    risks, rows = [], []
    for batch in iter_batches(records["image_ref"].tolist(), bundle.preprocessing, 32, views=bundle.views):
        if batch.indices:
            scores = predictor.score_views(batch.images, metadata[batch.indices])
            risks.append(scores.member_probabilities[:, :, predictor.melanoma_index])
            rows.extend(batch.indices)
    return np.concatenate(risks), rows


def summary(frame: pd.DataFrame, threshold: float) -> dict:
    def auc(part: pd.DataFrame) -> float | None:
        y = part["melanoma"].to_numpy()
        return round(float(roc_auc_score(y, part["held_out_risk"])), 3) if 0 < y.sum() < len(y) else None

    out = {"images": len(frame), "unsure_share": round(float(frame["unsure"].mean()), 3)}
    for name, part in (("sure", frame[~frame["unsure"]]), ("unsure", frame[frame["unsure"]])):
        flips = (part["held_out_risk"] >= threshold) != (part["ensemble_risk"] >= threshold)
        out[name] = {
            "images": len(part),
            "melanomas": int(part["melanoma"].sum()),
            "held_out_auc": auc(part),
            "referral_differs": round(float(flips.mean()), 3) if len(part) else None,
            "median_risk_difference": round(float((part["held_out_risk"] - part["ensemble_risk"]).abs().median()), 4)
            if len(part) else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=None)
    parser.add_argument("--per-source", type=int, default=400)
    parser.add_argument("--write", action="store_true", help="store the level in the bundle's bundle.json")
    args = parser.parse_args()
    predictor = Predictor(args.bundle)
    bundle = predictor.bundle
    if "member_logits" not in predictor.outputs:
        sys.exit(f"{bundle.path}: a single network has no member spread; nothing to fit")
    oof = load_out_of_fold(bundle).set_index("image_id")
    records = deduplicate(load_sources([str(DATA / s) for s in SOURCES])).records
    records = records[records["image_ref"].notna() & records["image_id"].isin(oof.index)]
    records = records.assign(source=records["image_id"].map(oof["source"]), fold=records["image_id"].map(oof["fold"]))
    records = records.sample(frac=1.0, random_state=0).groupby("source").head(args.per_source).reset_index(drop=True)
    started = time.perf_counter()
    risks, rows = member_risks(predictor, records)
    records = records.iloc[rows].reset_index(drop=True)
    held_out = members_of(predictor, records["fold"].to_numpy())
    frame = pd.DataFrame({
        "source": records["source"],
        "melanoma": (records["diagnosis"] == "MEL").to_numpy(),
        "spread": risks.std(axis=1),
        "ensemble_risk": risks.mean(axis=1),
        "held_out_risk": risks[np.arange(len(risks)), held_out],
    })[held_out >= 0]
    level = float(np.quantile(frame["spread"], LEVEL_QUANTILE))
    frame["unsure"] = frame["spread"] > level
    threshold = bundle.melanoma_threshold
    uncertainty = {
        "risk_spread_level": round(level, 5),
        "method": f"{LEVEL_QUANTILE:.0%} quantile of the members' melanoma-risk spread on {len(frame)} shared images "
                  f"({args.per_source} per source of {', '.join(SOURCES)}), by bench/uncertainty.py",
    }
    result = {
        "bundle": bundle.name,
        "uncertainty": uncertainty,
        "spread_quantiles": {f"{q:.2f}": round(float(np.quantile(frame["spread"], q)), 4) for q in (0.5, 0.75, 0.9, 0.95, 0.99)},
        "pooled": summary(frame, threshold),
        "per_source": {source: summary(part, threshold) for source, part in frame.groupby("source")},
        "threshold": threshold,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg(),
    }
    if args.write:
        config_path = bundle.path / "bundle.json"
        config = json.loads(config_path.read_text())
        config["uncertainty"] = uncertainty
        config_path.write_text(json.dumps(config, indent=1))
        write_model_card(load_bundle(bundle.path))  # the card states the level too
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
