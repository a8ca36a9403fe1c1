"""The Ray Data engine (`dermsight predict --engine ray`) on a local 2-CPU Ray: its table
equals the single-process Predictor's row for row, on real SIIM-ISIC 2020 test images with
their real patients (test_128: 5,545 images of 344 complete patients)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import system_deps
from typer.testing import CliRunner

system_deps.python_module("ray.data", "scale")  # missing: these tests skip, or fail in CI

from dermsight.cli import app  # noqa: E402
from dermsight.inference.predictor import Predictor  # noqa: E402
from dermsight.inference.ray_engine import predict_ray  # noqa: E402
from engine_tables import PROBABILITIES, assert_same_table, complete_patients, local_engine_table, scattered_patients  # noqa: E402

def test_ray_engine_equals_the_single_process_predictor(test_128, trained_bundle, tmp_path):
    """~300 images of complete real patients, a few without a patient id, one truncated and
    one missing file; patient image counts left for the engines to count (the Ray engine
    must count over the whole input, not per piece)."""
    records = complete_patients(test_128, 300).copy()
    records["patient_images"] = np.nan
    records.loc[records.index[:4], "patient_id"] = None
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(records["image_ref"][0], "rb").read()[:600])
    broken = records.iloc[:2].assign(image_id=["truncated", "missing"], image_ref=[str(truncated), str(tmp_path / "no.jpg")])
    records = pd.concat([records.iloc[:100], broken, records.iloc[100:]], ignore_index=True)

    local_table, local_errors = local_engine_table(trained_bundle, records)
    ray_table, ray_errors = predict_ray(records, trained_bundle, workers=2, num_cpus=2)

    assert ray_errors == local_errors and set(ray_errors) == {"truncated", "missing"}
    assert len(ray_table) == len(records) - 2 and ray_table["patient_id"].isna().sum() == 4
    assert_same_table(ray_table, local_table, context_atol=1e-4)
    counts = ray_table["patient_id"].map(ray_table["patient_id"].value_counts())
    accepted = ray_table["refusal"] == ""  # a refused image has no patient context
    known, lone = ray_table["patient_id"].notna() & accepted, ray_table["patient_id"].isna() & accepted
    counts = counts[known]
    assert (ray_table.loc[known, "patient_lesions"] == counts).all() and (ray_table.loc[lone, "patient_lesions"] == 1).all()


def test_ray_engine_gives_a_model_each_patients_count_over_the_whole_input(test_128, patient_count_bundle):
    """With a bundle that reads the patient's image count (the default one does not), patients
    whose images fall into different pieces score as in one process."""
    records = scattered_patients(test_128, 120)
    local_table, _ = local_engine_table(patient_count_bundle, records)
    ray_table, _ = predict_ray(records, patient_count_bundle, workers=2, num_cpus=2)
    assert_same_table(ray_table, local_table, context_atol=1e-4)


def test_predict_command_with_the_ray_engine(test_128, trained_bundle, tmp_path):
    """`dermsight predict --engine ray` on a folder of real images (no patients) writes the
    table the local engine writes, as Parquet."""
    folder = tmp_path / "images"
    folder.mkdir()
    for ref in test_128["image_ref"][:48]:  # symlinks: the images stay in the shared folder
        (folder / Path(ref).name).symlink_to(Path(ref).resolve())
    runner = CliRunner()
    local = runner.invoke(app, ["predict", str(folder), "-m", str(trained_bundle), "-o", str(tmp_path / "local.csv")])
    assert local.exit_code == 0, local.output
    distributed = runner.invoke(app, ["predict", str(folder), "-m", str(trained_bundle), "-o", str(tmp_path / "ray.parquet"),
                                      "--engine", "ray", "--workers", "2", "--num-cpus", "2"])
    assert distributed.exit_code == 0, distributed.output
    assert "48 images scored" in distributed.output
    local_table = pd.read_csv(tmp_path / "local.csv")
    ray_table = pd.read_parquet(tmp_path / "ray.parquet")
    assert "patient_id" not in ray_table and list(ray_table.columns) == list(local_table.columns)
    assert ray_table["image"].tolist() == local_table["image"].tolist()
    np.testing.assert_allclose(ray_table[PROBABILITIES], local_table[PROBABILITIES], rtol=0, atol=1e-5)


def test_ray_options_need_the_ray_engine(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--workers", "2"])
    assert result.exit_code == 2 and "apply to --engine ray" in result.output


@pytest.mark.slow
def test_ray_engine_on_all_of_test_128(test_128, trained_bundle):
    """All 5,545 images of 344 real patients, 2 scoring actors on a local 2-CPU Ray."""
    local_table, local_errors = local_engine_table(trained_bundle, test_128)
    ray_table, ray_errors = predict_ray(test_128, trained_bundle, workers=2, num_cpus=2)
    assert ray_errors == local_errors == {}
    assert len(ray_table) == 5545 and ray_table["patient_id"].nunique() == 344
    assert_same_table(ray_table, local_table, context_atol=1e-4)
