"""DICOM and TFRecord inputs in the SIIM-ISIC 2020 layouts, built in tmp_path from real
ISIC JPEGs (no real files of these formats are available)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from dermsight.data import harmonise
from dermsight.data.dicom import read_dicom_folder
from dermsight.data.schema import RECORD_COLUMNS
from dermsight.data.sources import detect_format, read_source
from dermsight.data.summary import summarise
from dermsight.data.tfrecord import read_tfrecords
from dermsight.imaging.decode import ImageError, decode_file, decode_image, read_image_bytes

# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def dicom_bytes(
    jpeg: bytes | None, *, compressed: bool, tags: dict | None = None, pixel_data: bool = True, rgb: np.ndarray | None = None
) -> bytes:
    """A single-frame DICOM like the SIIM-ISIC 2020 .dcm files, holding the JPEG's picture:
    JPEG Baseline encapsulated (the JPEG itself, YBR_FULL_422) or uncompressed RGB."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compressed else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "XC"
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    rgb = decode_image(jpeg) if rgb is None else rgb
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixel_data and compressed:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    elif pixel_data:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = rgb.tobytes()
    else:
        ds.PhotometricInterpretation = "RGB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def siim_tags(row) -> dict:
    """The patient tags SIIM-ISIC 2020 wrote, from a train_sample.csv row."""
    tags = {"PatientID": row["patient_id"], "PatientSex": {"female": "F", "male": "M"}[row["sex"]]}
    tags["PatientAge"] = f"{int(float(row['age_approx'])):03d}Y"
    if row["anatom_site_general_challenge"]:
        tags["BodyPartExamined"] = row["anatom_site_general_challenge"].upper().replace("/", " ")
    return tags


def expected_fields(row) -> tuple:
    """(patient_id, sex, age, site) harmonised from the CSV row."""
    return (
        row["patient_id"],
        row["sex"],
        float(row["age_approx"]),
        harmonise.site(row["anatom_site_general_challenge"])[0],
    )


@pytest.fixture(scope="module")
def dicom_rows(train_sample):
    """Eight real train_sample images: both sexes, a head/neck and a missing site, a melanoma."""
    melanoma = train_sample[train_sample["target"] == "1"].head(1)
    head = train_sample[train_sample["anatom_site_general_challenge"] == "head/neck"].head(1)
    no_site = train_sample[train_sample["anatom_site_general_challenge"] == ""].head(1)
    rest = train_sample.drop(melanoma.index.union(head.index).union(no_site.index)).head(5)
    rows = [*melanoma.to_dict("records"), *head.to_dict("records"), *no_site.to_dict("records"), *rest.to_dict("records")]
    assert len(rows) == 8 and {r["sex"] for r in rows} == {"female", "male"}
    return rows


def test_uncompressed_rgb_dicom_has_exactly_the_jpeg_pixels(train_sample):
    jpeg = train_sample["path"][0].read_bytes()
    data = dicom_bytes(jpeg, compressed=False)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    pixels = decode_image(data, name="x.dcm")
    assert pixels.dtype == np.uint8 and pixels.shape == decode_image(jpeg).shape
    assert np.array_equal(pixels, decode_image(jpeg))


def test_jpeg_baseline_dicom_pixels_match_the_jpeg(train_sample):
    jpeg = train_sample["path"][1].read_bytes()
    data = dicom_bytes(jpeg, compressed=True)
    dataset = pydicom.dcmread(io.BytesIO(data))
    assert dataset.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert len(data) < len(jpeg) + 2_000  # the JPEG, encapsulated: not raw pixels
    expected = decode_image(jpeg).astype(int)
    pixels = decode_image(data, name="x.dcm").astype(int)
    assert pixels.shape == expected.shape
    # YCbCr -> RGB exactly once: a second conversion would be off by tens of levels.
    assert np.abs(pixels - expected).mean() < 1.0
    assert np.abs(pixels - expected).max() <= 16


def test_read_dicom_folder_takes_patient_tags(tmp_path, dicom_rows):
    for i, row in enumerate(dicom_rows):
        data = dicom_bytes(row["path"].read_bytes(), compressed=i % 2 == 0, tags=siim_tags(row))
        (tmp_path / f"{row['image_name']}.dcm").write_bytes(data)
    assert detect_format(tmp_path) == "dicom"
    loaded = read_dicom_folder(tmp_path)
    assert loaded.problems == []
    records = loaded.records.set_index("image_id")
    assert list(loaded.records.columns) == list(RECORD_COLUMNS)
    assert sorted(records.index) == sorted(r["image_name"] for r in dicom_rows)
    for row in dicom_rows:
        record = records.loc[row["image_name"]]
        assert (record["patient_id"], record["sex"], record["age"], record["site"]) == expected_fields(row)
        assert record["diagnosis"] is None and np.isnan(record["melanoma"])  # DICOM carries no label
        pixels = decode_file(record["image_ref"])
        assert np.abs(pixels.astype(int) - decode_image(row["path"].read_bytes())).mean() < 1.0
    assert set(records["site"].dropna()) >= {"head/neck"}
    assert (records["source"] == "dicom").all()
    assert len(read_source(str(tmp_path)).records) == len(dicom_rows)


def test_kaggle_layout_labels_come_from_train_csv(tmp_path, dicom_rows, shared):
    """train.csv + train/*.dcm (the Kaggle download) read as ISIC 2020 with the CSV's labels."""
    (tmp_path / "train").mkdir()
    for row in dicom_rows:
        data = dicom_bytes(row["path"].read_bytes(), compressed=True, tags=siim_tags(row))
        (tmp_path / "train" / f"{row['image_name']}.dcm").write_bytes(data)
    header, *lines = (shared / "isic2020" / "train_sample.csv").read_text().splitlines()
    names = {r["image_name"] for r in dicom_rows}
    rows = [line for line in lines if line.split(",")[0] in names]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")

    assert detect_format(tmp_path) == "isic2020"
    loaded = read_source(str(tmp_path))
    assert loaded.problems == []
    records = loaded.records.set_index("image_id")
    assert len(records) == 8 and records["melanoma"].sum() == 1
    for row in dicom_rows:
        record = records.loc[row["image_name"]]
        assert (record["patient_id"], record["sex"], record["age"], record["site"]) == expected_fields(row)
        assert record["melanoma"] == float(row["target"])
        assert record["original_label"] == row["diagnosis"]
        assert Path(record["image_ref"]) == tmp_path / "train" / f"{row['image_name']}.dcm"
        assert decode_file(record["image_ref"]).shape == decode_image(row["path"].read_bytes()).shape
    assert records.loc[records["melanoma"] == 1, "diagnosis"].tolist() == ["MEL"]


def test_dicom_without_pixel_data_is_a_problem_and_the_rest_load(tmp_path, dicom_rows):
    good = dicom_rows[:3]
    for row in good:
        data = dicom_bytes(row["path"].read_bytes(), compressed=True, tags=siim_tags(row))
        (tmp_path / f"{row['image_name']}.dcm").write_bytes(data)
    empty = dicom_bytes(dicom_rows[3]["path"].read_bytes(), compressed=False, tags=siim_tags(dicom_rows[3]), pixel_data=False)
    (tmp_path / "ISIC_nopixels.dcm").write_bytes(empty)
    (tmp_path / "ISIC_notdicom.dcm").write_text("this is not a DICOM file\n")

    loaded = read_dicom_folder(tmp_path)
    assert sorted(loaded.records["image_id"]) == sorted(r["image_name"] for r in good)
    problems = {Path(p.where).name: p for p in loaded.problems}
    assert set(problems) == {"ISIC_nopixels.dcm", "ISIC_notdicom.dcm"}
    assert all(p.kind == "unreadable_image" and p.skipped for p in problems.values())
    assert "no pixel data" in problems["ISIC_nopixels.dcm"].message
    assert "not a readable DICOM" in problems["ISIC_notdicom.dcm"].message

    summary = summarise(loaded.records, loaded.problems)
    assert summary["records"] == 3 and summary["unreadable_images"] == 2 and summary["readable_images"] == 3
    assert summary["problems"] == {"unreadable_image": 2}

    with pytest.raises(ImageError, match="nopixels.dcm: DICOM has no pixel data"):
        decode_image(empty, name="nopixels.dcm")


def test_identifying_dicom_tags_never_reach_the_records(tmp_path, dicom_rows):
    row = dicom_rows[0]
    tags = {
        **siim_tags(row),
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
        "InstitutionName": "Example Hospital",
        "ReferringPhysicianName": "Smith^John",
    }
    (tmp_path / f"{row['image_name']}.dcm").write_bytes(dicom_bytes(row["path"].read_bytes(), compressed=True, tags=tags))
    records = read_dicom_folder(tmp_path).records
    assert list(records.columns) == list(RECORD_COLUMNS)
    text = records.astype(str).to_csv()
    for secret in ("Doe", "Jane", "1970", "Example Hospital", "Smith"):
        assert secret not in text
    assert records.loc[0, "patient_id"] == row["patient_id"]


def test_tiny_dicom_is_refused(train_sample):
    pixel = decode_image(train_sample["path"][0].read_bytes())[:1, :1]
    with pytest.raises(ImageError, match="tiny.dcm: image is only 1x1 pixels"):
        decode_image(dicom_bytes(None, compressed=False, rgb=pixel), name="tiny.dcm")


# ---------------------------------------------------------------------------------------------
# TFRecord
# ---------------------------------------------------------------------------------------------

CATEGORICAL = ("patient_id", "sex", "anatom_site_general_challenge", "diagnosis")


def write_shards(folder: Path, rows: list[dict], *, integer_categoricals: bool, per_shard: int = 10) -> list[tuple[Path, list[int]]]:
    """SIIM-ISIC 2020 style shards (train00-10.tfrec, ...); returns each shard's record offsets.

    With `integer_categoricals` the categorical columns are label-encoded integers, as in
    the competition's own shards."""
    from tfrecord.writer import TFRecordWriter

    folder.mkdir(parents=True, exist_ok=True)
    codes = {c: {v: i for i, v in enumerate(sorted({r[c] for r in rows}))} for c in CATEGORICAL}
    shards = []
    for start in range(0, len(rows), per_shard):
        chunk = rows[start : start + per_shard]
        path = folder / f"train{start // per_shard:02d}-{len(chunk)}.tfrec"
        writer = TFRecordWriter(str(path))
        offsets = []
        for row in chunk:
            offsets.append(writer.file.tell())
            datum = {
                "image": (row["path"].read_bytes(), "byte"),
                "image_name": (row["image_name"].encode(), "byte"),
                "age_approx": (int(float(row["age_approx"])), "int"),
                "target": (int(row["target"]), "int"),
            }
            for column in CATEGORICAL:
                datum[column] = (codes[column][row[column]], "int") if integer_categoricals else (row[column].encode(), "byte")
            writer.write(datum)
        writer.close()
        shards.append((path, offsets))
    return shards


@pytest.fixture(scope="module")
def tf_rows(train_sample):
    rows = train_sample.head(19).to_dict("records")
    rows.append(train_sample[train_sample["target"] == "1"].iloc[0].to_dict())  # one melanoma
    return rows


def _check_records_match_csv(records, rows):
    assert len(records) == len(rows)
    by_id = records.set_index("image_id")
    for row in rows:
        record = by_id.loc[row["image_name"]]
        assert (record["patient_id"], record["sex"], record["age"], record["site"]) == expected_fields(row)
        assert record["original_label"] == row["diagnosis"]
        assert record["diagnosis"] == harmonise.diagnosis(row["diagnosis"])[0]
        assert record["melanoma"] == float(row["target"])


def test_tfrecord_with_string_features(tmp_path, tf_rows):
    shards = write_shards(tmp_path / "tfrecords", tf_rows, integer_categoricals=False)
    assert detect_format(tmp_path / "tfrecords") == "tfrecord"
    loaded = read_source(str(tmp_path / "tfrecords"))
    assert loaded.problems == []
    records = loaded.records
    assert list(records.columns) == list(RECORD_COLUMNS) and (records["source"] == "tfrecord").all()
    _check_records_match_csv(records, tf_rows)
    assert records["melanoma"].sum() == 1
    # image_ref is shard#offset and gives back the original JPEG, byte for byte.
    expected_refs = [f"{path}#{offset}" for path, offsets in shards for offset in offsets]
    assert records["image_ref"].tolist() == expected_refs
    for ref, row in zip(records["image_ref"], tf_rows):
        assert read_image_bytes(ref) == row["path"].read_bytes()
    assert np.array_equal(decode_file(records["image_ref"][5]), decode_image(tf_rows[5]["path"].read_bytes()))
    # A single shard is a source too.
    assert len(read_source(str(shards[1][0])).records) == 10


def test_tfrecord_integer_categoricals_take_metadata_from_train_csv(tmp_path, tf_rows, shared):
    shutil.copy(shared / "isic2020" / "train_sample.csv", tmp_path / "train.csv")  # Kaggle: train.csv + tfrecords/
    shards = write_shards(tmp_path / "tfrecords", tf_rows, integer_categoricals=True)
    loaded = read_source(str(tmp_path / "tfrecords"))
    assert loaded.problems == []
    _check_records_match_csv(loaded.records, tf_rows)

    # Without the CSV the label-encoded integers are not guessed at: missing, not "0"/"1".
    bare = read_tfrecords([path for path, _ in shards]).records.set_index("image_id")
    assert bare["patient_id"].isna().all() and bare["sex"].isna().all() and bare["site"].isna().all()
    assert bare["original_label"].isna().all()
    for row in tf_rows:
        record = bare.loc[row["image_name"]]
        assert record["age"] == float(row["age_approx"]) and record["melanoma"] == float(row["target"])
        assert record["diagnosis"] == ("MEL" if row["target"] == "1" else "UNK")


def test_truncated_shard_is_a_problem_and_earlier_records_load(tmp_path, tf_rows):
    shards = write_shards(tmp_path, tf_rows, integer_categoricals=False)
    second, offsets = shards[1]
    cut = (offsets[6] + offsets[7]) // 2  # in the middle of the 8th record
    second.write_bytes(second.read_bytes()[:cut])

    loaded = read_source(str(tmp_path))
    assert len(loaded.records) == 10 + 6
    assert loaded.records["image_id"].tolist() == [r["image_name"] for r in tf_rows[:16]]
    [problem] = loaded.problems
    assert problem.kind == "unreadable_shard" and problem.skipped
    assert problem.where == f"{second} at byte {offsets[6]}"
    assert "truncated" in problem.message
    for ref, row in zip(loaded.records["image_ref"], tf_rows):
        assert read_image_bytes(ref) == row["path"].read_bytes()
    with pytest.raises(ImageError, match="tfrec#"):
        read_image_bytes(f"{second}#{offsets[6]}")
