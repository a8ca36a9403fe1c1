"""Does a training recipe rank melanomas better than another on sources left out whole?

    python bench/recipes.py BASELINE_BUNDLE CANDIDATE_BUNDLE [CANDIDATE_BUNDLE ...] > bench/recipes_results.json

Each bundle's out_of_fold.csv.gz holds, for every image its run validated, the prediction of the
network trained without that image's fold. Bundles trained with the same sources, `--folds`,
`--source-folds` and `--seed` have the same folds image by image, so a candidate run with
`--validation-folds N` (a CPU-sized proxy: only its first N fold networks are trained) is compared
with the baseline on exactly the images it validated. Per source (how it was held out: left out
whole, or HAM10000's grouped CV): melanoma AUC and specificity at the source's own 90%-sensitivity
threshold of both, and the candidate's AUC gain with a 95% paired bootstrap interval (images
resampled within the source). A source whose images sit in other folds in the two runs (another
`--seed` regroups HAM10000; a source left out whole stays in its fold) is not paired: each run's AUC
on its own validated images of it is reported, marked unpaired. Also each run's recipe differences
and wall time.

With `--average`, one more candidate: the ensemble of every run given (baseline included), each
image's class log-probabilities averaged over the runs and renormalised (what averaging the networks'
logits gives), on the images every run validated. Each run's prediction of an image comes from a
network that never saw it, so the average is held out too, and it is paired with the baseline on
every source (e.g. what a second seed's networks would add to the shipped ones).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd
from frozen_heads import paired_gain, specificity_at
from sklearn.metrics import roc_auc_score

from dermsight.evaluation.held_out import SOURCE_NAMES, load_out_of_fold
from dermsight.models.bundle import load_bundle

RECIPE_KEYS_IGNORED = ("sources", "output", "run_dir", "cache_dir", "progress", "checkpoint_minutes")


def recipe_difference(baseline: dict, candidate: dict) -> dict:
    """{key: [baseline value, candidate value]} for every recipe setting the two runs differ in."""
    keys = sorted((set(baseline) | set(candidate)) - set(RECIPE_KEYS_IGNORED))
    return {key: [baseline.get(key), candidate.get(key)] for key in keys if baseline.get(key) != candidate.get(key)}


def validated(bundle_path: str, columns: tuple[str, ...] = ("MEL",)) -> pd.DataFrame:
    """The bundle's out-of-fold rows that a network predicted (a proxy run leaves the others empty)."""
    oof = load_out_of_fold(load_bundle(bundle_path))
    return oof[oof["MEL"].notna()][["image_id", "source", "diagnosis", "fold", *columns]]


def averaged(bundle_paths: list[str]) -> pd.DataFrame:
    """The runs' ensemble on the images every run validated: class log-probabilities averaged and
    renormalised (the melanoma probability in "MEL"), with the first run's folds."""
    classes = load_bundle(bundle_paths[0]).classes
    runs = [validated(path, tuple(classes)).set_index("image_id") for path in bundle_paths]
    common = runs[0].index
    for run in runs[1:]:
        common = common.intersection(run.index)
    log_probabilities = np.mean([np.log(np.clip(run.loc[common, classes].to_numpy(float), 1e-12, 1)) for run in runs], axis=0)
    probabilities = np.exp(log_probabilities - log_probabilities.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    table = runs[0].loc[common, ["source", "diagnosis", "fold"]].reset_index()
    table["MEL"] = probabilities[:, classes.index("MEL")]
    return table


def compare(baseline: pd.DataFrame, candidate: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """Per source, on the images both runs predicted: AUC and specificity at 90% sensitivity of
    each, and the candidate's paired AUC gain."""
    both = candidate.merge(baseline, on="image_id", suffixes=("", "_baseline"))
    moved = set(both.loc[both["fold"] != both["fold_baseline"], "source"])
    rows = [unpaired(source, baseline, candidate) for source in sorted(moved)]
    for source, part in both[~both["source"].isin(moved)].groupby("source"):
        y = (part["diagnosis"] == "MEL").to_numpy().astype(int)
        if not 0 < y.sum() < len(y):
            continue
        base, other = part["MEL_baseline"].to_numpy(), part["MEL"].to_numpy()
        rows.append({
            "source": SOURCE_NAMES.get(source, source), "paired": True,
            "held_out": "grouped_cv" if source == "ham10000" else "left_out_source",
            "folds": sorted(int(f) for f in part["fold"].unique()),
            "images": int(len(part)), "melanomas": int(y.sum()),
            "baseline": {"auc": float(roc_auc_score(y, base)), "specificity_at_90": specificity_at(y, base)},
            "candidate": {"auc": float(roc_auc_score(y, other)), "specificity_at_90": specificity_at(y, other)},
            "auc_gain": float(roc_auc_score(y, other) - roc_auc_score(y, base)),
            "auc_gain_ci95": paired_gain(y, base, other, rng),
        })
    return rows


def unpaired(source: str, baseline: pd.DataFrame, candidate: pd.DataFrame) -> dict:
    """A source whose images sit in other folds in the two runs: each run's AUC and specificity on
    its own validated images of it (no paired gain)."""
    row = {"source": SOURCE_NAMES.get(source, source), "paired": False,
           "why": "its images sit in other folds in the two runs (another --seed or --folds)"}
    for name, run in (("baseline", baseline), ("candidate", candidate)):
        part = run[run["source"] == source]
        y, risk = (part["diagnosis"] == "MEL").to_numpy().astype(int), part["MEL"].to_numpy()
        row[name] = {"images": int(len(part)), "melanomas": int(y.sum()), "folds": sorted(int(f) for f in part["fold"].unique()),
                     "auc": float(roc_auc_score(y, risk)), "specificity_at_90": specificity_at(y, risk)}
    return row


def main(baseline_path: str, candidate_paths: list[str], average: bool = False) -> dict:
    rng = np.random.default_rng(0)
    baseline_bundle = load_bundle(baseline_path)
    baseline = validated(baseline_path)
    result = {"baseline": {"bundle": baseline_bundle.name, "path": baseline_path,
                           "training_seconds": baseline_bundle.training.get("duration_seconds")},
              "candidates": []}
    for path in candidate_paths:
        bundle = load_bundle(path)
        print(f"{bundle.name}: comparing", file=sys.stderr)
        result["candidates"].append({
            "bundle": bundle.name, "path": path,
            "recipe_difference": recipe_difference(baseline_bundle.training.get("config", {}),
                                                   bundle.training.get("config", {})),
            "training_seconds": bundle.training.get("duration_seconds"),
            "per_source": compare(baseline, validated(path), rng),
        })
    if average:
        runs = [baseline_path, *candidate_paths]
        print(f"the mean of {len(runs)} runs: comparing", file=sys.stderr)
        result["candidates"].append({
            "bundle": f"mean of {len(runs)} runs", "path": runs, "recipe_difference": {},
            "training_seconds": sum(load_bundle(path).training.get("duration_seconds") or 0 for path in runs),
            "per_source": compare(baseline, averaged(runs), rng),
        })
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline", help="The bundle to compare against (e.g. bundles/default).")
    parser.add_argument("candidates", nargs="+", help="Bundles trained on the same folds (see above).")
    parser.add_argument("--average", action="store_true", help="Also score the ensemble of every run given (see above).")
    args = parser.parse_args()
    print(json.dumps(main(args.baseline, args.candidates, args.average), indent=1))
