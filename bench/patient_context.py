"""Does patient context earn its place in the patient view's ranking?

    python bench/patient_context.py [BUNDLE] > bench/patient_context_results.json

Held-out SIIM-ISIC 2020 images of patients with two or more of them (each scored by the
network that never saw it, as bench/robustness.py's ugly-duckling part), described relative
to the same patient's others (dermsight.inference.context.relative_features: percentile
ranks of risk within the patient and patient+site, risk / patient mean, distance from the
patient's mean embedding, local outlier factor, percentile ranks on the embedding's principal
axes). A logistic regression on them is cross-fitted by patient (no patient's images in the
model that scores them). Risk comes two ways: the bundle's own out-of-fold predictions
(out_of_fold.csv.gz, as training decoded the images: the 71% quoted before) and the images
re-scored now through the Predictor's path (what the patient view shows); the embeddings
always come from re-scoring, by the same member network. On the patients with a melanoma and a benign lesion: how often the
melanoma ranks first by risk alone, by the context models, by each feature alone, and by
chance, with bootstrap intervals over patients and the paired difference against risk.

The model "context" (every feature) was fixed before measuring; "context_small" (risk, its
percentile, distance ratio, outlier factor) is the one smaller alternative tried. Then the
same features on real unlabelled ISIC 2020 test_128 patients (a random PATIENTS_128 of them,
all their images): how they spread and how often the context would change a patient's top lesion.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from robustness import DATA, held_out_table, labelled_records
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dermsight.data.dataset import load_sources
from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.evaluation.robustness import decode_all, held_out_scores
from dermsight.inference.context import RELATIVE_COLUMNS, relative_features
from dermsight.inference.predictor import Predictor

AXES = 4  # principal axes of the embeddings whose within-patient percentiles are features
CROSS_FIT_FOLDS = 10  # by patient
N_BOOT = 2000
PATIENTS_128 = 40
SMALL = ("risk_logit", "risk_percentile", "distance_ratio", "log_outlier_factor")


def scored(predictor: Predictor, records: pd.DataFrame, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated melanoma risk and embedding of each record's image, from `members` (-1: the bundle)."""
    scores = held_out_scores(predictor, decode_all(records["image_ref"].tolist()), records, members)
    return scores["probabilities"][:, predictor.classes.index("MEL")], scores["embeddings"]


def labelled_patients(predictor: Predictor) -> tuple[pd.DataFrame, np.ndarray]:
    """Held-out ISIC 2020 images of patients with at least two of them, scored; and their embeddings."""
    oof = load_out_of_fold(predictor.bundle)
    held_out = held_out_table(predictor, labelled_records(oof), oof)
    table = held_out[held_out["source"] == "isic2020"]
    table = table[table["patient_id"].map(table["patient_id"].value_counts()) >= 2].reset_index(drop=True)
    table["melanoma"] = (table["diagnosis"] == "MEL").astype(int)
    table["rescored_risk"], embeddings = scored(predictor, table, table["member"].to_numpy())
    table["out_of_fold_risk"] = table["image_id"].map(oof.set_index("image_id")["MEL"]).to_numpy()
    return table, embeddings


def cross_fitted(features: pd.DataFrame, labels: np.ndarray, patients: pd.Series, columns) -> np.ndarray:
    """Out-of-fold decision values of a standardised logistic regression, folds by patient."""
    values = np.zeros(len(labels))
    for fit, score in GroupKFold(CROSS_FIT_FOLDS).split(features, labels, patients):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features.iloc[fit][columns], labels[fit])
        values[score] = model.decision_function(features.iloc[score][columns])
    return values


def melanoma_first(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Per patient (with a melanoma and a benign lesion): 1 if its top lesion by `column` is a melanoma."""
    top = frame.loc[frame.groupby("patient_id", sort=True)[column].idxmax()]
    return top["melanoma"].to_numpy(dtype=float)


def interval(values: np.ndarray, rng: np.random.Generator) -> dict:
    n = len(values)
    boot = [values[rng.integers(0, n, n)].mean() for _ in range(N_BOOT)]
    return {"value": round(float(values.mean()), 4), "ci_low": round(float(np.percentile(boot, 2.5)), 4),
            "ci_high": round(float(np.percentile(boot, 97.5)), 4)}


def ranking(table: pd.DataFrame, features: pd.DataFrame, columns: list[str]) -> dict:
    frame = pd.concat([table[["patient_id", "melanoma", "melanoma_risk"]].reset_index(drop=True), features], axis=1)
    labels, patients = frame["melanoma"].to_numpy(), frame["patient_id"]
    frame["context"] = cross_fitted(frame, labels, patients, columns)
    frame["context_small"] = cross_fitted(frame, labels, patients, list(SMALL))
    counts = frame.groupby("patient_id")["melanoma"].agg(["sum", "count"])
    eligible = frame[frame["patient_id"].isin(counts[(counts["sum"] >= 1) & (counts["sum"] < counts["count"])].index)]
    rng = np.random.default_rng(0)
    risk = melanoma_first(eligible, "melanoma_risk")
    chance = eligible.groupby("patient_id", sort=True)["melanoma"].mean().to_numpy()
    result = {
        "patients": len(risk), "images": len(eligible),
        "training_rows": {"images": len(frame), "patients": int(patients.nunique()), "melanomas": int(labels.sum())},
        "chance": round(float(chance.mean()), 4),
        "melanoma_first_by_risk": interval(risk, rng),
    }
    for model in ("context", "context_small"):
        hits = melanoma_first(eligible, model)
        result[f"melanoma_first_by_{model}"] = interval(hits, rng)
        result[f"{model}_minus_risk"] = interval(hits - risk, rng)
    result["melanoma_first_by_one_feature"] = {  # exploratory: no fitting, each feature's own direction
        column: round(float(melanoma_first(eligible, column).mean()), 4) for column in columns if column != "risk_logit"
    }
    return result


def test_128_patients(predictor: Predictor, axes: PCA, model, columns: list[str]) -> dict:
    """The features on real unlabelled patients (the bundle's own output: what the patient view shows)."""
    records = load_sources([str(DATA / "isic2020" / "test_128.csv")]).records
    chosen = pd.Series(records["patient_id"].unique()).sample(PATIENTS_128, random_state=0)
    records = records[records["patient_id"].isin(chosen)].reset_index(drop=True)
    risk, embeddings = scored(predictor, records, np.full(len(records), -1))
    features = relative_features(records["patient_id"], records["site"], risk, embeddings, axes.components_)
    frame = records[["patient_id"]].assign(risk=risk, context=model.decision_function(features[columns]))
    sizes = frame.groupby("patient_id").size()
    by_patient = frame.groupby("patient_id")
    same_top = by_patient["risk"].idxmax() == by_patient["context"].idxmax()
    rho = pd.Series([spearmanr(rows["risk"], rows["context"])[0] for _, rows in by_patient])
    quartiles = {c: [round(float(q), 3) for q in features[c].quantile([0.25, 0.5, 0.75])] for c in RELATIVE_COLUMNS}
    per_patient = frame.assign(lof=features["log_outlier_factor"], distance=features["mean_distance"]).groupby("patient_id")
    return {
        "patients": int(len(sizes)), "images": int(len(frame)),
        "images_per_patient": {"min": int(sizes.min()), "median": float(sizes.median()), "max": int(sizes.max())},
        "feature_quartiles": quartiles,
        "same_top_lesion_as_risk": round(float(same_top.mean()), 4),
        "median_within_patient_spearman_context_vs_risk": round(float(rho.median()), 4),
        "spearman_patient_size_vs_mean_distance": round(float(spearmanr(sizes, per_patient["distance"].mean())[0]), 4),
        "spearman_patient_size_vs_max_log_outlier_factor": round(float(spearmanr(sizes, per_patient["lof"].max())[0]), 4),
    }


def main(path: Path) -> dict:
    started = time.time()
    predictor = Predictor(path)
    table, embeddings = labelled_patients(predictor)
    print(f"{len(table)} held-out ISIC 2020 images of {table['patient_id'].nunique()} patients", file=sys.stderr)
    axes = PCA(AXES, random_state=0).fit(embeddings)  # unsupervised: no label
    result = {"bundle": predictor.bundle.name}
    for risk in ("out_of_fold_risk", "rescored_risk"):
        risks = table[risk].to_numpy()
        features = relative_features(table["patient_id"], table["site"], risks, embeddings, axes.components_)
        result[f"ranking_by_{risk}"] = ranking(table.assign(melanoma_risk=risks), features, list(features.columns))
    columns = result["features"] = list(features.columns)
    # test_128 is scored through the Predictor: its model is fitted on the re-scored features (the last ones)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features[columns], table["melanoma"])
    result["test_128"] = test_128_patients(predictor, axes, model, columns)
    result["seconds"] = round(time.time() - started, 1)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=Path("bundles/default"),
                        help="default: bundles/default")
    print(json.dumps(main(parser.parse_args().bundle), indent=1))
