"""The one lesion-image record schema every source is read into.

A *record* is one dermoscopic image of one lesion of one patient. Every reader
returns a :class:`pandas.DataFrame` with exactly :data:`RECORD_COLUMNS`, with
values harmonised to the vocabularies below, plus a list of :class:`Problem`
for every row or file it had to skip or repair.
"""

from __future__ import annotations

import pandas as pd

from dermsight.imaging.errors import Problem  # noqa: F401  (re-exported; it lives in imaging, which reports them too)

# ISIC 2019 diagnosis codes; UNK is "benign, no specific diagnosis" (ISIC 2020 "unknown").
DIAGNOSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
# Classes a model predicts (UNK is not a class one can learn from a picture).
CLASSES: tuple[str, ...] = DIAGNOSES[:-1]
# The 9-class teaching set ("Skin cancer ISIC") splits BKL in two; its folder names.
NINE_CLASS_FOLDERS: dict[str, str] = {
    "actinic keratosis": "AK",
    "basal cell carcinoma": "BCC",
    "dermatofibroma": "DF",
    "melanoma": "MEL",
    "nevus": "NV",
    "pigmented benign keratosis": "BKL",
    "seborrheic keratosis": "BKL",
    "squamous cell carcinoma": "SCC",
    "vascular lesion": "VASC",
}
CLASS_NAMES: dict[str, str] = {
    "MEL": "melanoma",
    "NV": "melanocytic nevus",
    "BCC": "basal cell carcinoma",
    "AK": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma",
    "UNK": "benign, other or unknown",
}

# Classes a clinician treats as cancer: melanoma, basal and squamous cell carcinoma, and actinic
# keratosis (a precancer, treated).
MALIGNANT: frozenset[str] = frozenset({"MEL", "BCC", "SCC", "AK"})

# The ISIC 2020 anatomical-site vocabulary.
SITES: tuple[str, ...] = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "torso",
    "palms/soles",
    "oral/genital",
)
SEXES: tuple[str, ...] = ("male", "female")
AGE_RANGE: tuple[float, float] = (0.0, 120.0)

RECORD_COLUMNS: tuple[str, ...] = (
    "image_id",  # ISIC id (ISIC_0012345) or file stem
    "image_ref",  # a file path, or "shard.tfrec#offset" for an image inside a TFRecord
    "patient_id",
    "lesion_id",
    "age",  # years, float, NaN when unknown
    "sex",  # "male" | "female" | None
    "site",  # one of SITES or None
    "diagnosis",  # one of DIAGNOSES or None when unlabelled
    "original_label",  # the source's own label text, kept for the 9-class view
    "melanoma",  # 1.0 / 0.0, NaN when unlabelled
    "source",  # reader name, e.g. "ham10000"
    "patient_images",  # images of this patient in the whole source dataset (ISIC 2020), NaN if unknown
)


def empty_records() -> pd.DataFrame:
    """A record table without rows, with the schema columns and dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES[c]) for c in RECORD_COLUMNS})


_NUMERIC = ("age", "melanoma", "patient_images")
_DTYPES: dict[str, str] = {c: "float64" if c in _NUMERIC else "object" for c in RECORD_COLUMNS}


def as_records(frame: pd.DataFrame) -> pd.DataFrame:
    """Return `frame` restricted to RECORD_COLUMNS in order, with the schema's dtypes."""
    out = frame.reindex(columns=list(RECORD_COLUMNS)).astype(_DTYPES)
    out = out.astype(object).where(out.notna(), None).astype(_DTYPES)
    return out.reset_index(drop=True)
