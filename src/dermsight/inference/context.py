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
