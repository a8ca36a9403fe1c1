"""Batch engines by name, as `dermsight.data.sources.READERS` is for formats: `dermsight predict
--engine NAME` looks its engine up in ENGINES. Each engine scores a record table into the
single-process `Predictor.predict_records` table as it leaves DermSight (`withhold_refused`: a
refused image keeps its reason and no model output); a new engine is one more class with `options`,
`prepare` and `predict`, registered below (what engines share lives in `engine_steps`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from dermsight.inference.engine_steps import EngineError
from dermsight.models.bundle import Bundle, load_bundle

Warn = Callable[[str], None]


class BatchEngine(Protocol):
    """One way to score a record table; `options` name the keyword options only it takes."""

    options: tuple[str, ...]

    def prepare(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options checked (EngineError when malformed) before any image is read."""

    def predict(self, records: pd.DataFrame, model: Bundle | Path | None, *, batch_size: int, cache: bool, warn: Warn,
                **options: Any) -> tuple[pd.DataFrame, dict[str, str], Bundle]:
        """(prediction table, refused images' outputs withheld; {image_id: error}; the bundle used)
        for `records`; `model` is a bundle
        directory or a Bundle (which may carry a site profile: every engine applies it)."""


class LocalEngine:
    """This process: the Predictor, with the bundle's score cache unless `cache` is False."""

    options: tuple[str, ...] = ()

    def prepare(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(options)

    def predict(self, records, model, *, batch_size, cache, warn, **options):
        from dermsight.inference.predictor import Predictor, withhold_refused
        from dermsight.inference.score_cache import open_score_cache

        predictor = Predictor(model)
        score_cache = open_score_cache(predictor.bundle, warn) if cache else None
        table, unreadable = predictor.predict_records(records, batch_size=batch_size, cache=score_cache)
        return withhold_refused(table), unreadable, predictor.bundle


class RayEngine:
    """Ray Data: every local core, or a Ray cluster (see `dermsight.inference.ray_engine`)."""

    options: tuple[str, ...] = ("address", "workers", "num_cpus")

    def prepare(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(options)

    def predict(self, records, model, *, batch_size, cache, warn, **options):
        from dermsight.inference.ray_engine import predict_ray

        bundle = model if isinstance(model, Bundle) else load_bundle(model)
        table, unreadable = predict_ray(records, bundle, batch_size=batch_size, **options)
        return table, unreadable, bundle


class SparkEngine:
    """Apache Spark: local[N] or a cluster (see `dermsight.inference.spark_engine`)."""

    options: tuple[str, ...] = ("master", "executor_memory", "partitions", "spark_conf")

    def prepare(self, options: Mapping[str, Any]) -> dict[str, Any]:
        from dermsight.inference.spark_engine import check_master, parse_conf

        prepared = {**options, "spark_conf": parse_conf(options.get("spark_conf") or ())}
        if prepared.get("master") is not None:
            check_master(prepared["master"])
        return prepared

    def predict(self, records, model, *, batch_size, cache, warn, **options):
        from dermsight.inference.spark_engine import predict_spark

        bundle = model if isinstance(model, Bundle) else load_bundle(model)
        conf = options.pop("spark_conf", None)
        table, unreadable = predict_spark(records, bundle, conf=conf, batch_size=batch_size, **options)
        return table, unreadable, bundle


ENGINES: dict[str, BatchEngine] = {"local": LocalEngine(), "ray": RayEngine(), "spark": SparkEngine()}


def get_engine(name: str) -> BatchEngine:
    """The engine registered as `name`; EngineError naming the registered ones otherwise."""
    if name not in ENGINES:
        names = list(ENGINES)
        expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise EngineError(f"unknown engine {name!r}; expected {expected}")
    return ENGINES[name]
