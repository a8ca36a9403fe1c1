"""What the batch-engine tests (Ray, Spark) share: picking complete patients of test_128 and
comparing an engine's prediction table with the local engine's."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermsight.inference.context import CONTEXT_COLUMNS
from dermsight.inference.predictor import Predictor, withhold_refused

PROBABILITIES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "melanoma_risk"]


def complete_patients(records: pd.DataFrame, n_images: int, seed: int = 0) -> pd.DataFrame:
    """Every image of randomly chosen patients, about n_images in all, in the input order."""
    sizes = records.groupby("patient_id").size().sample(frac=1, random_state=seed)
    chosen = sizes.index[sizes.cumsum() <= n_images]
    return records[records["patient_id"].isin(chosen)].reset_index(drop=True)


def scattered_patients(records: pd.DataFrame, n_images: int, seed: int = 0) -> pd.DataFrame:
    """Complete patients (about n_images) in shuffled order, with their image counts left for
    the engine to count: each patient's images fall into several of the pieces an engine
    splits its input into, so counting within a piece gives other counts."""
    scattered = complete_patients(records, n_images, seed).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return scattered.assign(patient_images=np.nan)


def local_engine_table(bundle, records: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The local engine's (table, {image_id: error}): the Predictor's table as it leaves DermSight."""
    table, errors = Predictor(bundle).predict_records(records, progress=False)
    return withhold_refused(table), errors


def assert_same_table(engine_table: pd.DataFrame, local_table: pd.DataFrame, context_atol: float = 1e-5) -> None:
    """Same columns and dtypes, the same rows in the same order, every text and flag column equal,
    probabilities to 1e-5 and the patient context to `context_atol`."""
    assert list(engine_table.columns) == list(local_table.columns)
    assert engine_table.dtypes.equals(local_table.dtypes)
    assert engine_table["image"].tolist() == local_table["image"].tolist()  # the same rows, in the same order
    np.testing.assert_allclose(engine_table[PROBABILITIES], local_table[PROBABILITIES], rtol=0, atol=1e-5)
    for column in engine_table.columns:
        if engine_table[column].dtype == object or engine_table[column].dtype == bool:
            assert engine_table[column].fillna("-").tolist() == local_table[column].fillna("-").tolist(), column
    context = [c for c in CONTEXT_COLUMNS if c in local_table]
    np.testing.assert_allclose(engine_table[context], local_table[context], rtol=0, atol=context_atol)
