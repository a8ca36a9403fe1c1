"""The `dermsight` command: data | train | evaluate | predict | serve | keys."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from dermsight.data.dataset import build_dataset, deduplicate, load_sources, save_manifest
from dermsight.data.records import Loaded, SourceError
from dermsight.data.schema import DIAGNOSES
from dermsight.data.sources import READERS
from dermsight.data.summary import problem_examples, summarise
from dermsight.imaging.validate import find_unreadable

app = typer.Typer(help="DermSight: melanoma decision support from dermoscopic images.", no_args_is_help=True)
data_app = typer.Typer(help="Read, check and combine datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
errors = Console(stderr=True)

SOURCES_HELP = f"Dataset paths, optionally prefixed FORMAT: (one of {', '.join(READERS)})."


@data_app.command("summary")
def data_summary(
    sources: list[str] = typer.Argument(..., help=SOURCES_HELP),
    check_images: bool = typer.Option(True, help="Decode every image to find unreadable files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Images, patients, lesions, classes, missing metadata and unreadable files per source."""
    per_source: dict[str, Loaded] = {spec: load_sources([spec]) for spec in sources}
    combined = Loaded()
    for loaded in per_source.values():
        if check_images and not loaded.records.empty:
            loaded.problems.extend(find_unreadable(loaded.records, progress=not as_json))
        combined.extend(loaded)
    combined = deduplicate(combined)
    report = {spec: summarise(loaded.records, loaded.problems) for spec, loaded in per_source.items()}
    if len(sources) > 1:
        report["combined (deduplicated)"] = summarise(combined.records, combined.problems)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _print_summary(report)
        examples = problem_examples([p for p in combined.problems if p.kind != "unreadable_source"])
        for kind, lines in examples.items():
            console.print(f"[bold yellow]{kind}[/] ({report_total(report, kind)}):")
            for line in lines:
                console.print(f"  {line}", highlight=False, soft_wrap=True)
    _exit_if_unreadable_sources(combined)


def _exit_if_unreadable_sources(loaded: Loaded) -> None:
    """A source that cannot be read at all (no such path, a CSV missing a column) is an
    error, not a footnote: say so on stderr (JSON on stdout stays valid) and exit 1."""
    failed = [p for p in loaded.problems if p.kind == "unreadable_source"]
    for problem in failed:
        errors.print(f"[bold red]error:[/] cannot read {problem.where}: {problem.message}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def report_total(report: dict, kind: str) -> int:
    return list(report.values())[-1]["problems"].get(kind, 0)


def _print_summary(report: dict) -> None:
    table = Table(title="Dataset summary", show_lines=False)
    table.add_column("")
    for name in report:
        table.add_column("/".join(Path(name).parts[-2:]) if "/" in name else name, justify="right")
    rows = [
        ("records", lambda s: s["records"]),
        ("images on disk", lambda s: s["images"]),
        ("unreadable images", lambda s: s["unreadable_images"]),
        ("patients", lambda s: s["patients"]),
        ("lesions", lambda s: s["lesions"]),
        *[(code, lambda s, c=code: s["classes"][c]) for code in DIAGNOSES],
        ("unlabelled", lambda s: s["unlabelled"]),
        ("melanoma", lambda s: s["melanoma"]),
        *[(f"missing {c}", lambda s, c=c: s["missing"][c]) for c in ("age", "sex", "site")],
        ("skipped rows", lambda s: s["skipped_rows"]),
    ]
    for label, value in rows:
        table.add_row(label, *[f"{value(s):,}" for s in report.values()])
    console.print(table)


@data_app.command("build")
def data_build(
    sources: list[str] = typer.Argument(..., help=SOURCES_HELP),
    output: Path = typer.Option(Path("runs/manifest.csv"), "--output", "-o", help="Manifest CSV to write."),
    folds: int = typer.Option(5, min=2, help="Number of patient/lesion-grouped folds."),
    seed: int = typer.Option(0, help="Seed of the fold assignment."),
    source_folds: bool = typer.Option(False, "--source-folds", help="Leave-one-source-out folds: the largest source in grouped folds, every other source whole in a fold of its own."),
) -> None:
    """Combine sources, deduplicate by image id, assign grouped folds, save the manifest."""
    try:
        loaded = build_dataset(sources, folds, seed, by_source=source_folds)
    except SourceError as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from None
    _exit_if_unreadable_sources(loaded)  # a manifest silently missing a source is worse than none
    save_manifest(loaded, output, sources=sources, n_folds=folds, seed=seed)
    summary = summarise(loaded.records, loaded.problems)
    console.print(
        f"{summary['records']:,} records ({summary['images']:,} with images) in {folds} grouped folds -> {output}"
    )


@app.command("train")
def train_command(
    sources: list[str] = typer.Argument(..., help=SOURCES_HELP),
    output: Path = typer.Option(Path("runs/bundle"), "--output", "-o", help="Bundle directory to write."),
    mode: str = typer.Option("embed", help="embed (frozen backbone, cached embeddings: minutes) or finetune (end to end)."),
    backbone: str = typer.Option("efficientnet_lite0", help="efficientnet_lite0 or efficientnet_lite2."),
    image_size: int = typer.Option(224, help="Input size in pixels (finetune on CPU: 128-192)."),
    views: str = typer.Option("identity,hflip", help="Test-time views, comma-separated: identity,hflip,vflip,rot180."),
    folds: int = typer.Option(5, min=2, help="Patient/lesion-grouped folds for out-of-fold validation."),
    seed: int = typer.Option(0),
    binary: bool = typer.Option(False, help="Melanoma vs everything else (MEL / UNK) instead of the ISIC classes."),
    loss: str = typer.Option("ce", help="ce (class-weighted cross-entropy) or focal."),
    l2: float = typer.Option(0.1, help="Embed mode: L2 penalty of the linear head (0.1 was best of 0.001-1 in grouped CV)."),
    target_sensitivity: float = typer.Option(0.90, min=0.5, max=0.999, help="Melanoma sensitivity the threshold aims for."),
    epochs: int = typer.Option(3, min=1, help="Finetune mode: epochs of the first cosine cycle."),
    restart_epochs: int = typer.Option(0, min=0, help="Finetune mode: then a warm restart (a second cosine cycle from 30% of the peak learning rate) of this many epochs; rerun with it to extend a finished run from its checkpoints."),
    batch_size: int = typer.Option(48, min=2, help="Finetune mode: batch size."),
    learning_rate: float = typer.Option(1e-3, help="Finetune mode: peak AdamW learning rate."),
    validation_folds: int = typer.Option(None, min=1, help="Finetune mode: hold out only the first N folds (CPU budget)."),
    refit: bool = typer.Option(True, help="Finetune mode: refit on all images (--no-refit ships the first fold's network)."),
    int8: bool = typer.Option(False, "--int8", help="Finetune mode: ship the int8 graph (2x faster); calibration and threshold are fitted on int8 outputs."),
    max_images: int = typer.Option(None, help="Train on a random subset of this many images (smoke runs)."),
    patience: int = typer.Option(2, min=0, help="Finetune mode: early-stopping patience in epochs, on the balanced accuracy of a grouped 15% of each network's own training images (never the fold it predicts); 0 runs the schedule to its end without scoring every epoch."),
    source_folds: bool = typer.Option(False, "--source-folds", help="Leave-one-source-out folds: the largest source in grouped folds, every other source whole in a fold of its own."),
    fit: str = typer.Option("crop", help="Preprocessing: crop (shorter side, centre crop) or squash (the whole frame to a square)."),
    colour_constancy: bool = typer.Option(False, "--colour-constancy", help="Shades of Gray colour constancy, in training and inference."),
    acquisition_augmentation: bool = typer.Option(False, "--acquisition-augmentation", help="Finetune mode: JPEG re-encoding, downscaling, blur, noise, aspect and colour-temperature changes."),
    source_prior: bool = typer.Option(False, "--source-prior", help="Finetune mode: logit adjustment by each source's class mix (instead of class weights)."),
    metadata: str = typer.Option("all", help="Metadata the network reads: all, source-neutral (no patient image count: only ISIC 2020 fills it) or none."),
    metadata_dropout: float = typer.Option(0.0, min=0.0, max=1.0, help="Finetune mode: share of training images shown with every metadata field missing."),
    gate_negatives: list[Path] = typer.Option(None, "--gate-negatives", help="A Derm7pt folder: its clinical close-up photos (published train split) teach the out-of-distribution gate what an ordinary photo looks like."),
    threshold_every_source: bool = typer.Option(False, "--threshold-every-source", help="The melanoma threshold reaches --target-sensitivity on every training source's held-out images (the lowest of their thresholds), not only pooled."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Finetune mode: ship the fold networks as one averaged graph (their spread is the uncertainty) instead of a refit."),
) -> None:
    """Train a model bundle: out-of-fold validation, calibration, threshold, ONNX export."""
    from dermsight.allocator import tune_for_torch

    tune_for_torch()  # glibc malloc as scripts/env.sh sets it (CPU torch trains ~1.5x faster): see dermsight.allocator
    from dermsight.models.metadata import METADATA_FEATURES, SOURCE_NEUTRAL_FEATURES
    from dermsight.training.config import TrainConfig
    from dermsight.training.train import train

    features = {"all": METADATA_FEATURES, "source-neutral": SOURCE_NEUTRAL_FEATURES, "none": ()}
    if metadata not in features:
        errors.print(f"[bold red]error:[/] unknown --metadata {metadata!r}; expected all, source-neutral or none", highlight=False)
        raise typer.Exit(2)
    config = TrainConfig(
        sources=sources, output=output, mode=mode, backbone=backbone, image_size=image_size,
        views=tuple(v.strip() for v in views.split(",") if v.strip()), folds=folds, seed=seed, binary=binary, loss=loss, l2=l2,
        target_sensitivity=target_sensitivity, epochs=epochs, restart_epochs=restart_epochs, validation_folds=validation_folds, batch_size=batch_size, learning_rate=learning_rate,
        int8=int8, max_images=max_images, patience=patience, source_folds=source_folds, fit=fit,
        colour_constancy=colour_constancy, acquisition_augmentation=acquisition_augmentation, source_prior=source_prior,
        metadata_features=features[metadata], metadata_dropout=metadata_dropout, ensemble=ensemble,
        gate_negatives=tuple(str(p) for p in gate_negatives or ()), threshold_every_source=threshold_every_source,
        refit=refit and not ensemble,
    )
    bundle = train(config)
    pooled = bundle.metrics["pooled"]
    console.print(
        f"bundle -> {bundle.path}: melanoma AUC {pooled['melanoma']['auc']['value']:.3f}, "
        f"balanced accuracy {pooled['multiclass']['balanced_accuracy']:.3f} (out-of-fold), "
        f"threshold {bundle.melanoma_threshold:.4f}"
    )


@app.command("predict")
def predict_command(
    inputs: list[str] = typer.Argument(..., help="Image files or folders, manifest CSVs, or dataset sources ([FORMAT:]PATH)."),
    output: Path = typer.Option(
        Path("predictions.csv"), "--output", "-o",
        help="CSV to write (the layout the ISIC scorer reads), or a .parquet file (same columns, full precision).",
    ),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the committed default bundle)."),
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
) -> None:
    """Score images: one row per image with class probabilities, calibrated melanoma_risk,
    predicted_class, above_threshold and, where patients are known, patient context."""
    from dermsight.inference.inputs import records_from_inputs
    from dermsight.inference.predictor import Predictor
    from dermsight.models.bundle import BundleError, load_bundle

    if engine not in ("local", "ray", "spark"):
        errors.print(f"[bold red]error:[/] unknown engine {engine!r}; expected local, ray or spark", highlight=False)
        raise typer.Exit(2)
    if engine != "ray" and (address or workers or num_cpus):
        errors.print("[bold red]error:[/] --address, --workers and --num-cpus apply to --engine ray", highlight=False)
        raise typer.Exit(2)
    if engine != "spark" and (master or executor_memory or partitions or spark_conf):
        errors.print(
            "[bold red]error:[/] --master, --executor-memory, --partitions and --spark-conf apply to --engine spark",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(2)
    if engine == "spark":
        from dermsight.inference.spark_engine import SparkEngineError, check_master, parse_conf

        try:
            settings = parse_conf(spark_conf or ())
            if master is not None:
                check_master(master)
        except SparkEngineError as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    records, problems = records_from_inputs(inputs)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    if records.empty:
        console.print("[red]no images to score[/]")
        raise typer.Exit(1)
    if engine == "ray":
        from dermsight.inference.ray_engine import RayEngineError, predict_ray

        try:
            bundle = load_bundle(model)
            table, unreadable = predict_ray(
                records, bundle, address=address, workers=workers, num_cpus=num_cpus, batch_size=batch_size
            )
        except (RayEngineError, BundleError) as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    elif engine == "spark":
        from dermsight.inference.spark_engine import predict_spark

        try:
            bundle = load_bundle(model)
            table, unreadable = predict_spark(
                records, bundle, master=master, executor_memory=executor_memory, conf=settings, partitions=partitions,
                batch_size=batch_size,
            )
        except (SparkEngineError, BundleError) as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    else:
        predictor = Predictor(model)
        bundle = predictor.bundle
        table, unreadable = predictor.predict_records(records, batch_size=batch_size, cache=_score_cache(bundle, cache))
    for image_id, message in unreadable.items():
        console.print(f"[yellow]unreadable[/] {image_id}: {message}", highlight=False)
    write_predictions(table, output)
    flagged = int(table["above_threshold"].sum())
    console.print(
        f"{len(table):,} images scored with {bundle.name} -> {output}; "
        f"{flagged:,} at or above the melanoma threshold {bundle.melanoma_threshold:.4f}; "
        f"{len(unreadable) + len(problems):,} skipped"
    )


def _score_cache(bundle, enabled: bool):
    """The bundle's score cache, or None (disabled, or the cache folder is not writable: scoring still works)."""
    import sqlite3

    from dermsight.inference.score_cache import ScoreCache

    if not enabled:
        return None
    try:
        return ScoreCache(bundle)
    except (OSError, sqlite3.Error) as err:
        console.print(f"[yellow]score cache unavailable ({err}); scoring every image[/]", highlight=False)
        return None


def write_predictions(table: pd.DataFrame, output: Path) -> None:
    """A prediction table as Parquet (.parquet, .pq) or, for any other name, CSV with six decimals."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() in (".parquet", ".pq"):
        table.to_parquet(output, index=False)
    else:
        table.to_csv(output, index=False, float_format="%.6f")


@app.command("evaluate")
def evaluate_command(
    data: list[str] = typer.Argument(None, help="Labelled data: dataset sources ([FORMAT:]PATH) or DermSight manifest CSVs."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the committed default bundle)."),
    predictions: Path = typer.Option(
        None, "--predictions", "-p", help="Evaluate this `dermsight predict` CSV (or .parquet) against DATA instead of scoring DATA."
    ),
    cv: bool = typer.Option(False, "--cv", help="Report the bundle's grouped cross-validation (its out_of_fold.csv.gz); with DATA, only DATA's images (e.g. HAM10000's share)."),
    output: Path = typer.Option(Path("runs/evaluation"), "--output", "-o", help="Folder for report.json, report.html (and predictions.csv)."),
    batch_size: int = typer.Option(32, min=1),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the 95% intervals."),
    min_count: int = typer.Option(30, min=1, help="Subgroups with fewer images are flagged too small."),
    min_positives: int = typer.Option(5, min=0, help="Subgroups with fewer melanomas are flagged too small."),
    robustness: bool = typer.Option(False, "--robustness", help="Also re-score held-out images of DATA under other acquisitions (JPEG quality, resolution, aspect, colour, focus): the report's sweep plot."),
) -> None:
    """Evaluate a bundle on labelled data (scoring it, or an existing predict CSV), or report its
    cross-validation: official ISIC scores, melanoma AUC and sensitivity/specificity at the
    threshold with cluster-bootstrap intervals, calibration, subgroups -> report.json + report.html."""
    from dermsight.evaluation.evaluate import EvaluationError, evaluate_cv, evaluate_predictions
    from dermsight.evaluation.report import write_report
    from dermsight.models.bundle import BundleError, load_bundle

    data = data or []
    options = dict(n_boot=bootstrap, min_count=min_count, min_positives=min_positives)
    try:
        if cv and predictions is not None:
            raise EvaluationError("--cv reports the bundle's own out-of-fold predictions; it takes no --predictions")
        if not cv and not data:
            raise EvaluationError("give the labelled DATA to evaluate on (dataset sources or a manifest), or --cv")
        try:
            bundle = load_bundle(model)
        except BundleError as err:
            hint = "; no --model given, so the default bundle was tried: pass --model BUNDLE_DIR" if model is None else ""
            raise BundleError(f"{err}{hint}") from None
        if cv:
            refs = _image_refs(data or bundle.training.get("config", {}).get("sources", []), quiet=not data)
            with console.status("computing cross-validation metrics"):
                result = evaluate_cv(bundle, image_refs=refs, only_images=set(refs) if data else None, **options)
        else:
            truth = _truth_records(data)
            if predictions is not None:
                table, unscored = _read_predictions(predictions), {}
            else:
                table, unscored = _score(bundle, truth.records, batch_size, output)
            with console.status("computing metrics"):
                result = evaluate_predictions(
                    table, truth.records, bundle, unscored=unscored, reading_problems=truth.problems, **options
                )
        if robustness:
            if not data:
                raise EvaluationError("--robustness re-scores images: give the labelled DATA")
            with console.status("re-scoring held-out images under other acquisitions"):
                result["robustness"] = {"sweep": _acquisition_sweep(bundle, _truth_records(data).records)}
        with console.status("writing the report"):
            paths = write_report(result, output)
    except (EvaluationError, BundleError, SourceError, OSError) as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_evaluation(result)
    console.print(f"report -> {paths['html']} (numbers: {paths['json']})", highlight=False)


def _acquisition_sweep(bundle, records: pd.DataFrame, per_source: int = 300) -> list[dict]:
    """The acquisition sweep on up to `per_source` held-out labelled images of each source, each
    scored by a network that never saw it (see dermsight.evaluation.robustness)."""
    from dermsight.evaluation.held_out import HeldOutError, held_out_kinds, load_out_of_fold
    from dermsight.evaluation.robustness import acquisition_sweep, members_of
    from dermsight.inference.predictor import Predictor

    try:
        oof = load_out_of_fold(bundle)
    except HeldOutError:
        oof = pd.DataFrame(columns=["image_id", "source", "patient_id", "lesion_id", "fold"])
    predictor = Predictor(bundle)
    records = records[records["image_ref"].notna() & records["diagnosis"].notna()].reset_index(drop=True)
    records["fold"] = records["image_id"].map(oof.set_index("image_id")["fold"])
    records["member"] = members_of(predictor, records["fold"].to_numpy())
    kinds = held_out_kinds(bundle, records, oof)
    held_out = np.isin(kinds, ("left_out_source", "external_source", "unseen_images")) | (records["member"] >= 0).to_numpy()
    chosen = records[held_out].sample(frac=1.0, random_state=0).groupby("source").head(per_source).reset_index(drop=True)
    if chosen.empty:
        raise EvaluationError("no image of DATA is held out from this bundle: nothing to re-score honestly")
    return acquisition_sweep(predictor, chosen, chosen["member"].to_numpy())


def _truth_records(data: list[str]) -> Loaded:
    """Labelled records from dataset sources or manifests, deduplicated; unreadable sources exit 1."""
    from dermsight.data.dataset import load_manifest

    loaded = Loaded()
    for spec in data:
        path = Path(spec)
        if path.is_file() and path.suffix.lower() == ".csv" and _is_manifest(path):
            loaded.extend(Loaded(load_manifest(path), []))
        else:
            loaded.extend(load_sources([spec]))
    loaded = deduplicate(loaded)
    _exit_if_unreadable_sources(loaded)
    skipped = [p for p in loaded.problems if p.skipped and p.kind != "unreadable_source"]
    if skipped:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in Counter(p.kind for p in skipped).items())
        console.print(f"[yellow]skipped while reading the sources:[/] {kinds} (listed in the report)", highlight=False)
    if loaded.records.empty:
        raise SourceError("the DATA sources hold no records")
    return loaded


def _is_manifest(path: Path) -> bool:
    try:
        return {"image_id", "image_ref", "source", "diagnosis"} <= set(pd.read_csv(path, nrows=0).columns)
    except (ValueError, UnicodeDecodeError):
        return False


def _read_predictions(path: Path) -> pd.DataFrame:
    from dermsight.evaluation.evaluate import EvaluationError

    if not path.is_file():
        raise EvaluationError(f"{path}: no such predictions file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype={"image": str, "image_id": str, "patient_id": str}, float_precision="round_trip")
    except (ValueError, UnicodeDecodeError, OSError) as err:  # pandas' parser errors are ValueErrors; pyarrow's too
        raise EvaluationError(f"{path}: not a readable predictions table ({err})") from None


def _score(bundle, records: pd.DataFrame, batch_size: int, output: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Predictions for the labelled records with an image: an image the bundle trained on takes
    its out-of-fold prediction (from a network that never saw it; the shipped one did), every
    other image is scored by the Predictor. The table is also saved as OUTPUT/predictions.csv
    (the `predict` layout) for re-evaluation with --predictions."""
    from dermsight.evaluation.evaluate import EvaluationError
    from dermsight.evaluation.held_out import HeldOutError, load_out_of_fold, out_of_fold_predictions
    from dermsight.inference.predictor import Predictor

    labelled = records[records["image_ref"].notna() & records["diagnosis"].notna()].reset_index(drop=True)
    if labelled.empty:
        raise EvaluationError("DATA holds no labelled record with an image file to score")
    try:
        oof = load_out_of_fold(bundle)
    except HeldOutError:
        oof = pd.DataFrame(columns=["image_id", *bundle.classes])
    trained = labelled["image_id"].isin(set(oof["image_id"]))
    parts, unscored = [], {}
    if trained.any():
        parts.append(out_of_fold_predictions(bundle, oof[oof["image_id"].isin(set(labelled["image_id"]))].reset_index(drop=True)))
        console.print(f"{int(trained.sum()):,} images the bundle trained on: their out-of-fold predictions are used")
    if not trained.all():
        predictor = Predictor(bundle)
        table, unscored = predictor.predict_records(labelled[~trained], batch_size=batch_size, cache=_score_cache(bundle, True))
        parts.append(table)
    table = pd.concat(parts, ignore_index=True)
    for image_id, message in list(unscored.items())[:5]:
        console.print(f"[yellow]unreadable[/] {image_id}: {message}", highlight=False)
    write_predictions(table, output / "predictions.csv")
    console.print(f"{len(table):,} labelled images scored ({len(unscored):,} unreadable) -> {output / 'predictions.csv'}")
    return table, unscored


def _image_refs(specs: list[str], quiet: bool) -> dict[str, str]:
    """image_id -> image file, for the report's thumbnails in --cv mode (best effort)."""
    found: dict[str, str] = {}
    for spec in specs:
        try:
            records = load_sources([spec]).records
        except (OSError, ValueError):
            continue
        with_image = records[records["image_ref"].notna()]
        found.update({k: str(Path(v).resolve()) for k, v in zip(with_image["image_id"], with_image["image_ref"]) if k not in found})
    if not found and not quiet:
        console.print("[yellow]no images found in DATA: the report has no thumbnails[/]")
    return found


def _print_evaluation(result: dict) -> None:
    def _pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    def ci(entry: dict, fmt=lambda v: f"{v:.3f}") -> str:
        if entry.get("value") is None:
            return "-"
        interval = f" ({fmt(entry['ci_low'])}-{fmt(entry['ci_high'])})" if entry.get("ci_low") is not None else ""
        return fmt(entry["value"]) + interval

    data, melanoma, ignored = result["data"], result["melanoma"], result["ignored"]
    title = "Cross-validation (out-of-fold)" if result["mode"] == "cross-validation" else "Evaluation"
    table = Table(title=f"{title}: {result['bundle']['name']}", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("images evaluated", f"{data['images']:,} ({data['melanomas']:,} melanomas)")
    table.add_row("rows left out", f"{ignored['rows']:,} of {ignored['prediction_rows']:,}")
    table.add_row("melanoma AUC (95% CI)", ci(melanoma["auc"]))
    table.add_row(f"sensitivity at {result['threshold_check']['threshold']:.4f}", ci(melanoma["sensitivity"], _pct))
    table.add_row("specificity", ci(melanoma["specificity"], _pct))
    table.add_row("balanced accuracy (ISIC)", f"{result['official']['balanced_accuracy']:.3f}")
    table.add_row("ECE (melanoma risk)", f"{result['calibration']['ece_melanoma']:.3f}")
    cv = result.get("cross_validation")
    if cv:
        for key, label in (("melanoma_auc", "fold AUC mean ± sd"), ("balanced_accuracy", "fold bal. acc. mean ± sd")):
            if cv["fold_summary"].get(key):
                table.add_row(label, f"{cv['fold_summary'][key]['mean']:.3f} ± {cv['fold_summary'][key]['sd']:.3f}")
    console.print(table)
    check = result["threshold_check"]
    console.print(f"[{'green' if check['holds'] else 'yellow'}]threshold {check['verdict']}[/]", highlight=False)
    for entry in ignored["reasons"]:
        console.print(f"[yellow]left out[/] {entry['rows']:,} {entry['reason']}: {entry['description']}", highlight=False)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command("serve")
def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; put TLS in front)."),
    port: int = typer.Option(8000, min=1, max=65535),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the committed default bundle)."),
    data_dir: Path = typer.Option(
        None, "--data-dir",
        help="Where images, heat maps and the SQLite database go (default: $DERMSIGHT_DATA_DIR or ./.dermsight).",
    ),
    dev: bool = typer.Option(False, "--dev", help="No API keys (and no rate limits): only on a loopback address."),
    cors_origin: list[str] = typer.Option(
        None, "--cors-origin", help="Let pages of this origin (https://host[:port]) call the API; repeatable. Default: none."
    ),
    rate_limit: float = typer.Option(20.0, min=0.1, help="Requests a second per API key (token bucket rate)."),
    burst: int = typer.Option(120, min=1, help="Requests per API key allowed in a burst (token bucket size)."),
    max_active: int = typer.Option(2, min=1, help="Uploads or re-scorings run at once."),
    max_queue: int = typer.Option(16, min=0, help="Uploads waiting for a slot; beyond that: 503 + Retry-After."),
    max_connections: int = typer.Option(128, min=1, help="Open connections; beyond that uvicorn answers 503."),
    log_level: str = typer.Option("info", help="debug, info, warning or error (no request bodies are ever logged)."),
) -> None:
    """The web app and JSON API (docs at /docs). PostgreSQL instead of SQLite: set DERMSIGHT_DATABASE_URL.

    Needs an API key (`dermsight keys create NAME`) for everything but /learn and /api/health,
    unless --dev."""
    import uvicorn

    from dermsight.models.bundle import BundleError
    from dermsight.serving.app import create_app
    from dermsight.serving.limits import Settings
    from dermsight.serving.security import configure_logging, log_config

    if dev and host not in LOOPBACK:
        errors.print(f"[bold red]error:[/] --dev serves without API keys: only on {', '.join(LOOPBACK)}, not {host}",
                     highlight=False)
        raise typer.Exit(2)
    configure_logging(log_level)
    settings = Settings(dev=dev, rate=rate_limit, burst=burst, max_active=max_active, max_queue=max_queue,
                        cors_origins=tuple(cors_origin or ()))
    try:
        web_app = create_app(model, storage_dir=data_dir, settings=settings)
    except BundleError as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if dev:
        console.print("[yellow]dev mode: no API keys needed[/] (loopback only)")
    elif not any(key.revoked_at is None for key in web_app.state.scorer.storage.list_api_keys()):
        console.print("[yellow]no API key yet:[/] create one with `dermsight keys create NAME` (same --data-dir)")
    console.print(f"DermSight on http://{host}:{port}  (API docs: /docs)", highlight=False)
    uvicorn.run(
        web_app, host=host, port=port, log_config=log_config(log_level), log_level=log_level,
        limit_concurrency=max_connections,
        timeout_keep_alive=5, timeout_graceful_shutdown=10, server_header=False,
    )


keys_app = typer.Typer(help="API keys of the web app (stored as SHA-256 hashes in its database).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
DATA_DIR_HELP = "The server's --data-dir (default: $DERMSIGHT_DATA_DIR or ./.dermsight); $DERMSIGHT_DATABASE_URL applies."


def _key_storage(data_dir: Path | None):
    from dermsight.serving.app import resolve_locations
    from dermsight.serving.storage.repository import Storage

    storage_dir, database_url = resolve_locations(data_dir)
    return Storage(database_url, storage_dir)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who or what the key is for (a person, a clinic system)."),
    data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Create a key and print it once: only its hash is kept, so it cannot be shown again."""
    from dermsight.serving.security import create_api_key

    try:
        key = create_api_key(_key_storage(data_dir), name)
    except ValueError as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    print(key)
    errors.print(f"API key for {name.strip()!r} created; it is shown only this once.", highlight=False)


@keys_app.command("list")
def keys_list(data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Every key: id, name, public prefix, when created and revoked (never the key)."""
    table = Table(title="API keys")
    for column in ("id", "name", "prefix", "created", "revoked"):
        table.add_column(column)
    for key in _key_storage(data_dir).list_api_keys():
        revoked = key.revoked_at.strftime("%Y-%m-%d %H:%M") if key.revoked_at else ""
        table.add_row(str(key.id), key.name, key.prefix, key.created_at.strftime("%Y-%m-%d %H:%M"), revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    which: str = typer.Argument(..., help="The key's id, prefix or name (a name revokes all its active keys)."),
    data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Revoke keys: they stop working within seconds, browser sessions signed in with them too."""
    revoked = _key_storage(data_dir).revoke_api_keys(which)
    if not revoked:
        errors.print(f"[bold red]error:[/] no active key with id, prefix or name {which!r}", highlight=False)
        raise typer.Exit(1)
    for key in revoked:
        console.print(f"revoked key {key.id} ({key.name}, {key.prefix})", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
