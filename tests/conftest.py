"""Shared fixtures: the real ISIC datasets (read in place, never copied into the repo)
and the readers' output on them, loaded once per test worker; and fresh databases on
both storage backends (SQLite, and a throwaway PostgreSQL cluster per test worker)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import system_deps
from PIL import Image, ImageDraw
from sqlalchemy import create_engine

from dermsight.data import readers
from dermsight.data.records import Loaded

REPO = Path(__file__).resolve().parents[1]
EXPECTED = (
    "ham10000/HAM10000_metadata.csv",
    "ham10000/images",
    "isic9/train",
    "isic2020/train_sample.csv",
    "isic2020/test_128.csv",
    "isic2019/ISIC_2019_Training_GroundTruth.csv",
    "isic2018/ISIC2018_Task3_Training_GroundTruth.csv",
)
BACKENDS = ("sqlite", "postgresql")  # the web app's storage backends, for parametrised fixtures


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared datasets folder: $DERMSIGHT_DATA, else <repo>/../shared/datasets."""
    env = os.environ.get("DERMSIGHT_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "datasets"
    missing = [name for name in EXPECTED if not (path / name).exists()]
    if missing:
        pytest.fail(
            f"the shared ISIC datasets are not at {path} (missing: {', '.join(missing)}). "
            "Set DERMSIGHT_DATA to the datasets folder (see scripts/env.sh).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def ham(shared) -> Loaded:
    return readers.read_ham10000(shared / "ham10000")


@pytest.fixture(scope="session")
def isic9(shared) -> Loaded:
    return readers.read_class_folders(shared / "isic9" / "train")


@pytest.fixture(scope="session")
def isic2020(shared) -> Loaded:
    return readers.read_isic2020_folder(shared / "isic2020")


@pytest.fixture(scope="session")
def test_128(shared) -> pd.DataFrame:
    """Records of the 5,545 SIIM-ISIC 2020 test_128 images (unlabelled), with patients, age, sex and
    site: what the batch-engine tests score."""
    from dermsight.data.inputs import records_from_inputs

    records, _ = records_from_inputs([str(shared / "isic2020")])
    records = records[records["image_ref"].str.contains("/test_128/", regex=False)].reset_index(drop=True)
    assert len(records) == 5545 and records["patient_id"].nunique() == 344
    return records


@pytest.fixture(scope="session")
def train_sample(shared) -> pd.DataFrame:
    """The real SIIM-ISIC 2020 train_sample.csv rows (as text), with a `path` column."""
    frame = pd.read_csv(shared / "isic2020" / "train_sample.csv", dtype=str, keep_default_na=False)
    frame["path"] = [shared / "isic2020" / "train_sample" / f"{name}.jpg" for name in frame["image_name"]]
    return frame


def combine(*parts: Loaded) -> Loaded:
    """A new Loaded holding copies of the parts (session fixtures must stay untouched)."""
    out = Loaded()
    for part in parts:
        out.extend(Loaded(part.records.copy(), list(part.problems)))
    return out


def _trained_once(tmp_path_factory, name: str, **config) -> Path:
    """A small embed-mode bundle (frozen ImageNet features) trained once per test run with
    `config` (xdist workers share it through a file lock, and one embedding cache)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "bundle.json").exists():
            from dermsight.training.config import TrainConfig
            from dermsight.training.train import train

            train(TrainConfig(output=target, cache_dir=root / "tiny_bundle_cache", progress=False, **config))
    return target


@pytest.fixture(scope="session")
def tiny_bundle(shared, tmp_path_factory) -> Path:
    """A small embed-mode bundle trained once per test run on 300 real images."""
    sources = [str(shared / "ham10000"), str(shared / "isic9" / "train")]
    return _trained_once(tmp_path_factory, "tiny_bundle", sources=sources, max_images=300, folds=3)


@pytest.fixture(scope="session")
def patient_count_bundle(shared, tmp_path_factory) -> Path:
    """A small embed-mode bundle whose network reads the patient's image count: trained on 150
    real images, ISIC 2020 ones (whose patients' counts are known) beside isic9 ones (unknown).
    The default bundle leaves that feature out, so it cannot show which count a path passes."""
    sources = [str(shared / "isic2020" / "train_extra.csv"), str(shared / "isic9" / "train")]
    return _trained_once(tmp_path_factory, "patient_count_bundle", sources=sources, max_images=150, folds=3,
                         views=("identity",))


@pytest.fixture(scope="session")
def trained_bundle(request) -> Path:
    """A real model bundle: $DERMSIGHT_TEST_BUNDLE, else the committed default when present,
    else the tiny one."""
    from dermsight.models.bundle import DEFAULT_BUNDLE

    for candidate in (os.environ.get("DERMSIGHT_TEST_BUNDLE"), DEFAULT_BUNDLE):
        if candidate and (Path(candidate) / "bundle.json").exists():
            return Path(candidate)
    return request.getfixturevalue("tiny_bundle")


@pytest.fixture(scope="session")
def document_png() -> bytes:
    """A rendered page of text: an image, but nothing like a dermoscopic one."""
    page = Image.new("RGB", (600, 800), "white")
    draw = ImageDraw.Draw(page)
    widths = np.random.default_rng(0).integers(200, 520, size=26)
    for line, width in enumerate(widths):
        draw.rectangle([40, 40 + 28 * line, 40 + int(width), 50 + 28 * line], fill="black")
    out = io.BytesIO()
    page.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def lesion_images(shared) -> list[Path]:
    """Six real HAM10000 images for the web app tests: two melanomas, three nevi, one
    benign keratosis."""
    metadata = pd.read_csv(shared / "ham10000" / "HAM10000_metadata.csv").sort_values("image_id")
    chosen = [*metadata[metadata.dx == "mel"].image_id[:2], *metadata[metadata.dx == "nv"].image_id[:3],
              *metadata[metadata.dx == "bkl"].image_id[:1]]
    return [shared / "ham10000" / "images" / f"{image_id}.jpg" for image_id in chosen]


@pytest.fixture(scope="session")
def clinical_photos(shared) -> list[Path]:
    """Four real ordinary close-up photos of moles (not dermoscopy): Derm7pt clinical photos of
    its published valid split, whose cases no photo detector is fitted on."""
    photos = readers.derm7pt_clinical_photos(shared / "derm7pt", split="valid")
    return [Path(ref) for ref in photos["clinical_ref"].iloc[[0, 40, 80, 120]]]


@pytest.fixture(scope="session")
def serving_bundle(tiny_bundle, shared, lesion_images, clinical_photos, document_png, tmp_path_factory) -> Path:
    """A copy of `tiny_bundle` for the web app tests (which may change it) with a photo
    detector fitted for its preprocessing (a small sample: 60 images per dermoscopy source, 120
    Derm7pt train-split photos), checked to accept `lesion_images`, to refuse `document_png` and
    at least two of the four `clinical_photos` with its own gate."""
    from dermsight.inference.predictor import Predictor
    from dermsight.models.bundle import load_bundle
    from dermsight.training.photo_gate import fit_photo_gate, shared_dermoscopy

    copy = tmp_path_factory.mktemp("serving") / "bundle"
    shutil.copytree(tiny_bundle, copy, ignore=shutil.ignore_patterns("weights.pt", "out_of_fold.csv.gz"))
    config = json.loads((copy / "bundle.json").read_text())
    config["name"] = "serving-test"
    (copy / "bundle.json").write_text(json.dumps(config, indent=1))
    fit_photo_gate(load_bundle(copy), shared_dermoscopy(shared, per_source=60), [shared / "derm7pt"], max_photos=120)
    images = [*(path.read_bytes() for path in [*lesion_images, *clinical_photos]), document_png]
    _, scores, _ = Predictor(copy).predict_images(images, pd.DataFrame({"age": [None] * len(images)}))
    looks = scores.looks_dermoscopic.tolist()
    assert looks[: len(lesion_images)] == [True] * len(lesion_images) and looks[-1] is False
    assert sum(not ok for ok in looks[len(lesion_images) : -1]) >= 2  # most photos (the rate: bench/ood.py)
    return copy


# -- databases ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port (initdb in a temporary
    directory, run as user postgres when root), one per test worker; yields its base URL.
    Without PostgreSQL its tests skip, or fail in CI (system_deps)."""
    bin_dir = Path(system_deps.initdb()).parent
    root = Path(tempfile.mkdtemp(prefix="dermsight-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    run = lambda *args: subprocess.run([*as_postgres, *args], check=True, capture_output=True)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o", options, "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def new_database(request) -> Callable[[str, Path], str]:
    """`new_database(backend, folder)`: the URL of a fresh, empty database of `backend`
    ("sqlite": dermsight.db in `folder`, where the app puts it by default; "postgresql": a new
    database on `postgres_server`, started on first use)."""

    def make(backend: str, folder: Path) -> str:
        if backend == "sqlite":
            return f"sqlite:///{folder / 'dermsight.db'}"
        assert backend == "postgresql", backend
        base = request.getfixturevalue("postgres_server")
        name = f"t_{uuid.uuid4().hex}"
        admin = create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        return f"{base}/{name}"

    return make


@pytest.fixture(params=BACKENDS)
def database_url(request, new_database, tmp_path) -> str:
    """A fresh, empty database for this test, once on each backend."""
    return new_database(request.param, tmp_path)


@pytest.fixture(scope="module", params=BACKENDS)
def module_database_url(request, new_database, tmp_path_factory) -> str:
    """A fresh, empty database shared by a module's tests, once on each backend (every test
    of the module that uses it runs twice)."""
    return new_database(request.param, tmp_path_factory.mktemp(f"db-{request.param}"))
