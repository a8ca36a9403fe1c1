"""`dermsight predict`: score images with a bundle, on the batch engine named by --engine."""

from __future__ import annotations

from pathlib import Path

import typer

from dermsight.cli.common import MODEL_HELP, SITE_HELP, console, fail, warn


def register(app: typer.Typer) -> None:
    """Add `dermsight predict` to `app`."""
    app.command("predict")(predict_command)


def predict_command(
    inputs: list[str] = typer.Argument(..., help="Image files or folders, manifest CSVs, or dataset sources ([FORMAT:]PATH)."),
    output: Path = typer.Option(
        Path("predictions.csv"), "--output", "-o",
        help="CSV to write (the layout the ISIC scorer reads), or a .parquet file (same columns, full precision).",
    ),
    model: Path = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    batch_size: int = typer.Option(32, min=1),
    engine: str = typer.Option(
        "local", help="local (this process), ray (Ray Data: every core, or a Ray cluster with --address) "
        "or spark (Apache Spark: local[N], or a cluster with --master).",
    ),
    address: str = typer.Option(None, help="Ray engine: the cluster to run on (ray://HEAD:10001, HEAD:6379 or auto); default a local Ray."),
    workers: int = typer.Option(None, min=1, help="Ray engine: scoring actors, one ONNX session each (default: one per local CPU)."),
    num_cpus: int = typer.Option(None, min=1, help="Ray engine without --address: CPUs of the local Ray (default: all)."),
    master: str = typer.Option(
        None, help="Spark engine: local[N], local[*], spark://HOST:PORT, yarn or k8s://HOST:PORT (default local[*]).",
    ),
    executor_memory: str = typer.Option(
        None, help="Spark engine: memory per executor, e.g. 4g (spark.executor.memory).",
    ),
    partitions: int = typer.Option(
        None, min=1, help="Spark engine: input partitions, one task each (default 2 per core, <= 1,024 images each).",
    ),
    spark_conf: list[str] = typer.Option(
        None, "--spark-conf", help="Spark engine: a Spark setting KEY=VALUE (repeatable), e.g. spark.executor.cores=4."
    ),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse scores of images this bundle scored before ($DERMSIGHT_CACHE/scores)."),
    site: Path = typer.Option(None, "--site", help=SITE_HELP),
) -> None:
    """Score images: one row per image with class probabilities, calibrated melanoma_risk,
    predicted_class, above_threshold and, where patients are known, patient context."""
    from dermsight.data.inputs import records_from_inputs
    from dermsight.inference.engines import ENGINES, EngineError, get_engine
    from dermsight.inference.prediction_files import write_predictions
    from dermsight.models.bundle import BundleError, load_bundle, operating_point, with_site
    from dermsight.models.site_profile import SiteProfileError

    given = {"address": address, "workers": workers, "num_cpus": num_cpus, "master": master,
             "executor_memory": executor_memory, "partitions": partitions, "spark_conf": spark_conf}
    try:
        chosen = get_engine(engine)
        for name, other in ENGINES.items():
            if name != engine and any(given[option] for option in other.options):
                fail(f"{_flags(other.options)} apply to --engine {name}", 2)
        options = chosen.prepare({option: given[option] for option in chosen.options})
    except EngineError as err:
        fail(err, 2)
    records, problems = records_from_inputs(inputs)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    if records.empty:
        console.print("[red]no images to score[/]")
        raise typer.Exit(1)
    try:
        model = with_site(load_bundle(model), site)  # the profile travels with the bundle to every engine
        table, unreadable, bundle = chosen.predict(records, model, batch_size=batch_size, cache=cache, warn=warn, **options)
    except (EngineError, BundleError, SiteProfileError) as err:
        fail(err)
    for image_id, message in unreadable.items():
        console.print(f"[yellow]unreadable[/] {image_id}: {message}", highlight=False)
    write_predictions(table, output)
    flagged = int(table["above_threshold"].sum())
    console.print(
        f"{len(table):,} images scored with {bundle.name} -> {output}; "
        f"{flagged:,} at or above the melanoma threshold {bundle.melanoma_threshold:.4f}; "
        f"{int((table['refusal'] != '').sum()):,} refused as not dermoscopic (no risk given); "
        f"{len(unreadable) + len(problems):,} skipped"
    )
    console.print(f"operating point: {operating_point(bundle)}", highlight=False, soft_wrap=True)


def _flags(options: tuple[str, ...]) -> str:
    """("master", "spark_conf") -> "--master and --spark-conf"."""
    flags = [f"--{option.replace('_', '-')}" for option in options]
    return f"{', '.join(flags[:-1])} and {flags[-1]}" if len(flags) > 1 else flags[0]
