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


def _vocabulary(*tables: dict[str, object]) -> dict[str, object]:
    """`tables` merged on their cleaned keys; a key given twice (after cleaning) is an error."""
    merged: dict[str, object] = {}
    for table in tables:
        for raw, value in table.items():
            key = _clean(raw)
            if key in merged:
                raise ValueError(f"vocabulary key {raw!r} given twice (as {key!r})")
            merged[key] = value
    return merged


# HAM10000 localisations, ISIC 2019/2018 and isic-cli site names -> ISIC 2020 sites.
SITE_SYNONYMS: dict[str, str] = _vocabulary({s: s for s in SITES}, {
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
    "hand": "upper extremity",
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
})

# Diagnosis text -> ISIC 2019 code. UNK is "benign, other or unknown": ISIC 2019's
# "none of the others", melanoma target 0.
#
# The ISIC Archive's current vocabulary is a hierarchy (isic-metadata's DiagnosisEnum,
# "Malignant:Malignant epidermal proliferations:Keratoacanthoma"; isic-cli exports it as
# diagnosis_1..diagnosis_5). Its node names are unique, so :func:`diagnosis` reads a path
# from its deepest name up and the first name listed here (or in EXCLUDED_DIAGNOSES)
# decides: every category of the second level is listed, deeper names only where they
# differ from their category. The policy:
# - MEL: every melanoma (invasive, in situ, metastasis, NOS) and "Collision - At least one
#   malignant proliferation", which the archive counts as melanoma (DiagnosisEnum.is_melanoma).
# - BCC, SCC: basal cell carcinoma (baso-squamous included); every malignant epidermal
#   proliferation (SCC in situ and invasive, keratoacanthoma, Bowenoid papulosis,
#   verrucous carcinoma) is SCC.
# - AK: the archive's indeterminate epidermal proliferations (actinic keratosis and cheilitis):
#   "indeterminate" there is their malignant potential, not doubt about the diagnosis.
# - BKL: seborrheic keratosis, solar and ink-spot lentigo, lichen planus-like keratosis,
#   pigmented benign keratosis, melanoacanthoma, lentigo NOS and simplex (as ISIC 2019).
# - NV: benign melanocytic proliferations; DF: dermatofibroma; VASC: benign vascular
#   proliferations and hemorrhage (ISIC 2019's "vascular lesion").
# - UNK: every other benign lesion, and every other malignancy (lymphomas, adnexal
#   carcinomas, Merkel cell carcinoma, sarcomas, Kaposi sarcoma and angiosarcoma among
#   them: VASC is a benign class, metastases of internal cancers): none of the eight
#   classes, and not melanoma.
DIAGNOSIS_SYNONYMS: dict[str, str] = _vocabulary({code.lower(): code for code in DIAGNOSES}, {
    "akiec": "AK",
    "actinic keratosis": "AK",
    "basal cell carcinoma": "BCC",
    "benign keratosis": "BKL",
    "pigmented benign keratosis": "BKL",
    "seborrheic keratosis": "BKL",
    "lichenoid keratosis": "BKL",
    "lichen planus like keratosis": "BKL",
    "solar lentigo": "BKL",
    "lentigo nos": "BKL",
    "lentigo simplex": "BKL",
    "dermatofibroma": "DF",
    "melanoma": "MEL",
    "melanoma metastasis": "MEL",
    "nevus": "NV",
    "vascular lesion": "VASC",
    "angioma": "VASC",
    "hemangioma": "VASC",
    "angiokeratoma": "VASC",
    "pyogenic granuloma": "VASC",
    "squamous cell carcinoma": "SCC",
    "unknown": "UNK",  # ISIC 2020: benign without a specific diagnosis
    "atypical melanocytic proliferation": "UNK",  # ISIC 2020 published these as benign (target 0)
    "cafe-au-lait macule": "UNK",
    # The archive's legacy vocabulary (isic-metadata's LegacyDxEnum; names shared with the
    # hierarchy below map as their category there does).
    "nevus spilus": "NV",
    "adnexal tumor": "UNK",
    "acrochordon": "UNK",
    "angiofibroma or fibrous papule": "UNK",
    "clear cell acanthoma": "UNK",
    "ephelis": "UNK",
    "epidermal nevus": "UNK",
    "merkel cell carcinoma": "UNK",
    "mucosal melanosis": "UNK",
    "neurofibroma": "UNK",
    "scar": "UNK",
    "sebaceous adenoma": "UNK",
    "sebaceous hyperplasia": "UNK",
    "verruca": "UNK",
    "other": "UNK",
}, {
    # The archive's hierarchy: first level alone, then every second-level category (with
    # the deeper names that differ from it).
    "Benign": "UNK",  # benign, no specific diagnosis
    "Benign - Other": "UNK",
    "Benign adnexal epithelial proliferations - Apocrine or Eccrine": "UNK",
    "Benign adnexal epithelial proliferations - Follicular": "UNK",
    "Benign adnexal epithelial proliferations - Sebaceous": "UNK",
    "Benign epidermal proliferations": "UNK",
    "Melanoacanthoma": "BKL",  # seborrheic keratosis, lentigines, LPLK, PBK: above
    "Benign melanocytic proliferations": "NV",  # lentigo simplex: BKL, above
    "Benign soft tissue proliferations - Adipocytic": "UNK",
    "Benign soft tissue proliferations - Cartilagenous and ossifying": "UNK",
    "Benign soft tissue proliferations - Fibro-histiocytic": "UNK",  # dermatofibroma: DF, above
    "Benign soft tissue proliferations - Muscle tissue or myofibroblastic": "UNK",
    "Benign soft tissue proliferations - Myoepithelial": "UNK",
    "Benign soft tissue proliferations - Neural": "UNK",
    "Benign soft tissue proliferations - Vascular": "VASC",
    "Collision - Only benign proliferations": "UNK",
    "Cysts": "UNK",
    "Exogenous": "UNK",
    "Flat melanotic pigmentations - not melanocytic nevus": "UNK",
    "Ink-spot lentigo": "BKL",  # a solar lentigo; lentigo NOS: BKL, above
    "Hemorrhagic lesions": "VASC",
    "Inflammatory or infectious diseases": "UNK",
    "Langerhans cell proliferations": "UNK",
    "Mast cell proliferations": "UNK",
    "Indeterminate epidermal proliferations": "AK",
    "Solar or actinic keratosis": "AK",
    "Collision - At least one malignant proliferation": "MEL",
    "Lymphocytic proliferations - B-Cell": "UNK",
    "Lymphocytic proliferations - T-Cell/NK": "UNK",
    "Malignant adnexal epithelial proliferations - Apocrine or Eccrine": "UNK",
    "Malignant adnexal epithelial proliferations - Follicular": "UNK",
    "Baso-squamous carcinoma": "BCC",  # basal cell carcinoma: BCC, above
    "Malignant adnexal epithelial proliferations - Sebaceous": "UNK",
    "Malignant epidermal proliferations": "SCC",
    "Squamous cell carcinoma in situ": "SCC",
    "Squamous cell carcinoma, NOS": "SCC",
    "Squamous cell carcinoma, Invasive": "SCC",
    "Malignant melanocytic proliferations (Melanoma)": "MEL",
    "Melanoma Invasive": "MEL",  # also listed: a row may give diagnosis_3 without diagnosis_2
    "Melanoma in situ": "MEL",
    "Melanoma, NOS": "MEL",
    "Malignant soft tissue proliferations - Adipocytic": "UNK",
    "Malignant soft tissue proliferations - Cartilagenous and ossifying": "UNK",
    "Malignant soft tissue proliferations - Fibro-histiocytic": "UNK",
    "Malignant soft tissue proliferations - Muscle tissue or myofibroblastic": "UNK",
    "Malignant soft tissue proliferations - Myoepithelial": "UNK",
    "Malignant soft tissue proliferations - Neural": "UNK",
    "Malignant soft tissue proliferations - Unknown or other histiogenesis": "UNK",
    "Malignant soft tissue proliferations - Vascular": "UNK",  # Kaposi sarcoma, angiosarcoma
    "Merkel cell proliferation": "UNK",
    "Skin metastasis of internal solid cancer - non-hematological": "UNK",
})

# Diagnoses deliberately given no code (the record is skipped with this reason as its
# problem): labels that cannot say whether the lesion is a melanoma.
EXCLUDED_DIAGNOSES: dict[str, str] = _vocabulary({
    "Malignant": "malignant without a diagnosis: melanoma or not is unknown",
    "Indeterminate": "indeterminate without a diagnosis",
    "Indeterminate melanocytic proliferations": (
        "an indeterminate melanocytic tumour (atypical Spitz tumour, AIMP, MELTUMP, SAMPUS), neither a melanoma "
        "nor a nevus label"
    ),
    "AIMP": "an indeterminate melanocytic tumour (atypical intraepithelial melanocytic proliferation)",
    "atypical spitz tumor": "an indeterminate melanocytic tumour",
})
if set(EXCLUDED_DIAGNOSES) & set(DIAGNOSIS_SYNONYMS):
    raise ValueError("a diagnosis is both mapped and excluded")


def site(raw: object) -> tuple[str | None, str | None]:
    """(anatomical site in schema vocabulary or None, complaint or None) for a site text."""
    text = _clean(raw)
    if text in _EMPTY:
        return None, None
    if text in SITE_SYNONYMS:
        return SITE_SYNONYMS[text], None
    return None, f"unknown anatomical site {raw!r} (expected one of {', '.join(SITES)})"


def sex(raw: object) -> tuple[str | None, str | None]:
    """(male, female or None, complaint or None) for a sex text."""
    text = _clean(raw)
    if text in _EMPTY:
        return None, None
    mapped = {"male": "male", "m": "male", "female": "female", "f": "female"}.get(text)
    if mapped:
        return mapped, None
    return None, f"unknown sex {raw!r} (expected male or female)"


def age(raw: object) -> tuple[float, str | None]:
    """(age in years or NaN, complaint or None) for an age text ("45", "45.0", DICOM "045Y")."""
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
    """The ISIC 2019 code of a diagnosis text; an archive path ("Benign:...:Nevus") is read
    from its deepest name up. Excluded and unknown diagnoses are complaints."""
    text = _clean(raw)
    if text == "" or text in {"nan", "none"}:
        return None, None
    code, reason = _lookup(text)
    if code is not None:
        return code, None
    return None, f"diagnosis {raw!r} is excluded: {reason}" if reason else f"unknown diagnosis {raw!r}"


def excluded(raw: object) -> bool:
    """True when `raw` is a diagnosis deliberately left without a code (EXCLUDED_DIAGNOSES)."""
    return _lookup(_clean(raw))[1] is not None


def _lookup(text: str) -> tuple[str | None, str | None]:
    """(code, None), (None, why it is excluded) or (None, None) for a cleaned text."""
    for name in reversed(text.split(":")):
        name = name.strip()
        if name in EXCLUDED_DIAGNOSES:
            return None, EXCLUDED_DIAGNOSES[name]
        if name in DIAGNOSIS_SYNONYMS:
            return DIAGNOSIS_SYNONYMS[name], None
    return None, None


def melanoma_from(diagnosis_code: str | None) -> float:
    """1.0 for MEL, 0.0 for any other diagnosis code, NaN when unlabelled."""
    if diagnosis_code is None:
        return math.nan
    return 1.0 if diagnosis_code == "MEL" else 0.0
