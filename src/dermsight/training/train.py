"""`dermsight train`, top to bottom: data -> out-of-fold predictions -> calibration and
threshold -> final model -> ONNX -> bundle. Read it in one sitting."""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from dermsight.data.dataset import build_dataset
from dermsight.data.schema import DIAGNOSES
from dermsight.evaluation.calibration import (
    TemperatureScaler,
    choose_threshold,
    choose_threshold_every_source,
    choose_threshold_held_out_sources,
)
from dermsight.evaluation.held_out import per_source
from dermsight.evaluation.metrics import binary_summary, multiclass_summary
from dermsight.inference.ood import fit_ood_gate
from dermsight.models.bundle import Bundle
from dermsight.models.model_card import write_model_card
from dermsight.models.network import DermSightNet, export_onnx
from dermsight.training import embed_mode
from dermsight.training.config import TrainConfig
from dermsight.training.photo_gate import fit_photo_gate
from dermsight.training.resumable import RunLog, TrainingInterrupted, default_run_dir

console = Console(stderr=True)


def load_training_records(config: TrainConfig) -> tuple[pd.DataFrame, list[str]]:
    """Labelled records with an image file, in grouped folds, and the class list."""
    loaded = build_dataset(config.sources, config.folds, config.seed, by_source=config.source_folds)
    records = loaded.records
    records = records[records["image_ref"].notna() & records["diagnosis"].notna()].reset_index(drop=True)
    if config.binary:  # the same code path, with a two-class label space
        records["diagnosis"] = records["diagnosis"].where(records["diagnosis"] == "MEL", "UNK")
    if config.max_images and len(records) > config.max_images:
        records = records.sample(config.max_images, random_state=config.seed).sort_index().reset_index(drop=True)
    classes = [c for c in DIAGNOSES if (records["diagnosis"] == c).any()]
    if "MEL" not in classes or len(classes) < 2:
        raise ValueError("training needs labelled images of melanoma and at least one other class")
    return records, classes


def train(config: TrainConfig) -> Bundle:
    """Train, validate, calibrate and export one bundle into `config.output`: out-of-fold
    predictions on the grouped (or source) folds, temperature and sensitivity-first threshold
    fitted on them, the final network (or the fold networks as one ensemble graph), the OOD
    gate, the model card. Finetune mode keeps its checkpoints and run.json in the run folder
    and resumes from them (the same command, or `--resume RUN_DIR`); a SIGTERM/SIGINT
    checkpoints and raises `TrainingInterrupted`."""
    started = time.time()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    run_log = None  # finetune: the run folder's record of sessions
    int8_graph = None  # finetune --int8: the shipped network's quantized graph
    config.check()
    records, classes = load_training_records(config)
    console.print(f"training on {len(records):,} images, classes {', '.join(classes)}, {config.folds} grouped folds")

    # 1. Out-of-fold logits (every record predicted by a model that never saw its patient or lesion) and the final net.
    if config.mode == "embed":
        features, errors = embed_mode.embed_features(records, config)
        keep = np.array([i not in errors for i in range(len(records))])
        if errors:
            console.print(f"[yellow]{len(errors)} unreadable images left out[/], e.g. {next(iter(errors.values()))}")
        records, features = records[keep].reset_index(drop=True), features[:, keep]
        labels = records["diagnosis"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        oof_logits = embed_mode.out_of_fold_logits(features, labels, records["fold"].to_numpy(), len(classes), config)
        head = embed_mode.fit_head(features, labels, len(classes), config)
        net = DermSightNet.create(config.backbone, len(config.metadata_features), len(classes))
        net.set_linear_head(head.weight, head.bias)
    else:  # finetune (config.check() allows no other mode)
        from dermsight.training import finetune

        run_dir = config.run_dir or default_run_dir(config.output, config.cache_dir)
        run_log = RunLog(
            run_dir, config.to_dict(), _command(), spent=time.time() - started, defaults=TrainConfig(sources=[]).to_dict()
        )
        try:
            records, labels, oof_logits, net, int8_graph = finetune.cross_validate_and_fit(records, classes, config, run_dir, run_log)
        except TrainingInterrupted as stop:
            run_log.save(ended=f"stopped by {stop.signal_name} at {stop.where}")
            raise

    # 2. Calibration and the sensitivity-first operating threshold, both from out-of-fold predictions only.
    all_records = records
    validated = ~np.isnan(oof_logits).any(axis=1)  # finetune may validate on fewer folds than it has
    records, labels, oof_logits = records[validated].reset_index(drop=True), labels[validated], oof_logits[validated]
    scaler = TemperatureScaler().fit(oof_logits, labels)
    probabilities = scaler.transform(oof_logits)
    melanoma = (labels == classes.index("MEL")).astype(int)
    risk = probabilities[:, classes.index("MEL")]
    if config.source_folds:  # pooled over the sources held out whole: what a clinic the networks never saw gets
        sources = records["source"].to_numpy()
        held_out = sources != records["source"].value_counts().idxmax()
        threshold = choose_threshold_held_out_sources(melanoma, risk, sources, held_out, config.target_sensitivity)
    elif config.threshold_every_source:  # the target sensitivity on each source's held-out images, not only pooled
        threshold = choose_threshold_every_source(melanoma, risk, records["source"].to_numpy(), config.target_sensitivity)
    else:
        threshold = choose_threshold(melanoma, risk, config.target_sensitivity)
    metrics = cross_validation_metrics(records, labels, probabilities, classes, threshold["threshold"], config.folds)
    metrics["per_source"] = source_metrics(records, labels, probabilities, classes, threshold["threshold"], config)

    # 3. The bundle.
    bundle = Bundle(
        path=config.output,
        name=config.output.name,
        backbone=config.backbone,
        classes=classes,
        preprocessing=config.preprocessing,
        metadata_features=list(config.metadata_features),
        views=list(config.views),
        temperature=float(scaler.temperature_),
        threshold={"melanoma": float(threshold["threshold"]), "target_sensitivity": config.target_sensitivity, **threshold},
        metrics=metrics,
        training={
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": run_log.data["command"] if run_log is not None else _command(),
            "config": config.to_dict(),
            "n_images": int(len(all_records)),
            "class_counts": {c: int((all_records["diagnosis"] == c).sum()) for c in classes},
            "sources": sorted(all_records["source"].unique()),
        },
    )
    export_onnx(net, bundle.onnx_path, config.image_size)
    if int8_graph is not None:  # the graph the out-of-fold logits were computed with (or the ensemble of them)
        shutil.copyfile(int8_graph, bundle.onnx_path)
    members = config.folds if config.ensemble else 1
    if members > 1:
        bundle.training["members"] = members  # the float weights stay in the run's checkpoints (size)
    else:
        torch.save({k: v.half() for k, v in net.state_dict().items()}, bundle.path / "weights.pt")
    save_out_of_fold(records, probabilities, classes, bundle)
    bundle.save()
    fit_gate(bundle, all_records, net.gate_block_sizes * members, config)
    if run_log is None:
        bundle.training["duration_seconds"] = round(time.time() - started, 1)
    else:  # every session of the run, interrupted ones included
        run_log.save(ended="finished")
        bundle.training.update(
            duration_seconds=round(run_log.total_seconds, 1), resumes=run_log.resumes, run_dir=str(run_log.folder),
        )
    bundle.save()
    write_model_card(bundle)
    return bundle


def _command() -> str | None:
    """The `dermsight train ...` command line of this process, if it is one."""
    return "dermsight " + shlex.join(sys.argv[1:]) if sys.argv and "dermsight" in sys.argv[0] else None


def fit_gate(bundle: Bundle, records: pd.DataFrame, block_sizes: tuple[int, ...], config: TrainConfig, max_images: int = 3000) -> None:
    """The out-of-distribution gate, fitted on the exported graph's gate features of a
    sample of the training images, with their folds for held-out thresholds. Each source
    (each clinic's dermoscopes) gets an equal share of the sample: drawn in proportion,
    HAM10000 swamped the rest and the gate refused 5.9% of unseen ISIC 2020 images, 1.8% balanced."""
    from dermsight.inference.predictor import Predictor

    share = max(1, max_images // records["source"].nunique())
    sample = records.sample(frac=1.0, random_state=config.seed).groupby("source").head(share)
    predictor = Predictor(bundle)
    features, rows = predictor.gate_features(sample["image_ref"].tolist(), progress=config.progress)
    folds = sample["fold"].to_numpy()[rows]
    fit_ood_gate(features, block_sizes, folds).save(bundle.path)
    if config.gate_negatives:  # ordinary photos of moles: the published train split only, valid is for measuring
        dermoscopy = sample.assign(
            group=sample["lesion_id"].fillna(sample["patient_id"]).fillna(sample["image_id"]).astype(str),
            family=sample["source"],
        )
        fit_photo_gate(bundle, dermoscopy.groupby("source").head(300), [Path(f) for f in config.gate_negatives], seed=config.seed)


def cross_validation_metrics(records, labels, probabilities, classes, threshold, n_folds: int) -> dict:
    """Pooled out-of-fold metrics plus per-fold mean and sd of the headline numbers."""
    mel = classes.index("MEL")
    truth = (labels == mel).astype(int)
    codes = np.asarray(classes, dtype=object)[labels]
    pooled = {
        "melanoma": binary_summary(truth, probabilities[:, mel], threshold, groups=records["group"].to_numpy()),
        "multiclass": multiclass_summary(codes, probabilities, classes),
    }
    per_fold = []
    for fold in sorted(records["fold"].unique()):
        rows = (records["fold"] == fold).to_numpy()
        if truth[rows].min() == truth[rows].max():
            continue
        binary = binary_summary(truth[rows], probabilities[rows, mel], threshold, n_boot=0)
        multi = multiclass_summary(codes[rows], probabilities[rows], classes)
        per_fold.append({"fold": int(fold), "melanoma_auc": binary["auc"]["value"], "balanced_accuracy": multi["balanced_accuracy"]})
    summary = {
        key: {"mean": float(np.mean([f[key] for f in per_fold])), "sd": float(np.std([f[key] for f in per_fold]))}
        for key in ("melanoma_auc", "balanced_accuracy")
    }
    validated = sorted(records["fold"].unique())
    validation = "out-of-fold, patient/lesion-grouped"
    if len(validated) < n_folds:
        validation += f" (only fold {', '.join(map(str, validated))} of {n_folds} held out)"
    return {"validation": validation, "pooled": pooled, "per_fold": per_fold, "fold_summary": summary}


def source_metrics(records, labels, probabilities, classes, threshold: float, config: TrainConfig) -> list[dict]:
    """Held-out metrics of every training source (sources left out whole first, see
    dermsight.evaluation.held_out): what the education page and the model card quote."""
    frame = records[["image_id", "patient_id", "lesion_id", "source", "diagnosis"]].rename(columns={"image_id": "image"})
    for i, code in enumerate(classes):
        frame[code] = probabilities[:, i]
    frame["melanoma"] = (labels == classes.index("MEL")).astype(int)
    frame["melanoma_risk"] = probabilities[:, classes.index("MEL")]
    largest = frame["source"].value_counts().idxmax()
    left_out = config.source_folds & (frame["source"] != largest)
    frame["held_out"] = np.where(left_out, "left_out_source", "grouped_cv")
    return per_source(frame, [c for c in classes if c != "UNK"], threshold, n_boot=200, seed=config.seed)


def save_out_of_fold(records: pd.DataFrame, probabilities: np.ndarray, classes: list[str], bundle: Bundle) -> None:
    """The out-of-fold predictions, in the `predict` CSV layout, for `evaluate --cv`."""
    table = records[["image_id", "patient_id", "lesion_id", "age", "sex", "site", "diagnosis", "source", "fold"]].copy()
    for i, code in enumerate(classes):
        table[code] = probabilities[:, i]
    bundle.path.mkdir(parents=True, exist_ok=True)
    table.to_csv(bundle.path / "out_of_fold.csv.gz", index=False, float_format="%.6f")
