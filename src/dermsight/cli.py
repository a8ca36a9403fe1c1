"""The `dermsight` command: data | train | evaluate | predict | serve."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dermsight.data.dataset import build_dataset, deduplicate, load_sources, save_manifest
from dermsight.data.records import Loaded
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
) -> None:
    """Combine sources, deduplicate by image id, assign grouped folds, save the manifest."""
    loaded = build_dataset(sources, folds, seed)
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
    loss: str = typer.Option("ce", help="ce (class-weighted cross-entropy) or focal."),
    l2: float = typer.Option(1e-3, help="Embed mode: L2 penalty of the linear head."),
    target_sensitivity: float = typer.Option(0.90, min=0.5, max=0.999, help="Melanoma sensitivity the threshold aims for."),
    epochs: int = typer.Option(3, min=1, help="Finetune mode: epochs."),
    batch_size: int = typer.Option(48, min=2, help="Finetune mode: batch size."),
    learning_rate: float = typer.Option(1e-3, help="Finetune mode: peak AdamW learning rate."),
    max_images: int = typer.Option(None, help="Train on a random subset of this many images (smoke runs)."),
) -> None:
    """Train a model bundle: out-of-fold validation, calibration, threshold, ONNX export."""
    from dermsight.training.config import TrainConfig
    from dermsight.training.train import train

    config = TrainConfig(
        sources=sources, output=output, mode=mode, backbone=backbone, image_size=image_size,
        views=tuple(v.strip() for v in views.split(",") if v.strip()), folds=folds, seed=seed, loss=loss, l2=l2,
        target_sensitivity=target_sensitivity, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        max_images=max_images,
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
    output: Path = typer.Option(Path("predictions.csv"), "--output", "-o", help="CSV to write (the layout the ISIC scorer reads)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the committed default bundle)."),
    batch_size: int = typer.Option(32, min=1),
) -> None:
    """Score images: one row per image with class probabilities, calibrated melanoma_risk,
    predicted_class, above_threshold and, where patients are known, patient context."""
    from dermsight.inference.inputs import records_from_inputs
    from dermsight.inference.predictor import Predictor

    records, problems = records_from_inputs(inputs)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    if records.empty:
        console.print("[red]no images to score[/]")
        raise typer.Exit(1)
    predictor = Predictor(model)
    table, errors = predictor.predict_records(records, batch_size=batch_size)
    for image_id, message in errors.items():
        console.print(f"[yellow]unreadable[/] {image_id}: {message}", highlight=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False, float_format="%.6f")
    flagged = int(table["above_threshold"].sum())
    console.print(
        f"{len(table):,} images scored with {predictor.bundle.name} -> {output}; "
        f"{flagged:,} at or above the melanoma threshold {predictor.threshold:.4f}; {len(errors) + len(problems):,} skipped"
    )


def main() -> None:
    app()
