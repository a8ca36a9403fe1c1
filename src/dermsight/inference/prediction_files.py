"""Prediction tables on disk: what `dermsight predict` writes and `dermsight evaluate --predictions` reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PARQUET_SUFFIXES = (".parquet", ".pq")


class PredictionFileError(ValueError):
    """A predictions file that is missing or cannot be read as a table; the message names it."""


def write_predictions(table: pd.DataFrame, output: Path) -> None:
    """A prediction table as Parquet (.parquet, .pq) or, for any other name, CSV with six decimals."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() in PARQUET_SUFFIXES:
        table.to_parquet(output, index=False)
    else:
        table.to_csv(output, index=False, float_format="%.6f")


def read_predictions(path: Path) -> pd.DataFrame:
    """A prediction table written by `write_predictions` (or any CSV/Parquet in its layout)."""
    if not path.is_file():
        raise PredictionFileError(f"{path}: no such predictions file")
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype={"image": str, "image_id": str, "patient_id": str}, float_precision="round_trip")
    except (ValueError, UnicodeDecodeError, OSError) as err:  # pandas' parser errors are ValueErrors; pyarrow's too
        raise PredictionFileError(f"{path}: not a readable predictions table ({err})") from None
