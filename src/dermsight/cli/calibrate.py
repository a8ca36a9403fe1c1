"""`dermsight calibrate`: a site profile from a clinic's own images (and labels)."""

from __future__ import annotations

from pathlib import Path

import typer

from dermsight.cli.common import MODEL_HELP, console, fail, warn


def register(app: typer.Typer) -> None:
    """Add `dermsight calibrate` to `app`."""
    app.command("calibrate")(calibrate_command)


def calibrate_command(
    inputs: list[str] = typer.Argument(..., help="The site's images: what `predict` reads (files, folders, manifests, sources)."),
    labels: Path = typer.Option(None, "--labels", help="CSV image_name,melanoma (0/1), or the ISIC layouts image,MEL and image_name,target. Without it: a prevalence-only profile."),
    output: Path = typer.Option(..., "--output", "-o", help="The site profile (JSON) to write."),
    sensitivity: float = typer.Option(0.90, min=0.5, max=0.999, help="Target melanoma sensitivity on the site's cases."),
    confidence: float = typer.Option(None, min=0.5, max=0.999, help="The threshold's exact one-sided lower confidence bound of sensitivity must reach the target at this level (e.g. 0.95)."),
    model: Path = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    site_name: str = typer.Option(None, "--site-name", help="The clinic's name, quoted on the page and in the API."),
    batch_size: int = typer.Option(32, min=1),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse scores of images this bundle scored before."),
) -> None:
    """Fit a site profile: the referral threshold for the target sensitivity on the site's own
    labelled cases (exact binomial intervals), melanoma_risk recalibrated to the site, and its
    prevalence; use it with --site on predict, evaluate and serve."""
    from dermsight.evaluation.site_calibration import CalibrationError, calibrate_site
    from dermsight.inference.score_cache import open_score_cache
    from dermsight.models.bundle import BundleError, load_bundle
    from dermsight.models.site_profile import write_profile

    if confidence is not None and labels is None:
        fail("--confidence bounds the sensitivity measured on labelled cases: give --labels", 2)
    try:
        bundle = load_bundle(model)
        profile, skipped = calibrate_site(inputs, bundle, labels_path=labels, target=sensitivity, confidence=confidence,
                                          site=site_name, cache=open_score_cache(bundle, warn) if cache else None,
                                          batch_size=batch_size)
        for problem in skipped:
            console.print(f"[yellow]skipped[/] {problem}", highlight=False, soft_wrap=True)
        write_profile(profile, output)
    except (CalibrationError, BundleError, OSError) as err:
        fail(err)
    console.print(f"site profile -> {output}: {profile.statement()}", highlight=False, soft_wrap=True)
    for message in profile.data.get("warnings", []):
        warn(f"warning: {message}")
