"""Patient metadata as model input: age, sex, site and the patient's image count.

Every field has an explicit "missing" feature, so a model trained with metadata still
answers when a clinic leaves fields empty (and the 9-class teaching set has none).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermsight.data.schema import SEXES, SITES

METADATA_FEATURES: tuple[str, ...] = (
    "age_over_100",
    "age_missing",
    *[f"sex_{s}" for s in SEXES],
    "sex_missing",
    *[f"site_{s}" for s in SITES],
    "site_missing",
    "log_patient_images",
    "patient_images_missing",
)


def patient_image_counts(records: pd.DataFrame) -> pd.Series:
    """Number of images of each record's patient in `records` (NaN without a patient id)."""
    if "patient_id" not in records.columns or not records["patient_id"].notna().any():
        return pd.Series(np.nan, index=records.index)  # (a groupby costs a millisecond per served upload)
    counts = records.groupby("patient_id")["image_id"].transform("count")
    return counts.where(records["patient_id"].notna())


# Fields only ISIC 2020 fills (a patient's image count) tell a network the source, not the lesion:
# the source-robust recipe leaves them out.
SOURCE_NEUTRAL_FEATURES: tuple[str, ...] = tuple(f for f in METADATA_FEATURES if "patient_images" not in f)


def missing_metadata(features: tuple[str, ...] | list[str] = METADATA_FEATURES) -> np.ndarray:
    """The encoding of a record with every field unknown (metadata dropout's blank row)."""
    blank = pd.DataFrame({"age": [np.nan], "sex": [None], "site": [None], "patient_id": [None], "image_id": ["-"]})
    return encode_metadata(blank, features)[0]


def encode_metadata(records: pd.DataFrame, features: tuple[str, ...] | list[str] = METADATA_FEATURES) -> np.ndarray:
    """(N, len(features)) float32 from schema columns age, sex, site and patient_images
    (where that is missing, counted from the patient ids in `records`); `features` is the
    bundle's list, a subset of METADATA_FEATURES in that order."""
    if tuple(features) != METADATA_FEATURES:
        columns = [METADATA_FEATURES.index(f) for f in features]
        return np.ascontiguousarray(encode_metadata(records)[:, columns])
    n = len(records)
    age = pd.to_numeric(records["age"], errors="coerce").to_numpy(dtype=float)
    sex = records["sex"].to_numpy(dtype=object)
    site = records["site"].to_numpy(dtype=object)
    counted = patient_image_counts(records)
    given = records["patient_images"] if "patient_images" in records.columns else counted
    images = given.fillna(counted).to_numpy(dtype=float)
    columns = [
        np.nan_to_num(age / 100.0),
        np.isnan(age),
        *[sex == s for s in SEXES],
        ~np.isin(sex, SEXES),
        *[site == s for s in SITES],
        ~np.isin(site, SITES),
        np.nan_to_num(np.log1p(images)),
        np.isnan(images),
    ]
    return np.stack(columns, axis=1).astype(np.float32).reshape(n, len(METADATA_FEATURES))
