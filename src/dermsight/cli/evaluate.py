"""`dermsight evaluate`: a bundle on labelled data, or its cross-validation -> report.json + report.html."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import typer
from rich.table import Table

from dermsight.cli.common import MODEL_HELP, SITE_HELP, console, exit_if_unreadable_sources, fail, warn
from dermsight.data.dataset import load_labelled
from dermsight.data.records import Loaded, SourceError


def register(app: typer.Typer) -> None:
    """Add `dermsight evaluate` to `app`."""
    app.command("evaluate")(evaluate_command)


def evaluate_command(
    data: list[str] = typer.Argument(None, help="Labelled data: dataset sources ([FORMAT:]PATH) or DermSight manifest CSVs."),
    model: Path = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    predictions: Path = typer.Option(
        None, "--predictions", "-p", help="Evaluate this `dermsight predict` CSV (or .parquet) against DATA instead of scoring DATA."
    ),
    cv: bool = typer.Option(False, "--cv", help="Report the bundle's grouped cross-validation (its out_of_fold.csv.gz); with DATA, only DATA's images (e.g. HAM10000's share)."),
    output: Path = typer.Option(Path("runs/evaluation"), "--output", "-o", help="Folder for report.json, report.html (and predictions.csv)."),
    batch_size: int = typer.Option(32, min=1),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the 95% intervals."),
    min_count: int = typer.Option(30, min=1, help="Subgroups with fewer images are flagged too small."),
    min_positives: int = typer.Option(5, min=0, help="Subgroups with fewer melanomas are flagged too small."),
    site: Path = typer.Option(None, "--site", help=SITE_HELP + " Evaluated at the site's operating point."),
    robustness: bool = typer.Option(False, "--robustness", help="Also re-score held-out images of DATA under other acquisitions (JPEG quality, resolution, aspect, colour, focus): the report's sweep plot."),
) -> None:
    """Evaluate a bundle on labelled data (scoring it, or an existing predict CSV), or report its
    cross-validation: official ISIC scores, melanoma AUC and sensitivity/specificity at the
    threshold with cluster-bootstrap intervals, calibration, subgroups -> report.json + report.html."""
    from dermsight.data.dataset import image_refs
    from dermsight.evaluation.evaluate import EvaluationError, evaluate_cv, evaluate_predictions
    from dermsight.evaluation.report import write_report
    from dermsight.evaluation.robustness import held_out_sweep
    from dermsight.inference.prediction_files import PredictionFileError, read_predictions
    from dermsight.models.bundle import BundleError, load_bundle, with_site
    from dermsight.models.site_profile import SiteProfileError

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
        bundle = with_site(bundle, site)
        if cv:
            refs = image_refs(data or bundle.training.get("config", {}).get("sources", []))
            if not refs and data:
                console.print("[yellow]no images found in DATA: the report has no thumbnails[/]")
            with console.status("computing cross-validation metrics"):
                result = evaluate_cv(bundle, image_refs=refs, only_images=set(refs) if data else None, **options)
        else:
            truth = _truth_records(data)
            if predictions is not None:
                table, unscored = read_predictions(predictions), {}
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
                result["robustness"] = {"sweep": held_out_sweep(bundle, _truth_records(data).records)}
        with console.status("writing the report"):
            paths = write_report(result, output)
    except (EvaluationError, PredictionFileError, BundleError, SiteProfileError, SourceError, OSError) as err:
        fail(err)
    _print_evaluation(result)
    console.print(f"report -> {paths['html']} (numbers: {paths['json']})", highlight=False)


def _truth_records(data: list[str]) -> Loaded:
    """Labelled records from dataset sources or manifests, deduplicated; unreadable sources exit 1."""
    loaded = load_labelled(data)
    exit_if_unreadable_sources(loaded)
    skipped = [p for p in loaded.problems if p.skipped and p.kind != "unreadable_source"]
    if skipped:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in Counter(p.kind for p in skipped).items())
        console.print(f"[yellow]skipped while reading the sources:[/] {kinds} (listed in the report)", highlight=False)
    if loaded.records.empty:
        raise SourceError("the DATA sources hold no records")
    return loaded


def _score(bundle, records: pd.DataFrame, batch_size: int, output: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """`score_labelled`, with what it did printed."""
    from dermsight.evaluation.evaluate import score_labelled

    scored = score_labelled(bundle, records, batch_size=batch_size, output=output, warn=warn)
    if scored.out_of_fold:
        console.print(f"{scored.out_of_fold:,} images the bundle trained on: their out-of-fold predictions are used")
    for image_id, message in list(scored.unscored.items())[:5]:
        console.print(f"[yellow]unreadable[/] {image_id}: {message}", highlight=False)
    console.print(f"{len(scored.table):,} labelled images scored ({len(scored.unscored):,} unreadable) -> {scored.path}")
    return scored.table, scored.unscored


def _print_evaluation(result: dict) -> None:
    """The headline numbers of an evaluation result as a table, then its verdict and warnings."""
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
