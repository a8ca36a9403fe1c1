"""Bad input: every problem names its file (and row), the rest still loads, and the
summary counts it. Sources are built in tmp_path from real rows and real images."""

from __future__ import annotations

import io
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import combine
from dermsight.data import readers
from dermsight.data.dataset import deduplicate, load_sources
from dermsight.data.records import Loaded, RecordBuilder, SourceError
from dermsight.data.summary import summarise
from dermsight.imaging.decode import ImageError, decode_file, decode_image, image_kind
from dermsight.imaging.validate import find_unreadable


def ham_subset(shared: Path, folder: Path, n: int = 8) -> pd.DataFrame:
    """A HAM10000-layout folder with the first `n` real rows and their real images."""
    frame = pd.read_csv(shared / "ham10000" / "HAM10000_metadata.csv", dtype=str, keep_default_na=False).head(n)
    (folder / "images").mkdir(parents=True)
    for image_id in frame["image_id"]:
        shutil.copy(shared / "ham10000" / "images" / f"{image_id}.jpg", folder / "images")
    return frame


def class_tree(root: Path, files: dict[str, list[Path]]) -> Path:
    """root/<class>/<file> with copies of real images."""
    for label, paths in files.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, root / label / path.name)
    return root


@pytest.fixture(scope="module")
def isic9_images(shared) -> dict[str, list[Path]]:
    root = shared / "isic9" / "train"
    return {label: sorted((root / label).iterdir())[:4] for label in ("melanoma", "nevus")}


# --- a source that cannot be read at all ---------------------------------------------------------


def test_csv_missing_a_column_names_file_and_column(tmp_path, shared, isic9_images):
    frame = ham_subset(shared, tmp_path / "ham")
    csv = tmp_path / "ham" / "HAM10000_metadata.csv"
    frame.drop(columns="dx").to_csv(csv, index=False)
    with pytest.raises(SourceError) as err:
        readers.read_ham10000(tmp_path / "ham")
    assert str(err.value).startswith(f"{csv}: missing required column(s) dx;")

    # Among other sources it becomes a problem; the good source still loads.
    good = class_tree(tmp_path / "good", isic9_images)
    spec = f"ham10000:{tmp_path / 'ham'}"
    loaded = load_sources([spec, str(good)])
    assert len(loaded.records) == 8
    [problem] = loaded.problems
    assert (problem.kind, problem.where) == ("unreadable_source", spec)
    assert "missing required column(s) dx" in problem.message and str(csv) in problem.message
    summary = summarise(loaded.records, loaded.problems)
    assert summary["problems"] == {"unreadable_source": 1} and summary["records"] == 8


def test_isic2020_csv_missing_patient_id(tmp_path, shared):
    frame = pd.read_csv(shared / "isic2020" / "train_sample.csv", dtype=str).head(5)
    csv = tmp_path / "subset.csv"
    frame.drop(columns="patient_id").to_csv(csv, index=False)
    with pytest.raises(SourceError, match=r"subset\.csv: missing required column\(s\) patient_id"):
        readers.read_isic2020_csv(csv)
    loaded = load_sources([f"isic2020:{csv}"])
    assert loaded.records.empty and [p.kind for p in loaded.problems] == ["unreadable_source"]


def test_nonexistent_source_is_a_clear_problem(tmp_path):
    loaded = load_sources([str(tmp_path / "nowhere")])
    [problem] = loaded.problems
    assert str(problem) == f"{tmp_path / 'nowhere'}: no such file or folder [record skipped]"


# --- bad values in rows ---------------------------------------------------------------------------


def test_bad_rows_are_reported_by_file_and_line_and_the_rest_loads(tmp_path, shared):
    frame = ham_subset(shared, tmp_path)
    frame.loc[1, "localization"] = "left elbow"
    frame.loc[2, "age"] = "-5"
    frame.loc[3, "age"] = "300"
    frame.loc[4, "dx"] = "wart"
    (tmp_path / "images" / f"{frame.loc[5, 'image_id']}.jpg").unlink()
    csv = tmp_path / "HAM10000_metadata.csv"
    frame.to_csv(csv, index=False)

    loaded = readers.read_ham10000(tmp_path)
    problems = [(p.kind, p.where, p.skipped) for p in loaded.problems]
    assert sorted(problems) == sorted(
        [
            ("bad_site", f"{csv} line 3", False),
            ("bad_age", f"{csv} line 4", False),
            ("bad_age", f"{csv} line 5", False),
            ("bad_diagnosis", f"{csv} line 6", True),
            ("missing_image", f"{csv} line 7", False),
        ]
    )
    messages = {p.where: p.message for p in loaded.problems}
    assert "unknown anatomical site 'left elbow'" in messages[f"{csv} line 3"]
    assert "age '-5' is outside 0-120 years" in messages[f"{csv} line 4"]
    assert "age '300'" in messages[f"{csv} line 5"]
    assert messages[f"{csv} line 6"] == "unknown diagnosis 'wart'"
    assert frame.loc[5, "image_id"] in messages[f"{csv} line 7"]

    records = loaded.records.set_index("image_id")
    assert len(records) == 7  # only the unknown diagnosis is dropped
    assert records.loc[frame.loc[1, "image_id"], "site"] is None
    assert pd.isna(records.loc[frame.loc[2, "image_id"], "age"]) and pd.isna(records.loc[frame.loc[3, "image_id"], "age"])
    assert records.loc[frame.loc[5, "image_id"], "image_ref"] is None
    assert records.loc[frame.loc[0, "image_id"], "age"] == float(frame.loc[0, "age"])

    summary = summarise(loaded.records, loaded.problems)
    assert summary["problems"] == {"bad_site": 1, "bad_age": 2, "bad_diagnosis": 1, "missing_image": 1}
    assert summary["skipped_rows"] == 1
    assert (summary["records"], summary["images"]) == (7, 6)
    assert summary["missing"]["age"] == 2 and summary["missing"]["site"] == 1


# --- duplicates with conflicting labels -------------------------------------------------------------


def test_conflicting_duplicates_tie_dropped_majority_kept(tmp_path, isic9_images):
    tie, majority, agreed = isic9_images["melanoma"][:3]
    a = class_tree(tmp_path / "a", {"melanoma": [tie, majority], "nevus": [agreed]})
    b = class_tree(tmp_path / "b", {"nevus": [tie, majority, agreed]})
    c = class_tree(tmp_path / "c", {"nevus": [majority]})

    loaded = deduplicate(load_sources([str(a), str(b), str(c)]))
    records = loaded.records.set_index("image_id")
    assert sorted(records.index) == sorted([majority.stem, agreed.stem])
    assert records.loc[majority.stem, "diagnosis"] == "NV" and records.loc[majority.stem, "melanoma"] == 0.0
    assert records.loc[agreed.stem, "diagnosis"] == "NV"
    assert Path(records.loc[majority.stem, "image_ref"]).parent == a / "melanoma"  # first copy's file kept

    conflicts = {p.where: p for p in loaded.problems if p.kind == "conflicting_labels"}
    assert set(conflicts) == {tie.stem, majority.stem}
    assert conflicts[tie.stem].skipped and "a tie" in conflicts[tie.stem].message
    assert not conflicts[majority.stem].skipped and "majority NV kept" in conflicts[majority.stem].message
    summary = summarise(loaded.records, loaded.problems)
    assert summary["problems"] == {"conflicting_labels": 2, "duplicate": 2}
    assert summary["skipped_rows"] == 1


def test_ham_akiec_and_isic2019_scc_resolve_to_scc(shared, ham):
    """ISIC 2019 relabelled HAM10000's intraepithelial carcinomas (akiec) as SCC."""
    isic2019 = readers.read_isic2019(shared / "isic2019")
    akiec_ids = set(ham.records.loc[ham.records["original_label"] == "akiec", "image_id"])
    subset = combine(
        Loaded(ham.records[ham.records["image_id"].isin(akiec_ids)], []),
        Loaded(isic2019.records[isic2019.records["image_id"].isin(akiec_ids)], []),
    )
    in_2019 = isic2019.records[isic2019.records["image_id"].isin(akiec_ids)].set_index("image_id")["diagnosis"]
    scc_ids = set(in_2019[in_2019 == "SCC"].index)
    assert len(scc_ids) > 20 and set(in_2019) == {"AK", "SCC"}

    merged = deduplicate(subset)
    records = merged.records.set_index("image_id")
    assert len(records) == len(akiec_ids)
    assert set(records.loc[sorted(scc_ids), "diagnosis"]) == {"SCC"}
    assert set(records.drop(index=sorted(scc_ids))["diagnosis"]) == {"AK"}
    assert set(records.loc[sorted(scc_ids), "original_label"]) == {"akiec"}  # HAM copy, with its image
    assert records["image_ref"].notna().all() and records["lesion_id"].str.startswith("HAM_").all()
    assert not [p for p in merged.problems if p.kind == "conflicting_labels"]


def test_akiec_refinement_is_narrow():
    """Only HAM's akiec may be refined to SCC; other disagreements stay conflicts."""
    a, b = RecordBuilder("a"), RecordBuilder("b")
    a.add("a.csv line 2", image_id="ISIC_1", image_ref="/a/1.jpg", label="akiec")
    b.add("b.csv line 2", image_id="ISIC_1", image_ref=None, label="MEL")
    a.add("a.csv line 3", image_id="ISIC_2", image_ref="/a/2.jpg", label="actinic keratosis")
    b.add("b.csv line 3", image_id="ISIC_2", image_ref=None, label="SCC")
    loaded = Loaded()
    loaded.extend(a.loaded())
    loaded.extend(b.loaded())
    merged = deduplicate(loaded)
    assert merged.records.empty
    assert sorted(p.where for p in merged.problems if p.kind == "conflicting_labels" and p.skipped) == ["ISIC_1", "ISIC_2"]


def test_unlabelled_duplicates_are_merged_not_dropped():
    a, b = RecordBuilder("a"), RecordBuilder("b")
    a.add("a", image_id="ISIC_1", image_ref=None, patient_id="IP_1", age="40")
    b.add("b", image_id="ISIC_1", image_ref="/b/1.jpg", sex="female")
    loaded = Loaded()
    loaded.extend(a.loaded())
    loaded.extend(b.loaded())
    merged = deduplicate(loaded)
    [record] = merged.records.to_dict("records")
    assert (record["image_ref"], record["patient_id"], record["age"], record["sex"]) == ("/b/1.jpg", "IP_1", 40.0, "female")
    assert record["diagnosis"] is None and pd.isna(record["melanoma"])


# --- unreadable image files -------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A small valid-looking 1-bit PNG whose header claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("1", (64, 64)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def bad_images(tmp_path, isic9_images):
    """A class-folder source with three good real images and five bad files."""
    root = class_tree(tmp_path / "src", {"nevus": isic9_images["nevus"][:3]})
    real = isic9_images["melanoma"][0].read_bytes()
    bad = root / "melanoma"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("patient notes, not a picture\n")
    (bad / "bomb.png").write_bytes(png_declaring(30_000, 30_000))
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 120, 90)).save(buffer, "PNG")
    (bad / "tiny.png").write_bytes(buffer.getvalue())
    return root


EXPECTED_IMAGE_ERRORS = {
    "truncated.jpg": "corrupt or truncated JPEG",
    "empty.jpg": "file is empty (0 bytes)",
    "notes.jpg": "not an image",
    "bomb.png": "too large",
    "tiny.png": "image is only 1x1 pixels",
}


def test_find_unreadable_names_each_bad_file(bad_images):
    loaded = readers.read_class_folders(bad_images)
    assert len(loaded.records) == 8 and loaded.problems == []
    problems = find_unreadable(loaded.records, progress=False)
    by_name = {Path(p.where).name: p for p in problems}
    assert set(by_name) == set(EXPECTED_IMAGE_ERRORS)
    for name, words in EXPECTED_IMAGE_ERRORS.items():
        assert by_name[name].kind == "unreadable_image" and words in by_name[name].message
        assert Path(by_name[name].where) == bad_images / "melanoma" / name
    summary = summarise(loaded.records, loaded.problems + problems)
    assert (summary["images"], summary["readable_images"], summary["unreadable_images"]) == (8, 3, 5)
    assert summary["problems"] == {"unreadable_image": 5} and summary["skipped_rows"] == 0


@pytest.mark.parametrize("name", sorted(EXPECTED_IMAGE_ERRORS))
def test_decode_errors_name_the_file(bad_images, name):
    path = bad_images / "melanoma" / name
    with pytest.raises(ImageError) as err:
        decode_file(path)
    assert str(err.value).startswith(f"{path}: ") and EXPECTED_IMAGE_ERRORS[name] in str(err.value)


@pytest.mark.parametrize(("width", "height"), [(30_000, 30_000), (9_000, 7_000), (1_000_000, 100)])
def test_png_bomb_is_refused_from_the_header(width, height):
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb\.png: .*(too large|megapixel)"):
        decode_image(png_declaring(width, height), name="bomb.png")
    assert time.perf_counter() - started < 0.5  # refused before decoding anything


def test_content_not_name_decides(tmp_path, isic9_images):
    """A real JPEG named .png decodes as the JPEG it is (pixel for pixel, and at reduced scale, which
    only JPEG decoding does); a PNG named .jpg as the PNG. The decoder sniffs bytes, not suffixes."""
    original = isic9_images["nevus"][0]  # a 180 x 180 JPEG
    path = tmp_path / "photo.png"
    shutil.copy(original, path)
    assert image_kind(path.read_bytes(), name=str(path)) == "jpeg"
    np.testing.assert_array_equal(decode_file(path), decode_file(original))
    reduced = decode_file(path, min_side=64)
    assert reduced.shape == (90, 90, 3)  # Pillow's draft: 1/2 scale, both sides still >= 64
    np.testing.assert_array_equal(reduced, decode_file(original, min_side=64))
    png = tmp_path / "scan.jpg"
    Image.fromarray(decode_file(original)).save(png, format="PNG")
    assert image_kind(png.read_bytes()) == "png"
    np.testing.assert_array_equal(decode_file(png, min_side=64), decode_file(original))  # lossless, full size
