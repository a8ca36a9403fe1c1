"""Patient context, the "ugly duckling" sign: how a lesion stands out among the same
patient's other lesions. Pure functions over a prediction table."""

from __future__ import annotations

import numpy as np
import pandas as pd

CONTEXT_COLUMNS: tuple[str, ...] = (
    "patient_lesions",  # images of this patient in the table
    "embedding_distance",  # cosine distance of this image from the mean of the patient's others
    "distance_z",  # that distance as a z-score within the patient
    "risk_rank",  # 1 = the patient's highest melanoma risk
    "risk_z",  # the risk's logit as a z-score within the patient
    "ugly_duckling_score",  # mean of distance_z and risk_z: high = unlike the others and riskier
)


def patient_context(patient_ids: pd.Series, embeddings: np.ndarray, melanoma_risk: np.ndarray) -> pd.DataFrame:
    """Context features for each row; NaN (and rank 1) where the patient is unknown or
    has a single image, so a lone lesion is scored on its own."""
    n = len(patient_ids)
    out = {column: np.full(n, np.nan) for column in CONTEXT_COLUMNS}  # filled per patient, framed once
    out["patient_lesions"][:] = 1.0
    out["risk_rank"][:] = 1.0
    logit = np.log(np.clip(melanoma_risk, 1e-6, 1 - 1e-6) / np.clip(1 - melanoma_risk, 1e-6, 1))
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    ids = patient_ids.reset_index(drop=True)
    for _, rows in ids[ids.notna()].groupby(ids[ids.notna()]).groups.items():
        rows = np.asarray(rows)
        k = len(rows)
        out["patient_lesions"][rows] = k
        if k < 2:
            continue
        members = unit[rows]
        others_mean = (members.sum(axis=0, keepdims=True) - members) / (k - 1)
        others_mean /= np.maximum(np.linalg.norm(others_mean, axis=1, keepdims=True), 1e-12)
        distance = 1.0 - np.sum(members * others_mean, axis=1)
        out["embedding_distance"][rows] = distance
        out["distance_z"][rows] = _zscore(distance)
        out["risk_z"][rows] = _zscore(logit[rows])
        descending = np.sort(-melanoma_risk[rows])
        out["risk_rank"][rows] = np.searchsorted(descending, -melanoma_risk[rows], side="left") + 1  # ties share the best
    out["ugly_duckling_score"] = (out["distance_z"] + out["risk_z"]) / 2
    return pd.DataFrame(out)


def _zscore(values: np.ndarray) -> np.ndarray:
    sd = values.std()
    return np.zeros_like(values) if sd < 1e-12 else (values - values.mean()) / sd


RELATIVE_COLUMNS: tuple[str, ...] = (
    "risk_logit",  # the risk itself (its logit), for the model to weigh against the relative terms
    "risk_percentile",  # 0 = the patient's lowest risk, 1 = its highest (0.5 when alone)
    "risk_percentile_site",  # the same within the patient's lesions at the same site
    "log_risk_ratio",  # log of risk / the patient's mean risk
    "mean_distance",  # cosine distance from the patient's mean embedding
    "distance_ratio",  # that distance / the patient's mean of it
    "log_outlier_factor",  # log local outlier factor among the patient's embeddings (0: as dense as its neighbours)
    "feature_extremity",  # mean of |2 * percentile - 1| over the embedding's principal axes: 1 = extreme on every one
)
OUTLIER_NEIGHBOURS = 10  # local outlier factor's neighbours; half the patient's other lesions when fewer


def relative_features(
    patient_ids: pd.Series, sites: pd.Series, melanoma_risk: np.ndarray, embeddings: np.ndarray, axes: np.ndarray,
) -> pd.DataFrame:
    """Each lesion described relative to the same patient's other lesions (the ISIC 2024
    patient-level features), from the network's outputs only, never a label: percentile
    ranks of risk within the patient and within patient and site, risk over the patient's
    mean, distance from the patient's mean embedding, local outlier factor within the
    patient, and percentile ranks on `axes` (K, F: principal axes of the embeddings, fitted
    without labels), one column each (`axis<k>_percentile`) plus their `feature_extremity`.
    A patient with one lesion gets neutral values (percentile 0.5, ratio 1, distance 0)."""
    from sklearn.neighbors import LocalOutlierFactor

    ids = patient_ids.reset_index(drop=True).astype(object)
    ids = ids.where(ids.notna(), pd.Series([f"unknown-{i}" for i in range(len(ids))], dtype=object))  # alone
    site_keys = ids + "|" + sites.reset_index(drop=True).fillna("unknown site").astype(str)
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    projections = unit @ axes.T
    risk = np.clip(melanoma_risk, 1e-6, 1 - 1e-6)
    out = pd.DataFrame({"risk_logit": np.log(risk / (1 - risk))})
    out["risk_percentile"] = _percentile_within(risk, ids)
    out["risk_percentile_site"] = _percentile_within(risk, site_keys)
    out["log_risk_ratio"] = np.log(risk / pd.Series(risk).groupby(ids).transform("mean").to_numpy())
    distance, outlier = np.zeros(len(ids)), np.zeros(len(ids))
    for rows in ids.groupby(ids).indices.values():
        if len(rows) > 1:
            members = unit[rows]
            centre = members.mean(axis=0)
            distance[rows] = 1.0 - members @ centre / max(np.linalg.norm(centre), 1e-12)
            neighbours = min(OUTLIER_NEIGHBOURS, max(1, (len(rows) - 1) // 2))  # all the others: every lesion alike
            lof = LocalOutlierFactor(n_neighbors=neighbours, metric="cosine").fit(members)
            outlier[rows] = np.log(-lof.negative_outlier_factor_)
    out["mean_distance"] = distance
    mean_distance = pd.Series(distance).groupby(ids).transform("mean").to_numpy()
    out["distance_ratio"] = np.where(mean_distance > 1e-12, distance / np.maximum(mean_distance, 1e-12), 1.0)  # 1: alone
    out["log_outlier_factor"] = outlier
    percentiles = np.stack([_percentile_within(projections[:, k], ids) for k in range(projections.shape[1])], axis=1)
    out["feature_extremity"] = np.abs(2 * percentiles - 1).mean(axis=1)
    for k in range(percentiles.shape[1]):
        out[f"axis{k + 1}_percentile"] = percentiles[:, k]
    return out


def _percentile_within(values: np.ndarray, groups: pd.Series) -> np.ndarray:
    """(rank - 1) / (n - 1) within each group, ties averaged; 0.5 for a group of one."""
    series = pd.Series(values)
    ranks = series.groupby(groups.to_numpy()).rank(method="average").to_numpy()
    sizes = series.groupby(groups.to_numpy()).transform("size").to_numpy()
    return np.where(sizes > 1, (ranks - 1) / np.maximum(sizes - 1, 1), 0.5)
