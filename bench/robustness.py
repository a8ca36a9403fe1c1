"""Acquisition robustness of a bundle: does it read the lesion or the camera?

    python bench/robustness.py [BUNDLE] > bench/robustness_results.json

Prints JSON with four measurements, each on predictions from a network that never saw the
image (see dermsight.evaluation.robustness.held_out_scores):

- paired: every HAM10000 image that isic9 holds in a second encoding (200x150 q~75 vs 180x180
  q~95, squashed), both copies scored by the same network: same referral, same class, |risk
  difference|. An ensemble trained with source folds scores each pair with the member that
  never saw its HAM10000 fold; a single network trained on HAM10000 saw the HAM copies
  (marked in "scored_by");
- sweep: held-out images (up to SWEEP_PER_SOURCE per source) under the fixed acquisitions
  of dermsight.evaluation.robustness.ACQUISITIONS: AUC, balanced accuracy, share flagged, mean
  risk, and each one's change against the untouched images;
- population: the share of ISIC 2020 test_128 flagged (a random 2,500 of its images, with their metadata
  and images alone; patient image counts from the whole of test_128),
  and of the held-out benign images of every source;
- ugly_duckling: ISIC 2020 patients with a melanoma and a benign lesion (held-out scores):
  how often a melanoma ranks first by risk, by the ugly-duckling score, by a cross-fitted
  combination, against chance.
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

from dermsight.data import readers
from dermsight.data.dataset import deduplicate, load_sources
from dermsight.evaluation.held_out import SOURCE_NAMES, held_out_kinds, load_out_of_fold
from dermsight.evaluation.robustness import (
    acquisition_sweep,
    decode_all,
    held_out_scores,
    members_of,
    paired_consistency,
    ugly_duckling,
)
from dermsight.inference.predictor import Predictor

DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SOURCES = ["ham10000", "isic9/train", "isic2020", "isic2019", "isic2017", "derm7pt"]
SWEEP_PER_SOURCE = 300
TEST_128_SAMPLE = 2500  # of the 5,545 test_128 images: the flag rate to about +-1 point
HAM_HELD_OUT = 1000  # HAM10000 images scored untouched (an ensemble holds every one out in some member)
HELD_OUT = ("left_out_source", "external_source", "unseen_images")


def labelled_records(oof: pd.DataFrame) -> pd.DataFrame:
    """Every shared labelled image with an image file, its fold and source as the bundle trained them."""
    records = deduplicate(load_sources([str(DATA / s) for s in SOURCES])).records
    records = records[records["image_ref"].notna() & records["diagnosis"].notna()].reset_index(drop=True)
    trained = oof.set_index("image_id")
    records["source"] = records["image_id"].map(trained["source"]).fillna(records["source"])
    records["fold"] = records["image_id"].map(trained["fold"])
    return records


def sample(frame: pd.DataFrame, per_source: int, seed: int = 0) -> pd.DataFrame:
    return frame.sample(frac=1.0, random_state=seed).groupby("source").head(per_source).reset_index(drop=True)


def held_out_table(predictor: Predictor, records: pd.DataFrame, oof: pd.DataFrame) -> pd.DataFrame:
    """Held-out rows with a member index (see members_of): sources left out or never trained on."""
    records = records.assign(held_out=held_out_kinds(predictor.bundle, records, oof))
    if int(predictor.bundle.training.get("members", 1)) > 1:
        records["member"] = members_of(predictor, records["fold"].to_numpy())
        keep = records["held_out"].isin(HELD_OUT) | (records["member"] >= 0)
    else:
        records["member"] = -1
        keep = records["held_out"].isin(HELD_OUT)  # the network saw every other image
    records = records[keep].sample(frac=1.0, random_state=0)
    ham = records["source"] == "ham10000"
    return pd.concat([records[~ham], records[ham].head(HAM_HELD_OUT)]).sort_index().reset_index(drop=True)


def paired(predictor: Predictor, oof: pd.DataFrame) -> dict:
    ham = readers.read_ham10000(DATA / "ham10000").records
    isic9 = readers.read_class_folders(DATA / "isic9" / "train").records.drop_duplicates("image_id")  # some sit in two folders
    pairs = ham.merge(isic9[["image_id", "image_ref"]], on="image_id", suffixes=("", "_isic9"))
    pairs["fold"] = pairs["image_id"].map(oof.set_index("image_id")["fold"])
    members = members_of(predictor, pairs["fold"].to_numpy())
    result = paired_consistency(predictor, pairs["image_ref"].tolist(), pairs["image_ref_isic9"].tolist(), pairs, members)
    result["scored_by"] = (
        "the member network trained without the pair's HAM10000 fold"
        if (members >= 0).all()
        else "the shipped network, which trained on the HAM10000 copies (not on the isic9 copies)"
    )
    result["mean_risk_ham10000_copy"], result["mean_risk_isic9_copy"] = result.pop("mean_risk_first"), result.pop("mean_risk_second")
    return result


def population(predictor: Predictor, held_out: pd.DataFrame, untouched: dict) -> dict:
    test = load_sources([str(DATA / "isic2020" / "test_128.csv")]).records.sample(TEST_128_SAMPLE, random_state=0)
    with_metadata, _ = predictor.predict_records(test, progress=False)
    blank = test.assign(age=np.nan, sex=None, site=None, patient_images=np.nan, patient_id=None)
    images_alone, _ = predictor.predict_records(blank, progress=False)
    risk = untouched["probabilities"][:, predictor.classes.index("MEL")]
    benign = held_out["diagnosis"] != "MEL"
    per_source = {
        SOURCE_NAMES.get(s, s): {
            "benign_images": int((benign & (held_out["source"] == s)).sum()),
            "flagged": float(np.mean(risk[(benign & (held_out["source"] == s)).to_numpy()] >= predictor.threshold)),
        }
        for s in sorted(held_out["source"].unique())
        if (benign & (held_out["source"] == s)).any()
    }
    return {
        "test_128": {
            "images": int(len(with_metadata)),
            "flagged_with_metadata": float(with_metadata["above_threshold"].mean()),
            "flagged_images_alone": float(images_alone["above_threshold"].mean()),
            "note": "about 2% of the SIIM-ISIC 2020 test population is melanoma",
        },
        "held_out_benign": per_source,
    }


def ugly_duckling_measure(predictor: Predictor, held_out: pd.DataFrame, untouched: dict) -> dict:
    rows = (held_out["source"] == "isic2020").to_numpy()
    table = held_out.loc[rows, ["image_id", "patient_id"]].assign(
        melanoma=(held_out.loc[rows, "diagnosis"] == "MEL").astype(int).to_numpy(),
        melanoma_risk=untouched["probabilities"][rows, predictor.classes.index("MEL")],
    )
    table.attrs["embeddings"] = untouched["embeddings"][rows]
    result = ugly_duckling(table)
    result["note"] = "small data: the intervals are wide; the context covers each patient's labelled images here only"
    return result


def main(path: Path) -> dict:
    started = time.time()
    predictor = Predictor(path)
    oof = load_out_of_fold(predictor.bundle)
    records = labelled_records(oof)
    held_out = held_out_table(predictor, records, oof)
    print(f"{len(held_out):,} held-out images: {held_out['source'].value_counts().to_dict()}", file=sys.stderr)
    untouched = held_out_scores(predictor, decode_all(held_out["image_ref"].tolist()), held_out, held_out["member"].to_numpy())
    swept = sample(held_out[held_out["source"] != "ham10000"], SWEEP_PER_SOURCE)
    return {
        "bundle": predictor.bundle.name,
        "members": int(predictor.bundle.training.get("members", 1)),
        "threshold": predictor.threshold,
        "held_out_images": {SOURCE_NAMES.get(k, k): int(v) for k, v in held_out["source"].value_counts().items()},
        "paired": paired(predictor, oof),
        "sweep": {
            "images": int(len(swept)),
            "sources": {SOURCE_NAMES.get(k, k): int(v) for k, v in swept["source"].value_counts().items()},
            "rows": acquisition_sweep(predictor, swept, swept["member"].to_numpy()),
        },
        "population": population(predictor, held_out, untouched),
        "ugly_duckling": ugly_duckling_measure(predictor, held_out, untouched),
        "seconds": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=Path("bundles/default"),
                        help="default: bundles/default")
    print(json.dumps(main(parser.parse_args().bundle), indent=1))
