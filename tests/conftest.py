"""Shared fixtures: the real ISIC datasets (read in place, never copied into the repo)
and the readers' output on them, loaded once per test worker."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

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
