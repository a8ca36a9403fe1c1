"""`predict`'s score cache on real SIIM-ISIC 2020 test_128 patients: a second run gives the
same table without touching the network; new content, new metadata or another bundle is
scored afresh; unreadable files are reported on every run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermsight.cli import app
from dermsight.data.sources import read_source
from dermsight.inference.predictor import Predictor
from dermsight.inference import score_cache
from dermsight.inference.score_cache import ScoreCache, bundle_digest
from dermsight.models.bundle import load_bundle


@pytest.fixture(scope="module")
def records(shared) -> pd.DataFrame:
    """24 real test_128 images of patients with several images each, in file order."""
    test = read_source(f"isic2020:{shared / 'isic2020' / 'test_128.csv'}").records
    counts = test["patient_id"].value_counts()
    return test[test["patient_id"].isin(counts[counts >= 3].index[:6])].head(24).reset_index(drop=True)


def test_second_run_is_the_same_table_without_the_network(trained_bundle, records, tmp_path, monkeypatch):
    predictor = Predictor(trained_bundle)
    cache = ScoreCache(predictor.bundle, root=tmp_path)
    first, errors = predictor.predict_records(records, progress=False, cache=cache)
    assert not errors and list(first["image"]) == list(records["image_id"])
    uncached, _ = predictor.predict_records(records, progress=False)
    pd.testing.assert_frame_equal(first, uncached)

    def no_network(*_):
        raise AssertionError("the network ran on a cached image")

    monkeypatch.setattr(predictor, "score_views", no_network)
    second, errors = predictor.predict_records(records, progress=False, cache=cache)
    assert not errors
    pd.testing.assert_frame_equal(first, second)  # patient context included, recomputed from cached embeddings


def test_with_the_cache_each_file_is_read_once(trained_bundle, records, tmp_path, monkeypatch):
    """The bytes hashed for the cache key are the bytes decoded on a miss: one read per file."""
    import dermsight.imaging.batches
    import dermsight.inference.score_cache

    reads = []
    real = dermsight.imaging.decode.read_image_bytes
    for module in (dermsight.imaging.batches, dermsight.inference.score_cache):
        monkeypatch.setattr(module, "read_image_bytes", lambda ref: reads.append(str(ref)) or real(ref))
    predictor = Predictor(trained_bundle)
    table, errors = predictor.predict_records(records, progress=False, cache=ScoreCache(predictor.bundle, root=tmp_path))
    assert not errors and len(table) == len(records)
    assert sorted(reads) == sorted(records["image_ref"])
    uncached, _ = predictor.predict_records(records, progress=False)
    pd.testing.assert_frame_equal(table, uncached)


def test_new_metadata_new_image_or_bundle_are_scored_again(trained_bundle, records, tmp_path, monkeypatch):
    predictor = Predictor(trained_bundle)
    cache = ScoreCache(predictor.bundle, root=tmp_path)
    predictor.predict_records(records.iloc[:12], progress=False, cache=cache)
    scored = []
    real = predictor.score_views
    monkeypatch.setattr(predictor, "score_views", lambda images, *rest: scored.append(images.shape[1]) or real(images, *rest))
    changed = records.copy()
    changed.loc[3, "age"] = 85.0 if changed.loc[3, "age"] != 85.0 else 20.0
    table, _ = predictor.predict_records(changed, progress=False, cache=cache)
    assert sum(scored) == 1 + 12  # image 3's new age, and the 12 never scored
    fresh, _ = Predictor(trained_bundle).predict_records(changed, progress=False)
    pd.testing.assert_frame_equal(table, fresh)

    copy = tmp_path / "edited_bundle"
    shutil.copytree(trained_bundle, copy)
    data = json.loads((copy / "bundle.json").read_text())
    data["calibration"]["temperature"] = 2.0
    (copy / "bundle.json").write_text(json.dumps(data))
    assert bundle_digest(load_bundle(copy)) != bundle_digest(predictor.bundle)
    assert ScoreCache(load_bundle(copy), root=tmp_path).path != cache.path
    before = bundle_digest(predictor.bundle)
    monkeypatch.setattr(score_cache, "SCORING_VERSION", score_cache.SCORING_VERSION + 1)  # same files, new arithmetic
    assert bundle_digest(predictor.bundle) != before


def test_unreadable_files_are_reported_every_run(trained_bundle, records, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    rows = pd.concat([records.iloc[:3], records.iloc[:1].assign(image_id="broken", image_ref=str(broken))], ignore_index=True)
    predictor = Predictor(trained_bundle)
    cache = ScoreCache(predictor.bundle, root=tmp_path / "cache")
    for _ in range(2):
        table, errors = predictor.predict_records(rows, progress=False, cache=cache)
        assert list(table["image"]) == list(records["image_id"][:3]) and list(errors) == ["broken"]


def test_a_damaged_cache_costs_time_not_results(trained_bundle, records, tmp_path):
    predictor = Predictor(trained_bundle)
    cache = ScoreCache(predictor.bundle, root=tmp_path)
    cache.path.write_bytes(b"this is not a database" * 100)
    table, errors = predictor.predict_records(records.iloc[:4], progress=False, cache=cache)
    assert not errors
    uncached, _ = predictor.predict_records(records.iloc[:4], progress=False)
    pd.testing.assert_frame_equal(table, uncached)  # every score, as if there were no cache
    assert list(table["image"]) == list(records["image_id"][:4]) and np.isfinite(table["melanoma_risk"]).all()


def test_cli_predict_uses_the_cache_unless_told_not_to(trained_bundle, shared, tmp_path, monkeypatch):
    monkeypatch.setenv("DERMSIGHT_CACHE", str(tmp_path / "cache"))
    images = sorted((shared / "isic2020" / "test_128").glob("*.jpg"))[:6]
    runner = CliRunner()
    args = ["predict", *map(str, images), "--model", str(trained_bundle)]
    scored = []
    real = Predictor.score_views
    monkeypatch.setattr(Predictor, "score_views", lambda self, stacked, *rest: scored.append(stacked.shape[1])
                        or real(self, stacked, *rest))
    runs = {"a.csv": ["--no-cache"], "b.csv": [], "c.csv": [], "d.csv": ["--no-cache"]}
    for name, options in runs.items():
        scored.clear()
        result = runner.invoke(app, [*args, *options, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        # a: no cache yet and none written; b fills it; c reads every image from it; d ignores it
        assert sum(scored) == (0 if name == "c.csv" else 6), name
        assert (tmp_path / "cache" / "scores").exists() == (name != "a.csv")
    assert len(list((tmp_path / "cache" / "scores").glob("*.sqlite"))) == 1
    a, b, c, d = (pd.read_csv(tmp_path / name) for name in runs)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(b, c)
    pd.testing.assert_frame_equal(a, d)
