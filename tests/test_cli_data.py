"""`dermsight data summary` and `dermsight data build` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from dermsight.cli import app
from dermsight.data.dataset import load_manifest


@pytest.fixture
def runner():
    return CliRunner()


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_summary_json_on_the_shared_datasets(runner, shared):
    sources = [str(shared / "ham10000"), str(shared / "isic9" / "train"), str(shared / "isic2020")]
    result = runner.invoke(app, ["data", "summary", "--json", *sources])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == [*sources, "combined (deduplicated)"]
    ham, isic9, isic2020, combined = report.values()

    assert (ham["records"], ham["images"], ham["lesions"], ham["patients"], ham["melanoma"]) == (10_015, 10_015, 7_470, 0, 1_113)
    assert ham["classes"] == {"MEL": 1113, "NV": 6705, "BCC": 514, "AK": 327, "BKL": 1099, "DF": 115, "VASC": 142, "SCC": 0, "UNK": 0}
    assert ham["missing"] == {"age": 57, "sex": 57, "site": 234} and ham["problems"] == {}

    assert (isic9["records"], isic9["images"], isic9["classes"]["BKL"], isic9["classes"]["SCC"]) == (2_241, 2_241, 539, 181)

    assert (isic2020["records"], isic2020["patients"], isic2020["melanoma"], isic2020["unlabelled"]) == (6_432, 934, 422, 5_545)
    assert isic2020["problems"] == {"no_images": 3}  # train.csv, test.csv, the v2 ground truth
    assert isic2020["skipped_rows"] == 0

    for part in report.values():
        assert part["unreadable_images"] == 0 and part["readable_images"] == part["images"]

    # Combined: HAM10000 and isic9 share 1,381 images; 89 copies with tied labels dropped.
    assert combined["records"] == 10_015 + 2_241 - 137 - 1_381 + 6_432 - 89
    assert combined["problems"]["duplicate"] == 1_367
    assert combined["patients"] == 934 and combined["classes"]["SCC"] == 181


@pytest.fixture
def bad_folder(tmp_path, shared):
    root = tmp_path / "mixed"
    source = shared / "isic9" / "train"
    for label in ("melanoma", "nevus"):
        (root / label).mkdir(parents=True)
        for path in sorted((source / label).iterdir())[:3]:
            shutil.copy(path, root / label)
    real = next((source / "melanoma").iterdir()).read_bytes()
    (root / "melanoma" / "cut.jpg").write_bytes(real[: len(real) // 3])
    (root / "nevus" / "empty.jpg").write_bytes(b"")
    (root / "nevus" / "readme.jpg").write_text("not a picture")
    return root


def test_summary_counts_unreadable_images_without_failing(runner, bad_folder):
    result = runner.invoke(app, ["data", "summary", "--json", str(bad_folder)])
    _no_traceback(result)
    assert result.exit_code == 0
    [summary] = json.loads(result.stdout).values()
    assert (summary["records"], summary["images"], summary["readable_images"], summary["unreadable_images"]) == (9, 9, 6, 3)
    assert summary["problems"] == {"unreadable_image": 3}

    table = runner.invoke(app, ["data", "summary", str(bad_folder)])
    _no_traceback(table)
    assert table.exit_code == 0
    assert "unreadable_image (3)" in table.stdout
    assert f"{bad_folder / 'melanoma' / 'cut.jpg'}: corrupt or truncated JPEG" in table.stdout
    assert f"{bad_folder / 'nevus' / 'empty.jpg'}: file is empty" in table.stdout
    assert f"{bad_folder / 'nevus' / 'readme.jpg'}: not an image" in table.stdout


def test_summary_of_a_nonexistent_path_is_a_clear_error(runner, tmp_path):
    missing = tmp_path / "no" / "such" / "dataset"
    for options in ([], ["--json"]):
        result = runner.invoke(app, ["data", "summary", *options, str(missing)])
        _no_traceback(result)
        assert result.exit_code == 1
        assert f"error: cannot read {missing}: no such file or folder" in result.stderr
    json.loads(result.stdout)  # --json keeps stdout machine-readable


def test_build_writes_a_manifest(runner, tmp_path, shared):
    output = tmp_path / "runs" / "manifest.csv"
    sources = [str(shared / "isic9" / "train"), str(shared / "isic2020" / "train_sample.csv")]
    result = runner.invoke(app, ["data", "build", *sources, "--output", str(output), "--folds", "3", "--seed", "1"])
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(output)
    assert len(manifest) == 2_241 - 2 * 137 + 203
    assert set(manifest["fold"]) == {0, 1, 2}
    assert (manifest.dropna(subset=["patient_id"]).groupby("patient_id")["fold"].nunique() == 1).all()
    info = json.loads(output.with_suffix(".json").read_text())
    assert (info["sources"], info["n_folds"], info["seed"], info["n_records"]) == (sources, 3, 1, len(manifest))
    assert f"{len(manifest):,} records" in result.stdout


def test_build_refuses_a_missing_source(runner, tmp_path, shared):
    output = tmp_path / "manifest.csv"
    missing = tmp_path / "typo"
    result = runner.invoke(app, ["data", "build", str(shared / "isic9" / "train"), str(missing), "-o", str(output)])
    _no_traceback(result)
    assert result.exit_code == 1
    assert f"cannot read {missing}: no such file or folder" in result.stderr
    assert not output.exists()


def test_summary_and_source_folded_build_cover_the_new_sources(runner, tmp_path, shared):
    sources = [str(shared / "derm7pt"), str(shared / "isic2017"), str(shared / "isic2020" / "train_extra.csv")]
    result = runner.invoke(app, ["data", "summary", "--json", *sources])
    assert result.exit_code == 0, result.output
    derm7pt, isic2017, extra, combined = json.loads(result.stdout).values()
    assert (derm7pt["records"], derm7pt["melanoma"], derm7pt["lesions"], derm7pt["missing"]["age"]) == (616, 151, 616, 616)
    assert (isic2017["records"], isic2017["melanoma"], isic2017["classes"]["BKL"]) == (1_846, 234, 296)
    assert (extra["records"], extra["melanoma"], extra["patients"]) == (684, 419, 486)
    assert combined["records"] == 616 + 1_846 + 684
    output = tmp_path / "manifest.csv"
    result = runner.invoke(app, ["data", "build", *sources, "--folds", "2", "--source-folds", "--output", str(output)])
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(output)
    folds = manifest.groupby("source")["fold"].unique()
    assert sorted(len(f) for f in folds) == [1, 1, 2]  # the largest (isic2017) split, the others whole
    result = runner.invoke(app, ["data", "build", *sources, "--folds", "1", "--source-folds", "-o", str(output)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "build", *sources, str(shared / "isic9" / "train"), "--folds", "2", "--source-folds",
                                 "-o", str(output)])
    assert result.exit_code == 1 and "need at least as many folds" in result.output
