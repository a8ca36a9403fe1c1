"""`dermsight data`: read, check and combine datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from dermsight.cli.common import SOURCES_HELP, console, exit_if_unreadable_sources, fail
from dermsight.data.dataset import build_dataset, deduplicate, load_sources, save_manifest
from dermsight.data.records import Loaded, SourceError
from dermsight.data.schema import DIAGNOSES
from dermsight.data.summary import problem_examples, summarise
from dermsight.imaging.validate import find_unreadable

data_app = typer.Typer(help="Read, check and combine datasets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `dermsight data` to `app`."""
    app.add_typer(data_app, name="data")


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
    exit_if_unreadable_sources(combined)


def report_total(report: dict, kind: str) -> int:
    """How many problems of `kind` the last column of the summary (the combined one) counts."""
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
        fail(err)
    exit_if_unreadable_sources(loaded)  # a manifest silently missing a source is worse than none
    save_manifest(loaded, output, sources=sources, n_folds=folds, seed=seed)
    summary = summarise(loaded.records, loaded.problems)
    console.print(
        f"{summary['records']:,} records ({summary['images']:,} with images) in {folds} grouped folds -> {output}"
    )
