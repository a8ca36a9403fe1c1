"""Map each source's vocabulary (sites, sexes, ages, diagnoses) onto the record schema.

Every function returns ``(value, complaint)``: ``complaint`` is None when the raw value
was understood (or honestly empty) and a sentence otherwise, in which case ``value`` is
None/NaN and the caller records a :class:`~dermsight.data.schema.Problem`.
"""

from __future__ import annotations

import math
import re

from dermsight.data.schema import AGE_RANGE, DIAGNOSES, SITES

_EMPTY = {"", "nan", "none", "null", "unknown", "na", "n/a"}


def _clean(raw: object) -> str:
    """Lower case, with runs of spaces, underscores and hyphens folded to one space."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return ""
    return re.sub(r"[\s_\-]+", " ", str(raw).strip().lower()).replace(" / ", "/")

# HAM10000 localisations, ISIC 2019/2018 and isic-cli site names -> ISIC 2020 sites.
SITE_SYNONYMS: dict[str, str] = {_clean(k): v for k, v in {
    **{s: s for s in SITES},
    "abdomen": "torso",
    "back": "torso",
    "chest": "torso",
    "trunk": "torso",
    "anterior torso": "torso",
    "posterior torso": "torso",
    "lateral torso": "torso",
    "face": "head/neck",
    "scalp": "head/neck",
    "ear": "head/neck",
    "neck": "head/neck",
    "head": "head/neck",
    "head neck": "head/neck",  # DICOM BodyPartExamined (CS) cannot hold "/": HEAD_NECK, HEAD NECK
    "arm": "upper extremity",
    "leg": "lower extremity",
    "upper extremity": "upper extremity",
    "upper_extremity": "upper extremity",
    "hand": "upper extremity",
    "lower extremity": "lower extremity",
    "lower_extremity": "lower extremity",
    "foot": "lower extremity",
    "acral": "palms/soles",
    # Derm7pt's own vocabulary (abdomen, back, chest, head neck and acral are above)
    "upper limbs": "upper extremity",
    "lower limbs": "lower extremity",
    "genital areas": "oral/genital",
    "buttocks": "torso",  # the ISIC Archive files the buttocks under the (posterior) torso
    "palms soles": "palms/soles",
    "genital": "oral/genital",
    "oral genital": "oral/genital",
}.items()}

# Source diagnosis text (lower case) -> ISIC 2019 code.
DIAGNOSIS_SYNONYMS: dict[str, str] = {_clean(k): v for k, v in {
    **{code.lower(): code for code in DIAGNOSES},
    "akiec": "AK",
    "actinic keratosis": "AK",
    "bcc": "BCC",
    "basal cell carcinoma": "BCC",
    "bkl": "BKL",
    "benign keratosis": "BKL",
    "pigmented benign keratosis": "BKL",
    "seborrheic keratosis": "BKL",
    "lichenoid keratosis": "BKL",
    "lichen planus like keratosis": "BKL",
    "solar lentigo": "BKL",
    "lentigo nos": "BKL",
    "lentigo simplex": "BKL",
    "df": "DF",
    "dermatofibroma": "DF",
    "mel": "MEL",
    "melanoma": "MEL",
    "melanoma metastasis": "MEL",
    "nv": "NV",
    "nevus": "NV",
    "vasc": "VASC",
    "vascular lesion": "VASC",
    "angioma": "VASC",
    "hemangioma": "VASC",
    "angiokeratoma": "VASC",
    "pyogenic granuloma": "VASC",
    "scc": "SCC",
    "squamous cell carcinoma": "SCC",
    # The ISIC Archive's current taxonomy (isic-cli diagnosis_3).
    "solar or actinic keratosis": "AK",
    "squamous cell carcinoma in situ": "SCC",
    "squamous cell carcinoma, nos": "SCC",
    "squamous cell carcinoma, invasive": "SCC",
    "unknown": "UNK",
    "atypical melanocytic proliferation": "UNK",
    "cafe-au-lait macule": "UNK",
}.items()}




def site(raw: object) -> tuple[str | None, str | None]:
    text = _clean(raw)
    if text in _EMPTY:
        return None, None
    if text in SITE_SYNONYMS:
        return SITE_SYNONYMS[text], None
    return None, f"unknown anatomical site {raw!r} (expected one of {', '.join(SITES)})"


def sex(raw: object) -> tuple[str | None, str | None]:
    text = _clean(raw)
    if text in _EMPTY:
        return None, None
    mapped = {"male": "male", "m": "male", "female": "female", "f": "female"}.get(text)
    if mapped:
        return mapped, None
    return None, f"unknown sex {raw!r} (expected male or female)"


def age(raw: object) -> tuple[float, str | None]:
    text = _clean(raw)
    if text in _EMPTY:
        return math.nan, None
    text = str(raw).strip().lower()  # not _clean: it would turn "-5" into " 5"
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*y?", text)  # "45", "45.0", DICOM "045Y"
    if not match:
        return math.nan, f"age {raw!r} is not a number"
    value = float(match.group(1)) + 0.0  # + 0.0: no "-0"
    low, high = AGE_RANGE
    if not low <= value <= high:
        return math.nan, f"age {raw!r} is outside {low:g}-{high:g} years"
    return value, None


def diagnosis(raw: object) -> tuple[str | None, str | None]:
    text = _clean(raw)
    if text == "" or text in {"nan", "none"}:
        return None, None
    if text in DIAGNOSIS_SYNONYMS:
        return DIAGNOSIS_SYNONYMS[text], None
    return None, f"unknown diagnosis {raw!r}"


def melanoma_from(diagnosis_code: str | None) -> float:
    if diagnosis_code is None:
        return math.nan
    return 1.0 if diagnosis_code == "MEL" else 0.0
