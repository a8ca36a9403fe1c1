"""Vocabulary mapping: sites, ages, sexes and diagnoses of every source onto the schema."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dermsight.data import harmonise
from dermsight.data.records import RecordBuilder
from dermsight.data.schema import DIAGNOSES, RECORD_COLUMNS, SITES


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("abdomen", "torso"),  # HAM10000
        ("back", "torso"),
        ("trunk", "torso"),
        ("scalp", "head/neck"),
        ("ear", "head/neck"),
        ("foot", "lower extremity"),
        ("hand", "upper extremity"),
        ("acral", "palms/soles"),
        ("genital", "oral/genital"),
        ("anterior torso", "torso"),  # ISIC 2019
        ("posterior torso", "torso"),
        ("lateral torso", "torso"),
        ("head/neck", "head/neck"),  # ISIC 2020
        ("palms/soles", "palms/soles"),
        ("upper_extremity", "upper extremity"),
        ("LOWER EXTREMITY", "lower extremity"),  # DICOM BodyPartExamined, upper case
        ("HEAD_NECK", "head/neck"),  # DICOM CS cannot hold "/"
        ("PALMS SOLES", "palms/soles"),
        ("  Oral / Genital ", "oral/genital"),
    ],
)
def test_site_synonyms(raw, expected):
    assert harmonise.site(raw) == (expected, None)


@pytest.mark.parametrize("raw", ["", "unknown", None, float("nan"), "NaN"])
def test_empty_site_is_missing_without_complaint(raw):
    assert harmonise.site(raw) == (None, None)


def test_unknown_site_is_a_complaint_naming_the_value():
    value, complaint = harmonise.site("left elbow")
    assert value is None
    assert "'left elbow'" in complaint and "lower extremity" in complaint


def test_every_site_in_the_real_metadata_is_understood(shared):
    """Every localisation HAM10000, ISIC 2019 and ISIC 2020 actually use maps to a site."""
    columns = [
        (shared / "ham10000" / "HAM10000_metadata.csv", "localization"),
        (shared / "isic2019" / "ISIC_2019_Training_Metadata.csv", "anatom_site_general"),
        (shared / "isic2020" / "train.csv", "anatom_site_general_challenge"),
        (shared / "isic2020" / "test.csv", "anatom_site_general_challenge"),
    ]
    seen = set()
    for path, column in columns:
        values = pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False)[column].unique()
        for raw in values:
            site, complaint = harmonise.site(raw)
            assert complaint is None, f"{path.name}: {complaint}"
            assert site is None or site in SITES
            seen.add(site)
    assert seen == {None, *SITES}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("45", 45.0), ("45.0", 45.0), (" 70.0 ", 70.0), ("045Y", 45.0), ("085Y", 85.0), (60, 60.0), (0, 0.0), ("120", 120.0)],
)
def test_ages(raw, expected):
    assert harmonise.age(raw) == (expected, None)


@pytest.mark.parametrize("raw", ["", "unknown", None, float("nan")])
def test_empty_age_is_nan_without_complaint(raw):
    value, complaint = harmonise.age(raw)
    assert math.isnan(value) and complaint is None


@pytest.mark.parametrize(
    ("raw", "words"),
    [("-5", "outside 0-120"), ("300", "outside 0-120"), ("120.5", "outside"), ("abc", "not a number"), ("4O", "not a number")],
)
def test_bad_ages_are_nan_with_a_complaint(raw, words):
    value, complaint = harmonise.age(raw)
    assert math.isnan(value)
    assert words in complaint and repr(raw) in complaint


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("M", "male"), ("F", "female"), ("male", "male"), ("Female", "female"), (" f ", "female"), ("unknown", None), ("", None)],
)
def test_sexes(raw, expected):
    assert harmonise.sex(raw) == (expected, None)


def test_unknown_sex_is_a_complaint():
    value, complaint = harmonise.sex("O")
    assert value is None and "'O'" in complaint


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("akiec", "AK"),
        ("mel", "MEL"),
        ("nv", "NV"),
        ("bkl", "BKL"),
        ("seborrheic keratosis", "BKL"),
        ("pigmented benign keratosis", "BKL"),
        ("lichen planus-like keratosis", "BKL"),
        ("lentigo NOS", "BKL"),
        ("unknown", "UNK"),  # ISIC 2020: benign, no specific diagnosis
        ("cafe-au-lait macule", "UNK"),
        ("squamous cell carcinoma", "SCC"),
        ("SCC", "SCC"),
        ("Solar or actinic keratosis", "AK"),  # ISIC Archive taxonomy (isic-cli)
        ("Squamous cell carcinoma in situ", "SCC"),
        ("Hemangioma", "VASC"),
    ],
)
def test_diagnosis_synonyms(raw, expected):
    assert harmonise.diagnosis(raw) == (expected, None)


def test_unknown_diagnosis_is_a_complaint():
    assert harmonise.diagnosis("wart") == (None, "unknown diagnosis 'wart'")
    assert harmonise.diagnosis("") == (None, None)


def test_no_vocabulary_key_is_given_twice():
    """Keys that clean to the same text ("upper_extremity", "upper extremity") are refused
    rather than silently merged, whichever value the last one carries."""
    with pytest.raises(ValueError, match="given twice"):
        harmonise._vocabulary({"upper extremity": "upper extremity"}, {"upper_extremity": "upper extremity"})
    with pytest.raises(ValueError, match="given twice"):
        harmonise._vocabulary({"Lichen planus-like keratosis": "BKL", "lichen planus like keratosis": "UNK"})
    assert not set(harmonise.EXCLUDED_DIAGNOSES) & set(harmonise.DIAGNOSIS_SYNONYMS)


ARCHIVE_POLICY = [
    ("Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma Invasive:Melanoma Invasive, Nodular", "MEL"),
    ("Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma in situ", "MEL"),
    ("Malignant:Collision - At least one malignant proliferation", "MEL"),
    ("Benign:Benign melanocytic proliferations:Nevus:Blue nevus:Blue nevus, Cellular", "NV"),
    ("Benign:Benign melanocytic proliferations:Lentigo simplex", "BKL"),
    ("Benign:Benign epidermal proliferations:Seborrheic keratosis", "BKL"),
    ("Benign:Benign epidermal proliferations:Porokeratosis", "UNK"),
    ("Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma", "DF"),
    ("Benign:Benign soft tissue proliferations - Fibro-histiocytic:Scar", "UNK"),
    ("Benign:Benign soft tissue proliferations - Vascular:Pyogenic granuloma", "VASC"),
    ("Benign:Hemorrhagic lesions:Hemorrhage", "VASC"),
    ("Indeterminate:Indeterminate epidermal proliferations:Solar or actinic keratosis", "AK"),
    ("Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma", "BCC"),
    ("Malignant:Malignant adnexal epithelial proliferations - Follicular:Baso-squamous carcinoma", "BCC"),
    ("Malignant:Malignant epidermal proliferations:Keratoacanthoma", "SCC"),
    ("Malignant:Malignant epidermal proliferations:Squamous cell carcinoma in situ", "SCC"),
    ("Malignant:Malignant soft tissue proliferations - Vascular:Kaposi sarcoma", "UNK"),
    ("Malignant:Merkel cell proliferation:Merkel cell carcinoma", "UNK"),
    ("Benign", "UNK"),
    ("Melanoma Invasive", "MEL"),  # diagnosis_3 alone
    ("Malignant", None),
    ("Indeterminate", None),
    ("Indeterminate:Indeterminate melanocytic proliferations:Atypical Spitz tumor", None),
    ("Indeterminate:Indeterminate melanocytic proliferations:Melanocytic tumor of uncertain malignant potential", None),
]


@pytest.mark.parametrize(("raw", "expected"), ARCHIVE_POLICY)
def test_archive_diagnosis_policy(raw, expected):
    code, complaint = harmonise.diagnosis(raw)
    assert code == expected
    assert (complaint is None) == (expected is not None)
    if expected is None:
        assert harmonise.excluded(raw) and f"diagnosis {raw!r} is excluded: " in complaint


def test_every_archive_diagnosis_is_mapped_or_deliberately_excluded():
    """The ISIC Archive's whole vocabulary (isic-metadata 4.12.0): every value of its
    diagnosis hierarchy and of its legacy field has an ISIC 2019 code or is in the
    exclusion set; MEL is exactly what the archive itself counts as melanoma."""
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
    from isic_metadata.fields import LegacyDxEnum

    excluded = []
    for member in DiagnosisEnum:
        code, complaint = harmonise.diagnosis(member.value)
        if code is None:
            assert complaint and "is excluded" in complaint, complaint
            assert any(harmonise._clean(name) in harmonise.EXCLUDED_DIAGNOSES for name in member.value.split(":"))
            excluded.append(member.value)
        else:
            assert code in DIAGNOSES and complaint is None
            assert (code == "MEL") == DiagnosisEnum.is_melanoma(member.value), member.value
    assert len(DiagnosisEnum) == 418
    assert sorted(excluded) == sorted(
        v.value for v in DiagnosisEnum
        if v.value in ("Malignant", "Indeterminate") or v.value.startswith("Indeterminate:Indeterminate melanocytic")
    )
    for member in LegacyDxEnum:
        code, complaint = harmonise.diagnosis(member.value)
        assert code in DIAGNOSES or member.value in ("AIMP", "atypical spitz tumor"), (member.value, complaint)
        assert (code == "MEL") == member.value.startswith("melanoma"), member.value


def test_every_diagnosis_in_isic2020_train_is_understood(shared):
    values = pd.read_csv(shared / "isic2020" / "train.csv", usecols=["diagnosis"], dtype=str)["diagnosis"].unique()
    mapped = {value: harmonise.diagnosis(value) for value in values}
    assert all(complaint is None and code in DIAGNOSES for code, complaint in mapped.values()), mapped
    assert mapped["melanoma"][0] == "MEL" and mapped["nevus"][0] == "NV" and mapped["unknown"][0] == "UNK"


def test_melanoma_target_follows_the_diagnosis():
    assert harmonise.melanoma_from("MEL") == 1.0
    assert harmonise.melanoma_from("NV") == 0.0
    assert harmonise.melanoma_from("UNK") == 0.0
    assert math.isnan(harmonise.melanoma_from(None))


def test_builder_keeps_the_record_and_names_the_row_for_each_bad_value():
    builder = RecordBuilder("test")
    builder.add("meta.csv line 7", image_id="ISIC_1", image_ref=None, age="300", sex="X", site="elbow", label="nv")
    builder.add("meta.csv line 8", image_id="ISIC_2", image_ref=None, age="045Y", sex="F", site="acral", label="mel")
    builder.add("meta.csv line 9", image_id="ISIC_3", image_ref=None, label="wart")
    builder.add("meta.csv line 10", image_id="", image_ref=None, label="nv")
    loaded = builder.loaded()

    assert list(loaded.records.columns) == list(RECORD_COLUMNS)
    assert loaded.records["image_id"].tolist() == ["ISIC_1", "ISIC_2"]
    first, second = loaded.records.to_dict("records")
    assert math.isnan(first["age"]) and first["sex"] is None and first["site"] is None and first["diagnosis"] == "NV"
    assert (second["age"], second["sex"], second["site"], second["diagnosis"], second["melanoma"]) == (
        45.0, "female", "palms/soles", "MEL", 1.0,
    )
    kinds = [(p.kind, p.where, p.skipped) for p in loaded.problems]
    assert kinds == [
        ("bad_age", "meta.csv line 7", False),
        ("bad_sex", "meta.csv line 7", False),
        ("bad_site", "meta.csv line 7", False),
        ("bad_diagnosis", "meta.csv line 9", True),
        ("missing_id", "meta.csv line 10", True),
    ]
    assert "set to missing" in loaded.problems[0].message
