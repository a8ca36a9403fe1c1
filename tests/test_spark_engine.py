"""The Spark engine (`dermsight predict --engine spark`) on a real local[2] Spark (one
SparkSession for the module): its table equals the single-process Predictor's row for row,
on real SIIM-ISIC 2020 test images with their real patients (test_128: 5,545 images of 344
complete patients); unreadable images become rows with their reason, never a failed job.
Java and PySpark missing fail these tests in CI (system_deps), elsewhere they skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import system_deps
from typer.testing import CliRunner

from dermsight.cli import app
from dermsight.inference.predictor import Predictor
from engine_tables import PROBABILITIES, assert_same_table, complete_patients, local_engine_table, scattered_patients
from dermsight.inference.spark_engine import (
    SparkEngineError,
    check_master,
    find_java,
    import_pyspark,
    predict_spark,
    start_spark,
)

@pytest.fixture(scope="module")
def spark():
    """One local Spark with 2 cores for the whole module (starting one costs ~10-20 s)."""
    system_deps.java()
    system_deps.pyspark()
    session = start_spark("local[2]", app_name="dermsight tests")
    yield session
    session.stop()


def broken_images(folder: Path, good: Path) -> dict[str, Path]:
    """Real kinds of unreadable input: a truncated JPEG, an empty file, text named .jpg, a
    missing file."""
    folder.mkdir(exist_ok=True)
    files = {"truncated": folder / "truncated.jpg", "empty": folder / "empty.jpg", "text": folder / "notes.jpg",
             "missing": folder / "no-such-image.jpg"}
    files["truncated"].write_bytes(good.read_bytes()[:600])
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image, whatever its name says\n")
    return files


def test_spark_engine_equals_the_single_process_predictor(spark, test_128, trained_bundle, tmp_path):
    """~300 images of complete real patients, a few without a patient id, one truncated and
    one missing file; patient image counts left for the engines to count (the Spark engine
    counts over the whole input on the driver, not per partition)."""
    records = complete_patients(test_128, 300).copy()
    records["patient_images"] = np.nan
    records.loc[records.index[:4], "patient_id"] = None
    files = broken_images(tmp_path / "broken", Path(records["image_ref"][0]))
    broken = records.iloc[:2].assign(image_id=["truncated", "missing"],
                                     image_ref=[str(files["truncated"]), str(files["missing"])])
    records = pd.concat([records.iloc[:100], broken, records.iloc[100:]], ignore_index=True)

    local_table, local_errors = local_engine_table(trained_bundle, records)
    spark_table, spark_errors = predict_spark(records, trained_bundle, spark=spark, partitions=5)

    assert spark_errors == local_errors and set(spark_errors) == {"truncated", "missing"}
    assert len(spark_table) == len(records) - 2 and spark_table["patient_id"].isna().sum() == 4
    assert spark_table["patient_id"].nunique() == records["patient_id"].nunique() > 10
    assert_same_table(spark_table, local_table)
    counts = spark_table["patient_id"].map(spark_table["patient_id"].value_counts())
    accepted = spark_table["refusal"] == ""  # a refused image has no patient context
    known, lone = spark_table["patient_id"].notna() & accepted, spark_table["patient_id"].isna() & accepted
    counts = counts[known]
    assert (spark_table.loc[known, "patient_lesions"] == counts).all()
    assert (spark_table.loc[lone, "patient_lesions"] == 1).all()


def test_spark_engine_gives_a_model_each_patients_count_over_the_whole_input(spark, test_128, patient_count_bundle):
    """With a bundle that reads the patient's image count (the default one does not), patients
    whose images fall into different partitions score as in one process."""
    records = scattered_patients(test_128, 120)
    local_table, _ = local_engine_table(patient_count_bundle, records)
    spark_table, _ = predict_spark(records, patient_count_bundle, spark=spark, partitions=4)
    assert_same_table(spark_table, local_table)


def test_unreadable_images_are_rows_not_a_failed_job(spark, test_128, trained_bundle, tmp_path):
    """Truncated, empty, fake and missing images among real ones (and partitions holding
    nothing readable): the job succeeds, each bad image is reported with the local engine's
    reason, the others are scored."""
    good = test_128.iloc[:6]
    files = broken_images(tmp_path / "broken", Path(good["image_ref"].iloc[0]))
    bad = pd.DataFrame({"image_id": list(files), "image_ref": [str(p) for p in files.values()]})
    for column in good.columns.difference(bad.columns):
        bad[column] = good[column].iloc[0]
    records = pd.concat([bad, good, bad.assign(image_id=bad["image_id"] + "-again")], ignore_index=True)

    local_table, local_errors = local_engine_table(trained_bundle, records)
    spark_table, spark_errors = predict_spark(records, trained_bundle, spark=spark, partitions=4)
    assert spark_errors == local_errors and len(spark_errors) == 8
    assert "cannot read file" in spark_errors["missing"]
    assert spark_table["image"].tolist() == good["image_id"].tolist()
    assert_same_table(spark_table, local_table)

    nothing, errors = predict_spark(bad, trained_bundle, spark=spark)  # not one readable image
    assert nothing.empty and set(errors) == set(files)


def test_predict_command_with_the_spark_engine(spark, test_128, trained_bundle, tmp_path):
    """`dermsight predict --engine spark --master local[2]` on a folder of real images (no
    patients) writes the table the local engine writes, as Parquet and as CSV."""
    folder = tmp_path / "images"
    folder.mkdir()
    for ref in test_128["image_ref"][:48]:  # symlinks: the images stay in the shared folder
        (folder / Path(ref).name).symlink_to(Path(ref).resolve())
    runner = CliRunner()
    local = runner.invoke(app, ["predict", str(folder), "-m", str(trained_bundle), "-o", str(tmp_path / "local.csv")])
    assert local.exit_code == 0, local.output
    local_table = pd.read_csv(tmp_path / "local.csv")
    for name in ("spark.parquet", "spark.csv"):
        distributed = runner.invoke(app, ["predict", str(folder), "-m", str(trained_bundle), "-o", str(tmp_path / name),
                                          "--engine", "spark", "--master", "local[2]", "--partitions", "3"])
        assert distributed.exit_code == 0, distributed.output
        assert "48 images scored" in distributed.output
        table = pd.read_parquet(tmp_path / name) if name.endswith(".parquet") else pd.read_csv(tmp_path / name)
        assert "patient_id" not in table and list(table.columns) == list(local_table.columns)
        assert table["image"].tolist() == local_table["image"].tolist()
        np.testing.assert_allclose(table[PROBABILITIES], local_table[PROBABILITIES], rtol=0, atol=1e-5)
    assert (tmp_path / "spark.csv").read_text() == (tmp_path / "local.csv").read_text()  # byte for byte


@pytest.mark.parametrize(("arguments", "message"), [
    (["--engine", "spark", "--master", "local[0]"], "not a Spark master"),
    (["--engine", "spark", "--master", "spark://head"], "not a Spark master"),  # no port
    (["--engine", "spark", "--master", "mesos://head:5050"], "not a Spark master"),
    (["--engine", "spark", "--spark-conf", "spark.executor.cores"], "KEY=VALUE"),
    (["--master", "local[2]"], "apply to --engine spark"),
    (["--engine", "ray", "--executor-memory", "4g"], "apply to --engine spark"),
    (["--engine", "spark", "--workers", "2"], "apply to --engine ray"),
])
def test_bad_spark_options_are_refused_before_anything_runs(tmp_path, arguments, message):
    result = CliRunner().invoke(app, ["predict", str(tmp_path), *arguments])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("master", ["local", "local[1]", "local[*]", "local[4,2]", "spark://a:7077",
                                    "spark://a:7077,b:7077", "yarn", "k8s://https://k8s.example:6443"])
def test_good_masters_pass(master):
    check_master(master)


def test_unreachable_standalone_master_is_a_clear_error():
    with pytest.raises(SparkEngineError, match=r"cannot reach the Spark master at spark://127\.0\.0\.1:9"):
        start_spark("spark://127.0.0.1:9")


def test_missing_java_and_pyspark_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SparkEngineError, match="openjdk-17-jre-headless"):
        find_java()
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(SparkEngineError, match=r"has no bin/java.*openjdk-17-jre-headless"):
        start_spark("local[1]")
    monkeypatch.setitem(sys.modules, "pyspark", None)  # `import pyspark` raises ImportError
    with pytest.raises(SparkEngineError, match=r'pip install -e "\.\[spark\]"'):
        import_pyspark()


def test_plain_imports_need_no_pyspark():
    """The package, its CLI, the Predictor and the engine module itself import no pyspark or py4j."""
    code = ("import sys, dermsight, dermsight.cli, dermsight.inference.spark_engine, dermsight.inference.predictor; "
            "assert 'pyspark' not in sys.modules and 'py4j' not in sys.modules, 'pyspark imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_spark_engine_on_all_of_test_128(spark, test_128, trained_bundle):
    """All 5,545 images of 344 real patients on local[2]."""
    local_table, local_errors = local_engine_table(trained_bundle, test_128)
    spark_table, spark_errors = predict_spark(test_128, trained_bundle, spark=spark)
    assert spark_errors == local_errors == {}
    assert len(spark_table) == 5545 and spark_table["patient_id"].nunique() == 344
    assert_same_table(spark_table, local_table)
