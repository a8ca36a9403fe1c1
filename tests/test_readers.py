"""Every reader on the real shared datasets: counts, labels, metadata, image paths."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from dermsight.data import readers
from dermsight.data.schema import RECORD_COLUMNS
from dermsight.data.sources import detect_format, parse_source, read_source

HAM_CLASSES = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
HAM_CODES = {"nv": "NV", "mel": "MEL", "bkl": "BKL", "bcc": "BCC", "akiec": "AK", "vasc": "VASC", "df": "DF"}
ISIC9_FOLDERS = {
    "actinic keratosis": 114,
    "basal cell carcinoma": 378,
    "dermatofibroma": 95,
    "melanoma": 438,
    "nevus": 357,
    "pigmented benign keratosis": 462,
    "seborrheic keratosis": 77,
    "squamous cell carcinoma": 181,
    "vascular lesion": 139,
}
ISIC2019_CLASSES = {"MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628}


def _schema_ok(records: pd.DataFrame) -> None:
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert records["image_id"].notna().all()
    assert records["age"].dtype == float and records["melanoma"].dtype == float


# --- HAM10000 -------------------------------------------------------------------------


def test_ham10000_counts(ham):
    records = ham.records
    _schema_ok(records)
    assert len(records) == 10_015
    assert records["image_id"].is_unique
    assert records["lesion_id"].nunique() == 7_470
    per_lesion = records.groupby("lesion_id").size()
    assert (per_lesion >= 2).sum() == 1_956 and per_lesion.max() == 6
    assert dict(Counter(records["original_label"])) == HAM_CLASSES
    assert dict(Counter(records["diagnosis"])) == {HAM_CODES[k]: n for k, n in HAM_CLASSES.items()}
    assert records["melanoma"].sum() == 1_113
    assert (records["source"] == "ham10000").all()
    assert ham.problems == []


def test_ham10000_akiec_is_ak_and_keeps_its_label(ham):
    akiec = ham.records[ham.records["original_label"] == "akiec"]
    assert len(akiec) == 327 and set(akiec["diagnosis"]) == {"AK"} and (akiec["melanoma"] == 0).all()


def test_ham10000_record_fields(ham, shared):
    row = ham.records.set_index("image_id").loc["ISIC_0027419"]
    assert row["lesion_id"] == "HAM_0000118"
    assert (row["age"], row["sex"], row["site"], row["diagnosis"]) == (80.0, "male", "head/neck", "BKL")  # scalp
    assert Path(row["image_ref"]) == shared / "ham10000" / "images" / "ISIC_0027419.jpg"
    assert row["patient_id"] is None
    # Every record points at its own real image file.
    refs = ham.records["image_ref"]
    assert all(Path(ref).stem == image_id for ref, image_id in zip(refs, ham.records["image_id"]))
    assert all(Path(ref).is_file() for ref in refs.iloc[::500])
    # 'unknown' sex/site and empty ages are missing values, not problems.
    assert ham.records["age"].isna().sum() == 57 and ham.records["site"].isna().sum() == 234


# --- 9-class teaching set ------------------------------------------------------------------


def test_isic9_folder_counts(isic9):
    records = isic9.records
    _schema_ok(records)
    assert len(records) == 2_241
    assert dict(Counter(records["original_label"])) == ISIC9_FOLDERS
    assert isic9.problems == []
    assert all(Path(ref).parent.name == label for ref, label in zip(records["image_ref"], records["original_label"]))


def test_isic9_both_keratoses_are_bkl_with_their_folder_name_kept(isic9):
    records = isic9.records
    bkl = records[records["diagnosis"] == "BKL"]
    assert Counter(bkl["original_label"]) == {"pigmented benign keratosis": 462, "seborrheic keratosis": 77}
    assert dict(Counter(records["diagnosis"])) == {
        "AK": 114, "BCC": 378, "DF": 95, "MEL": 438, "NV": 357, "BKL": 539, "SCC": 181, "VASC": 139,
    }
    assert records.loc[records["diagnosis"] == "MEL", "melanoma"].eq(1).all()
    assert records.loc[records["diagnosis"] != "MEL", "melanoma"].eq(0).all()


# --- SIIM-ISIC 2020 -----------------------------------------------------------------------


def test_isic2020_folder_reads_the_csvs_that_have_images(isic2020, shared):
    records = isic2020.records
    _schema_ok(records)
    part = records["image_ref"].map(lambda ref: Path(ref).parent.name)
    assert Counter(part) == {"train_sample": 203, "train_extra": 684, "test_128": 5_545}
    assert records.loc[part == "train_sample", "patient_id"].nunique() == 183
    assert records.loc[part == "train_extra", "patient_id"].nunique() == 486
    assert records.loc[part == "test_128", "patient_id"].nunique() == 344
    assert records["patient_id"].nunique() == 934  # 79 patients have images in both training subsets
    assert records["patient_id"].str.startswith("IP_").all()
    assert records["melanoma"].sum() == 3 + 419
    extra = records[part == "train_extra"]
    assert extra["diagnosis"].value_counts().to_dict() == {"MEL": 419, "UNK": 220, "NV": 45}
    assert set(records.loc[records["melanoma"] == 1, "diagnosis"]) == {"MEL"}
    train = records[part == "train_sample"]
    assert train["diagnosis"].notna().all() and set(train["melanoma"]) == {0.0, 1.0}
    test = records[part == "test_128"]
    assert test["diagnosis"].isna().all() and test["melanoma"].isna().all()
    assert (records["source"] == "isic2020").all()


def test_isic2020_csvs_without_images_are_reported(isic2020, shared):
    no_images = {Path(p.where).name: p for p in isic2020.problems if p.kind == "no_images"}
    assert {"train.csv", "test.csv"} <= set(no_images)
    assert "33126 rows" in no_images["train.csv"].message and "10982 rows" in no_images["test.csv"].message
    assert all(p.skipped for p in no_images.values())
    assert {p.kind for p in isic2020.problems} == {"no_images"}  # no missing-image noise from the subsets
    # Exactly the images of the three subsets on disk; nothing from train.csv/test.csv only.
    subsets = [pd.read_csv(shared / "isic2020" / f"{name}.csv", dtype=str) for name in ("train_sample", "train_extra", "test_128")]
    assert set(isic2020.records["image_id"]) == set(pd.concat(subsets)["image_name"])


def test_isic2020_record_fields(isic2020):
    row = isic2020.records.set_index("image_id").loc["ISIC_0015719"]
    assert (row["patient_id"], row["sex"], row["age"], row["site"]) == ("IP_3075186", "female", 45.0, "upper extremity")
    assert (row["diagnosis"], row["original_label"], row["melanoma"]) == ("UNK", "unknown", 0.0)
    test_row = isic2020.records.set_index("image_id").loc["ISIC_0052349"]
    assert (test_row["patient_id"], test_row["sex"], test_row["age"], test_row["site"]) == (
        "IP_7782715", "male", 40.0, "lower extremity",
    )
    assert test_row["diagnosis"] is None and math.isnan(test_row["melanoma"])


# --- label-only sources ---------------------------------------------------------------------


def test_isic2019_is_labels_and_metadata_only(shared):
    loaded = readers.read_isic2019(shared / "isic2019")
    records = loaded.records
    _schema_ok(records)
    assert len(records) == 25_331
    assert records["image_ref"].isna().all()
    assert dict(Counter(records["diagnosis"])) == ISIC2019_CLASSES
    assert [(p.kind, Path(p.where).name) for p in loaded.problems] == [("no_images", "ISIC_2019_Training_GroundTruth.csv")]
    row = records.set_index("image_id").loc["ISIC_0000000"]
    assert (row["age"], row["sex"], row["site"], row["diagnosis"]) == (55.0, "female", "torso", "NV")  # anterior torso


def test_isic2018_is_labels_only_with_lesion_groups(shared, ham):
    loaded = readers.read_isic2018(shared / "isic2018")
    records = loaded.records
    _schema_ok(records)
    assert len(records) == 10_015 + 193
    assert records["image_ref"].isna().all()
    assert sorted(Path(p.where).name for p in loaded.problems if p.kind == "no_images") == [
        "ISIC2018_Task3_Training_GroundTruth.csv",
        "ISIC2018_Task3_Validation_GroundTruth.csv",
    ]
    # The training set is HAM10000: same labels, same lesion groups.
    training = records.iloc[:10_015].set_index("image_id")
    ham_records = ham.records.set_index("image_id").loc[training.index]
    assert (training["diagnosis"] == ham_records["diagnosis"]).all()
    assert (training["lesion_id"] == ham_records["lesion_id"]).all()
    assert records.iloc[10_015:]["lesion_id"].isna().all()


# --- format detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("ham10000", "ham10000"),
        ("ham10000/HAM10000_metadata.csv", "ham10000"),
        ("isic9/train", "folders"),
        ("isic2020", "isic2020"),
        ("isic2020/train_sample.csv", "isic2020"),
        ("isic2019", "isic2019"),
        ("derm7pt", "derm7pt"),
        ("isic2017", "isic-cli"),
        ("isic2018", "isic2018"),
    ],
)
def test_detect_format(shared, relative, expected):
    assert detect_format(shared / relative) == expected


def test_read_source_with_explicit_format_and_single_csv(shared):
    assert parse_source(f"folders:{shared / 'isic9' / 'train'}") == ("folders", shared / "isic9" / "train")
    loaded = read_source(str(shared / "isic2020" / "train_sample.csv"))
    assert len(loaded.records) == 203 and loaded.records["image_ref"].notna().all()
    assert loaded.records["patient_id"].nunique() == 183 and loaded.records["melanoma"].sum() == 3


# --- Derm7pt and the ISIC 2017-era archive export ---------------------------------------------


def test_derm7pt_reads_the_dermoscopic_image_of_every_case(shared):
    loaded = readers.read_derm7pt(shared / "derm7pt")
    records = loaded.records
    _schema_ok(records)
    assert len(records) == 616 and loaded.problems == []
    assert records["image_id"].is_unique and (records["source"] == "derm7pt").all()
    assert records["lesion_id"].equals(records["image_id"])  # one case = one lesion
    assert records["diagnosis"].value_counts().to_dict() == {
        "NV": 356, "MEL": 151, "BKL": 38, "BCC": 26, "UNK": 16, "VASC": 16, "DF": 13,
    }
    # every melanoma depth class is MEL, every nevus subtype NV; the source's own text is kept
    by_label = records.groupby("original_label")["diagnosis"].first().to_dict()
    assert {by_label[k] for k in by_label if k.startswith("melanoma")} == {"MEL"}
    assert {by_label[k] for k in by_label if k.endswith("nevus")} == {"NV"}
    assert (by_label["lentigo"], by_label["seborrheic keratosis"], by_label["melanosis"]) == ("BKL", "BKL", "UNK")
    assert records["melanoma"].sum() == 151
    # Derm7pt's body sites in the ISIC 2020 vocabulary; no age
    assert records["site"].value_counts().to_dict() == {
        "torso": 320, "lower extremity": 118, "upper extremity": 83, "head/neck": 50, "palms/soles": 38, "oral/genital": 7,
    }
    assert records["age"].isna().all() and records["sex"].value_counts().to_dict() == {"female": 317, "male": 299}


def test_derm7pt_clinical_photos_never_become_records(shared):
    records = readers.read_derm7pt(shared / "derm7pt").records
    photos = readers.derm7pt_clinical_photos(shared / "derm7pt")
    meta = pd.read_csv(shared / "derm7pt" / "meta" / "meta.csv")
    assert len(photos) == 616 - 7  # seven cases' "clinic" field is their dermoscopic image
    assert set(photos["image_id"]) <= set(records["image_id"])
    assert set(photos["clinical_ref"]).isdisjoint(records["image_ref"])
    assert all(Path(ref).is_file() for ref in photos["clinical_ref"])
    derm = {str(shared / "derm7pt" / "images" / p) for p in meta["derm"]}
    assert set(records["image_ref"]) == derm
    combined = read_source(str(shared / "derm7pt")).records
    assert set(combined["image_ref"]).isdisjoint(photos["clinical_ref"])


def test_derm7pt_bad_rows_are_problems(tmp_path, shared):
    root = tmp_path / "derm7pt"
    (root / "meta").mkdir(parents=True)
    (root / "images").symlink_to(shared / "derm7pt" / "images")
    meta = pd.read_csv(shared / "derm7pt" / "meta" / "meta.csv", dtype=str, keep_default_na=False).head(6)
    meta.loc[0, "diagnosis"] = "blue-green thing"
    meta.loc[1, "derm"] = "NEL/missing.jpg"
    meta.loc[2, "location"] = "elbow pit"
    meta.loc[3, "case_num"] = ""
    meta.loc[4, "derm"] = "../../../etc/passwd"
    meta.to_csv(root / "meta" / "meta.csv", index=False)
    loaded = readers.read_derm7pt(root)
    kinds = Counter(p.kind for p in loaded.problems)
    assert kinds == {"bad_diagnosis": 1, "missing_image": 2, "bad_site": 1, "missing_id": 1}
    assert len(loaded.records) == 4 and loaded.records["image_ref"].isna().sum() == 2
    assert all("meta.csv line" in p.where for p in loaded.problems)
    (root / "meta" / "meta.csv").write_text("case_num,diagnosis\n1,melanoma\n")
    with pytest.raises(readers.SourceError, match="missing required column"):
        readers.read_derm7pt(root)


def test_isic2017_archive_export_reads_as_isic_cli(shared):
    assert detect_format(shared / "isic2017") == "isic-cli"
    loaded = read_source(str(shared / "isic2017"))
    records = loaded.records
    _schema_ok(records)
    assert len(records) == 1_846 and records["image_ref"].notna().all()
    assert records["diagnosis"].value_counts().to_dict() == {"NV": 1_316, "BKL": 296, "MEL": 234}
    assert records["melanoma"].sum() == 234 and (records["source"] == "isic_archive").all()
    assert records["lesion_id"].nunique() == 652


def test_isic_cli_export_of_the_current_archive(tmp_path, shared):
    """A small export as `isic image download` writes it (metadata.csv with the archive's
    diagnosis_1..4 levels, images beside it), of real ISIC images: codes, targets, metadata
    and ids come through; an excluded diagnosis is a problem naming why, never a silent loss."""
    rows = [
        # isic_id, diagnosis_1..4, age_approx, sex, anatom_site_general, lesion_id, patient_id
        ("ISIC_0000000", "Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive",
         "Melanoma Invasive, Superficial spreading", "55", "female", "anterior torso", "IL_0000001", "IP_0000001"),
        ("ISIC_0000001", "Benign", "", "Nevus", "", "30", "male", "posterior torso", "IL_0000002", "IP_0000001"),
        ("ISIC_0000002", "Malignant", "", "Melanoma Invasive", "", "70", "male", "head/neck", "IL_0000003",
         "IP_0000002"),
        ("ISIC_0000003", "Malignant", "Malignant epidermal proliferations", "Keratoacanthoma", "", "", "", "",
         "IL_0000004", "IP_0000003"),
        ("ISIC_0000004", "Benign", "", "", "", "45", "female", "lower extremity", "", "IP_0000003"),
        ("ISIC_0000006", "Indeterminate", "Indeterminate melanocytic proliferations", "Atypical Spitz tumor", "",
         "15", "female", "upper extremity", "IL_0000006", "IP_0000004"),
    ]
    columns = ["isic_id", "diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "age_approx", "sex",
               "anatom_site_general", "lesion_id", "patient_id"]
    export = tmp_path / "export"
    export.mkdir()
    pd.DataFrame(rows, columns=columns).to_csv(export / "metadata.csv", index=False)
    for row in rows:
        (export / f"{row[0]}.jpg").write_bytes((shared / "isic2017" / "images" / f"{row[0]}.jpg").read_bytes())
    (export / "attribution.txt").write_text("Anonymous\n")

    assert detect_format(export) == "isic-cli"
    loaded = read_source(str(export))
    records = loaded.records.set_index("image_id")
    _schema_ok(loaded.records)
    assert (loaded.records["source"] == "isic_archive").all()
    assert list(records.index) == [r[0] for r in rows[:5]]
    assert records["diagnosis"].to_dict() == {
        "ISIC_0000000": "MEL", "ISIC_0000001": "NV", "ISIC_0000002": "MEL", "ISIC_0000003": "SCC",
        "ISIC_0000004": "UNK",
    }
    assert records["melanoma"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert records.loc["ISIC_0000000", "original_label"] == ":".join(rows[0][1:5])  # the archive's own path
    assert records.loc["ISIC_0000001", "original_label"] == "Benign:Nevus"
    assert records["site"].tolist() == ["torso", "torso", "head/neck", None, "lower extremity"]
    assert records["sex"].tolist() == ["female", "male", "male", None, "female"]
    assert records["age"].tolist()[:3] == [55.0, 30.0, 70.0] and math.isnan(records.loc["ISIC_0000003", "age"])
    assert records["lesion_id"].tolist() == ["IL_0000001", "IL_0000002", "IL_0000003", "IL_0000004", None]
    assert records["patient_id"].tolist() == ["IP_0000001", "IP_0000001", "IP_0000002", "IP_0000003", "IP_0000003"]
    assert records["image_ref"].tolist() == [str(export / f"{r[0]}.jpg") for r in rows[:5]]
    (problem,) = loaded.problems
    where = f"{export / 'metadata.csv'} line 7"
    assert (problem.kind, problem.skipped, problem.where) == ("bad_diagnosis", True, where)
    assert "is excluded: an indeterminate melanocytic tumour" in problem.message
