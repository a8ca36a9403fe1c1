"""Finetune mode: the whole network trained end to end, in the torchvision-references
style (args, data, model, loop, evaluate, save).

CPU-first: images are decoded once into memory at the training resolution, the model
runs channels-last, and AdamW with linear warm-up and cosine decay converges in a few
epochs. Runs unchanged under ``torchrun`` (DDP, gloo on CPU, nccl on GPU): each rank
sees its shard of every epoch; rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler

from dermsight.data.dataset import group_ids
from dermsight.evaluation.metrics import balanced_accuracy
from dermsight.imaging.batches import load_square
from dermsight.imaging.decode import ImageError, read_image_bytes
from dermsight.imaging.preprocess import Preprocessing, views
from dermsight.models.ensemble import merge_member_graphs
from dermsight.models.metadata import encode_metadata, missing_metadata
from dermsight.models.network import DermSightNet, export_onnx
from dermsight.training.config import TrainConfig
from dermsight.training.losses import MelanomaHeadLoss, balanced_class_weights, make_loss
from dermsight.training.resumable import (
    CheckpointClock,
    RunLog,
    StopSignals,
    TrainingInterrupted,
    random_states,
    restore_random_states,
    save_atomically,
)

console = Console(stderr=True)


def augmentation(size: int, acquisition: bool = False, strong: bool = False) -> A.Compose:
    """Label-preserving for dermoscopy: crops, any flip or right-angle rotation, mild colour.
    With `acquisition`, also what differs between clinics' cameras and archives rather than
    between lesions: JPEG re-encoding (quality 30-95), lower resolution (down to 0.35x and
    back), aspect changes (a frame squashed to a square or not), blur, sensor noise and
    colour temperature. With `strong`, the SIIM-ISIC 2020 winners' heavier set on top: lens and
    grid distortion, local contrast (CLAHE), hue / saturation / value shifts, shift-scale-rotate
    and one cut-out square of up to 3/8 of the side."""
    ratio = (0.6, 1.67) if acquisition else (0.8, 1.25)
    steps = [
        A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), ratio=ratio),
        A.HorizontalFlip(),
        A.VerticalFlip(),
        A.RandomRotate90(),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.7),
    ]
    if acquisition:
        steps += [
            A.PlanckianJitter(p=0.3),
            A.Downscale(scale_range=(0.35, 0.9), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.2, 1.2), p=0.2),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
            A.ImageCompression(quality_range=(30, 95), p=0.6),
        ]
    if strong:
        steps += [
            A.OneOf([A.OpticalDistortion(distort_limit=0.3), A.GridDistortion(distort_limit=0.3), A.ElasticTransform(alpha=3)], p=0.5),
            A.CLAHE(clip_limit=4.0, p=0.5),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), p=0.85),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.1, 0.375), hole_width_range=(0.1, 0.375), p=0.7),
        ]
    return A.Compose(steps)


def source_log_priors(sources: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, K) log of each record's source's class mix (counts + 1, so a class a source never
    labels keeps a finite prior). Added to the logits in the training loss (logit adjustment),
    the source's class mix is given to the network for free, so nothing is gained by learning
    to recognise the source; the logits learn what is left: the lesion's own evidence, as for
    a class-balanced prior. Inference uses the logits alone."""
    priors = np.zeros((len(labels), n_classes), np.float32)
    for source in np.unique(sources):
        rows = sources == source
        counts = np.bincount(labels[rows], minlength=n_classes).astype(np.float64) + 1.0
        priors[rows] = np.log(counts / counts.sum())
    return priors


class LesionImages(Dataset):
    """Pre-decoded uint8 squares + metadata + labels; augments on the fly when training.
    `offsets` (N, K) are added to the logits in the loss (source priors); `metadata_dropout`
    shows that share of the images with every metadata field missing (`blank_metadata`)."""

    def __init__(
        self, squares: np.ndarray, metadata: np.ndarray, labels: np.ndarray, prep: Preprocessing, train: bool,
        *, acquisition: bool = False, strong: bool = False, offsets: np.ndarray | None = None, metadata_dropout: float = 0.0,
        blank_metadata: np.ndarray | None = None,
    ):
        self.squares, self.metadata, self.labels, self.prep = squares, metadata, labels, prep
        self.transform = augmentation(prep.size, acquisition, strong) if train else None
        self.offsets = offsets if offsets is not None else np.zeros((len(labels), 1), np.float32)
        self.metadata_dropout, self.blank_metadata = metadata_dropout, blank_metadata
        self.rng = np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        """Per-epoch seed of the augmentations and the metadata dropout (resumable runs)."""
        if self.transform is not None:
            self.transform.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)

    def augmentation_state(self) -> dict:
        """Where the augmentations' and the metadata dropout's generators stand (mid-epoch checkpoints)."""
        return {
            "transforms": [(g.random_generator.bit_generator.state, g.py_random.getstate()) for g in self._randomised()],
            "dropout": self.rng.bit_generator.state,
        }

    def restore_augmentation(self, state: dict) -> None:
        for owner, (numpy_state, python_state) in zip(self._randomised(), state["transforms"], strict=True):
            owner.random_generator.bit_generator.state = numpy_state
            owner.py_random.setstate(python_state)
        self.rng.bit_generator.state = state["dropout"]

    def _randomised(self) -> list:
        """The pipeline and each of its transforms, nested ones (OneOf's) too: each draws from its own generators."""

        def walk(transform) -> list:
            children = transform.transforms if isinstance(transform, A.BaseCompose) else []
            return [transform, *(inner for child in children for inner in walk(child))]

        return walk(self.transform) if self.transform is not None else []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        square = self.squares[i]
        metadata = self.metadata[i]
        if self.transform is not None:
            square = self.transform(image=square)["image"]
            if self.metadata_dropout and self.rng.random() < self.metadata_dropout:
                metadata = self.blank_metadata
        return (
            torch.from_numpy(self.prep.normalise(square)), torch.from_numpy(metadata), int(self.labels[i]),
            torch.from_numpy(self.offsets[i]),
        )


def decode_all(records: pd.DataFrame, prep: Preprocessing, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """All images as uint8 squares (N, S, S, 3) and a mask of the readable ones."""
    squares = np.zeros((len(records), prep.size, prep.size, 3), np.uint8)
    ok = np.ones(len(records), bool)

    def work(i: int) -> None:
        ref = records["image_ref"].iloc[i]
        try:
            squares[i] = load_square(read_image_bytes(ref), prep, str(ref))
        except ImageError:
            ok[i] = False

    with Progress(disable=not progress, transient=True) as bar, ThreadPoolExecutor(2) as pool:
        task = bar.add_task("decoding images", total=len(records))
        for _ in pool.map(work, range(len(records))):
            bar.advance(task)
    return squares, ok


RESTART_PEAK = 0.3  # a warm restart climbs back to this fraction of the learning rate


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float, restart_steps: int = 0):
    """Linear warm-up, then cosine decay to zero over `total_steps`; with `restart_steps`, a
    second cosine cycle from `RESTART_PEAK` of the learning rate (SGDR's warm restart).
    The first cycle does not depend on the second: a run extended by a restart resumes
    exactly where the shorter run's checkpoint stopped."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < total_steps:
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
        return RESTART_PEAK * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - total_steps) / max(1, restart_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_distributed() -> bool:
    """Join the torchrun process group when launched by torchrun; True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_initialized()


def train_one_model(
    squares: np.ndarray,
    metadata: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    config: TrainConfig,
    checkpoint: Path,
    validation: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    *,
    sources: np.ndarray | None = None,
    augment: bool = True,
    global_order: bool = False,
    micro_batches: int = 1,
    run_log: RunLog | None = None,
) -> tuple[DermSightNet, int]:
    """Train one network; early-stop on validation balanced accuracy when given (in the
    first cycle: a warm restart climbs back up and runs to its end, its first epochs worse).
    Returns the best network (by validation, else the last) and its epoch count.

    Interruption-safe: `checkpoint` is written at every epoch's end, every
    `config.checkpoint_minutes` and, on SIGTERM/SIGINT, after the step under way (then
    `TrainingInterrupted` is raised). A mid-epoch checkpoint holds the epoch's data order and
    position, the augmentation and global random states, model, optimizer and schedule: the
    run resumed from it reaches the weights an uninterrupted run reaches. `run_log` records
    the session's time at each checkpoint.

    For checking DDP against one process (`dermsight.training.ddp_check`): `augment=False`
    trains on the plain squares; `global_order=True` makes a single process draw its
    batches in DistributedSampler order, where batch k is the union of the ranks' k-th
    batches under torchrun; `micro_batches=R` then splits each batch into the R ranks'
    shares, each batch-normalised on its own, and averages their gradients: what R DDP
    ranks compute. Training itself leaves all three at their defaults."""
    torch.manual_seed(config.seed)
    prep = config.preprocessing
    distributed = setup_distributed()
    melanoma_index = classes.index("MEL") if config.melanoma_head else None
    net = DermSightNet.create(config.backbone, metadata.shape[1], len(classes), melanoma_index=melanoma_index)
    net = net.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(net) if distributed else net
    not_melanoma = (labels != melanoma_index).astype(np.int64)  # the melanoma head's target: 0 melanoma, 1 not
    offsets = None
    if config.source_prior and sources is not None:
        offsets = source_log_priors(sources, labels, len(classes))
        if config.melanoma_head:
            offsets = np.hstack([offsets, source_log_priors(sources, not_melanoma, 2)])
    dataset = LesionImages(
        squares, metadata, labels, prep, train=augment, acquisition=config.acquisition_augmentation,
        strong=config.strong_augmentation, offsets=offsets,
        metadata_dropout=config.metadata_dropout, blank_metadata=missing_metadata(config.metadata_features),
    )
    sampler = DistributedSampler(dataset, shuffle=True, seed=config.seed) if distributed else None
    if sampler is None and global_order:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=config.seed)
    steps = (len(sampler) if sampler is not None else len(dataset)) // config.batch_size  # per epoch (last partial batch dropped)
    # Source priors already balance the classes within each source; class weights would count them twice.
    weights = balanced_class_weights(labels, len(classes)) if config.class_weighting and offsets is None else None
    criterion = make_loss(config.loss, weights)
    if config.melanoma_head:
        melanoma_weights = balanced_class_weights(not_melanoma, 2) if weights is not None else None
        criterion = MelanomaHeadLoss(criterion, make_loss(config.loss, melanoma_weights), len(classes), melanoma_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, config.epochs * steps, config.warmup_fraction, config.restart_epochs * steps)
    # timm's warm-up (power 3/4, for runs of thousands of steps): the average forgets the random head early on
    ema = ModelEmaV3(net, decay=config.ema_decay, use_warmup=True, warmup_power=0.75) if config.ema_decay else None
    draw = None
    if config.source_sampling:
        if sources is None or sampler is not None:
            raise ValueError("--source-sampling needs each image's source and draws each epoch in one process "
                             "(not under torchrun or a global order)")
        draw = source_sampling_weights(sources, config.source_sampling)
    start_epoch, start_step, order, best_score, best_epoch, best_state = 0, 0, None, -1.0, 0, None
    if checkpoint.exists():  # resume
        state = torch.load(checkpoint, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, best_score, best_epoch, best_state = state["epoch"], state["best_score"], state["best_epoch"], state["best_state"]
        if "random" in state:
            restore_random_states(state["random"])
        else:  # a checkpoint from before mid-epoch checkpoints: epoch ends only, torch's state alone
            torch.set_rng_state(state["rng"])
        if state.get("step"):  # stopped mid-epoch: that epoch's order, position and augmentation state
            start_step, order = state["step"], state["order"]
            dataset.restore_augmentation(state["augmentation"])
    if not config.patience:
        validation = None  # no early stopping: the schedule runs to its end, the last epoch is kept
    stale = start_epoch - best_epoch if validation is not None else 0  # epochs since the best one
    total_epochs = config.epochs + config.restart_epochs
    rank = dist.get_rank() if distributed else 0
    clock = CheckpointClock(config.checkpoint_minutes)

    def save(epoch: int, step: int) -> None:
        """Checkpoint after `epoch` whole epochs and `step` steps of the next (rank 0 writes)."""
        if is_main_process():
            save_atomically(
                {
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "epoch": epoch, "step": step, "order": order if step else None,
                    "augmentation": dataset.augmentation_state() if step else None, "random": random_states(),
                    "best_score": best_score, "best_epoch": best_epoch, "best_state": best_state,
                },
                checkpoint,
            )
            if run_log is not None:
                run_log.save()
        clock.reset()

    with StopSignals() as signals:
        for epoch in range(start_epoch, total_epochs):
            if validation is not None and stale >= config.patience and epoch < config.epochs:
                break  # early stop (checked here, so a resumed run that had stopped stays stopped)
            if order is None:  # a new epoch: its order and augmentations seeded by (seed, epoch, rank)
                order = epoch_order(sampler, len(dataset), config.seed, epoch, draw)
                dataset.reseed(int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0]))
            model.train()
            stop = False
            with Progress(disable=not (config.progress and is_main_process()), transient=True) as bar:
                task = bar.add_task(f"epoch {epoch + 1}/{total_epochs}", total=steps, completed=start_step)
                for step in range(start_step, steps):
                    rows = order[step * config.batch_size : (step + 1) * config.batch_size].tolist()
                    images, meta, target, offset = default_collate([dataset[i] for i in rows])
                    if micro_batches == 1:
                        loss = criterion(model(images.to(memory_format=torch.channels_last), meta, raw=True)[0] + offset, target)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    else:
                        loss = _accumulate_micro_batches(model, criterion, optimizer, images, meta, target, micro_batches)
                    optimizer.step()
                    scheduler.step()
                    if ema is not None:
                        ema.update(net, step=scheduler.last_epoch)  # last_epoch: optimizer steps so far, resumed too
                    bar.update(task, advance=1, description=f"epoch {epoch + 1}/{total_epochs} loss {loss.item():.3f}")
                    stop, due = _stop_or_due(signals, clock, distributed)
                    if step + 1 < steps and (stop or due):
                        save(epoch, step + 1)
                        if stop:
                            raise TrainingInterrupted(signals.requested or "SIGTERM", checkpoint, f"epoch {epoch + 1}, step {step + 1}/{steps}")
            start_step, order = 0, None
            score = None
            shipped = ema.module if ema is not None else net
            if validation is not None:
                logits = predict_logits(shipped, *validation[:2], prep, config.views)
                score = balanced_accuracy(validation[2], logits.argmax(1), len(classes))
                if score > best_score:
                    best_score, best_epoch, best_state, stale = score, epoch + 1, _copy_state(shipped), 0
                else:
                    stale += 1
            else:
                best_epoch, best_state = epoch + 1, None
            if is_main_process():
                console.print(f"epoch {epoch + 1}: loss {loss.item():.3f}" + (f", validation balanced accuracy {score:.3f}" if score is not None else ""))
            save(epoch + 1, 0)
            if stop or _stop_or_due(signals, clock, distributed)[0]:
                raise TrainingInterrupted(signals.requested or "SIGTERM", checkpoint, f"the end of epoch {epoch + 1}")
    if best_state is None and ema is not None:
        best_state = ema.module.state_dict()
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.to(memory_format=torch.contiguous_format).eval(), best_epoch


def epoch_order(sampler: DistributedSampler | None, n: int, seed: int, epoch: int, draw: np.ndarray | None = None) -> torch.Tensor:
    """The indices of one epoch, in the order they are drawn: the sampler's (this rank's shard),
    or seeded by (seed, epoch) a permutation or, given each image's chance `draw`, n draws with
    replacement; a mid-epoch checkpoint stores it."""
    if sampler is not None:
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    if draw is not None:
        return torch.multinomial(torch.from_numpy(draw), n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


def source_sampling_weights(sources: np.ndarray, power: float) -> np.ndarray:
    """Each image's chance of being drawn, proportional to its source's size ** -power: 0 keeps
    the natural mix, 0.5 is square-root sampling, 1 draws every source equally often."""
    _, inverse, counts = np.unique(sources, return_inverse=True, return_counts=True)
    weights = counts[inverse].astype(np.float64) ** -power
    return weights / weights.sum()


def _stop_or_due(signals: StopSignals, clock: CheckpointClock, distributed: bool) -> tuple[bool, bool]:
    """(a stop was asked for, a timed checkpoint is due); under DDP every rank agrees (any rank's
    signal, rank 0's clock), so all stop at the same step."""
    stop, due = signals.requested is not None, clock.due()
    if not distributed:
        return stop, due
    flags = torch.tensor([float(stop), float(due and dist.get_rank() == 0)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _accumulate_micro_batches(model, criterion, optimizer, images, meta, target, parts: int) -> torch.Tensor:
    """Gradients of one batch computed as `parts` DDP ranks would: share r is rows r::parts
    (DistributedSampler's interleaving), batch-normalised alone; the gradients are averaged."""
    optimizer.zero_grad(set_to_none=True)
    for part in range(parts):
        rows = slice(part, None, parts)
        loss = criterion(model(images[rows].contiguous(memory_format=torch.channels_last), meta[rows], raw=True)[0], target[rows])
        (loss / parts).backward()
    return loss


def _view_batches(squares: np.ndarray, metadata: np.ndarray, prep: Preprocessing, view_names, batch_size: int):
    """(images (V*n, 3, S, S), metadata (V*n, M), n) per batch of uint8 squares, every view stacked."""
    for start in range(0, len(squares), batch_size):
        batch = np.stack([prep.normalise(s) for s in squares[start : start + batch_size]])
        stacked = views(batch, tuple(view_names)).reshape(-1, *batch.shape[1:])
        yield stacked, np.tile(metadata[start : start + batch_size].astype(np.float32), (len(view_names), 1)), len(batch)


def predict_logits(net: DermSightNet, squares: np.ndarray, metadata: np.ndarray, prep: Preprocessing, view_names, batch_size: int = 64) -> np.ndarray:
    """Test-time-augmented logits (mean over views) for uint8 squares."""
    net.eval()
    logits = []
    with torch.no_grad():
        for images, meta, n in _view_batches(squares, metadata, prep, view_names, batch_size):
            out = net(torch.from_numpy(images), torch.from_numpy(meta))[0].numpy()
            logits.append(out.reshape(len(view_names), n, -1).mean(axis=0))
    return np.concatenate(logits) if logits else np.zeros((0, net.n_classes), np.float32)


INT8_CALIBRATION_IMAGES = 256  # activation ranges only (no labels); bench/quantize.py used 258


def quantize_network(net: DermSightNet, path: Path, squares: np.ndarray, metadata: np.ndarray, config: TrainConfig) -> Path:
    """Export `net` and write its int8 graph to `path`, its activation ranges calibrated on a
    seeded sample of `squares` (images the net trained on) in every test-time view."""
    import tempfile

    from dermsight.models.quantize import quantize_graph

    prep = config.preprocessing
    rows = np.sort(np.random.default_rng(config.seed).permutation(len(squares))[:INT8_CALIBRATION_IMAGES])
    images, meta, _ = next(_view_batches(squares[rows], metadata[rows], prep, config.views, len(rows)))
    with tempfile.TemporaryDirectory(prefix="dermsight-export-") as work:
        fp32 = Path(work) / "model.onnx"
        export_onnx(net, fp32, prep.size)
        quantize_graph(fp32, path, images, meta)
    return path


def graph_logits(
    graph: Path, squares: np.ndarray, metadata: np.ndarray, prep: Preprocessing, view_names, batch_size: int = 64,
    output: str = "logits",
) -> np.ndarray:
    """`predict_logits` through an ONNX graph, as the Predictor runs it (or the view-averaged
    `output`, e.g. "embedding")."""
    from dermsight.inference.onnx_session import ParallelSession

    session = ParallelSession(graph)
    logits = []
    for images, meta, n in _view_batches(squares, metadata, prep, view_names, batch_size):
        out = session.run([output], {"image": images, "metadata": meta})[0]
        logits.append(out.reshape(len(view_names), n, -1).mean(axis=0))
    return np.concatenate(logits)


STOPPING_SHARE = 0.15  # of a fold network's training groups, set aside to choose its epoch (--patience > 0)


def stopping_split(records: pd.DataFrame, rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` (a boolean mask) split into (fit, stopping): about STOPPING_SHARE of their
    patient/lesion groups go to stopping, so no patient or lesion sits on both sides and the
    epoch is never chosen on the fold the network then predicts."""
    groups = group_ids(records)
    candidates = np.unique(groups[rows])
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, size=max(1, round(STOPPING_SHARE * len(candidates))), replace=False)
    stopping = rows & np.isin(groups, chosen)
    return rows & ~stopping, stopping


def cross_validate_and_fit(records: pd.DataFrame, classes: list[str], config: TrainConfig, run_dir: Path, run_log: RunLog | None = None):
    """Out-of-fold logits from one network per grouped fold (only the first
    `config.validation_folds` folds when set: a CPU-sized budget; other rows stay NaN),
    then the final network on every image for the median best epoch count, each
    network checkpointed in `run_dir` (resumable, see `train_one_model`). With
    `config.patience` each fold network chooses its epoch on a grouped share of its own
    training folds (`stopping_split`), never on the fold it predicts. With
    `config.int8` each network is quantized and its out-of-fold logits come from the int8
    graph, so calibration and threshold are fitted on what the bundle will run. Returns
    (records, labels, oof, net, the int8 graph of `net` or None)."""
    prep = config.preprocessing
    squares, ok = decode_all(records, prep, config.progress)
    if not ok.all():
        console.print(f"[yellow]{(~ok).sum()} unreadable images left out[/]")
    records, squares = records[ok].reset_index(drop=True), squares[ok]
    metadata = encode_metadata(records, config.metadata_features)
    sources = records["source"].to_numpy(dtype=object)
    labels = records["diagnosis"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = records["fold"].to_numpy()
    oof = np.full((len(records), len(classes)), np.nan, np.float32)
    best_epochs: list[int] = []
    fold_nets: list[DermSightNet] = []
    fold_graphs: list[Path] = []  # each fold network's graph (int8 with --int8), for the ensemble
    for fold in sorted(set(folds))[: config.validation_folds]:
        train, held_out = folds != fold, folds == fold
        validation = None
        if config.patience:
            train, stopping = stopping_split(records, train, config.seed + int(fold))
            validation = (squares[stopping], metadata[stopping], labels[stopping])
        console.print(f"fold {fold}: {train.sum()} training, {held_out.sum()} held-out images")
        net, best_epoch = train_one_model(
            squares[train], metadata[train], labels[train], classes, config, run_dir / f"fold{fold}.pt",
            validation=validation, sources=sources[train], run_log=run_log,
        )
        if config.int8:
            graph = quantize_network(net, run_dir / f"fold{fold}.int8.onnx", squares[train], metadata[train], config)
            oof[held_out] = graph_logits(graph, squares[held_out], metadata[held_out], prep, config.views)
        else:
            graph = run_dir / f"fold{fold}.onnx"
            export_onnx(net, graph, prep.size)
            oof[held_out] = predict_logits(net, squares[held_out], metadata[held_out], prep, config.views)
        best_epochs.append(best_epoch)
        fold_nets.append(net)
        fold_graphs.append(graph)
    if config.ensemble:
        net, graph = fold_nets[0], run_dir / "ensemble.onnx"  # net: the members' architecture (gate blocks)
        merge_member_graphs(fold_graphs, graph)
    elif config.refit:
        epochs = int(np.median(best_epochs))  # the first cycle, then as much of the restart as the folds used
        final_config = TrainConfig(
            **{**config.__dict__, "epochs": min(epochs, config.epochs), "restart_epochs": max(0, epochs - config.epochs)}
        )
        console.print(f"final model on all {len(records)} images for {epochs} epochs")
        net, _ = train_one_model(squares, metadata, labels, classes, final_config, run_dir / "final.pt", sources=sources, run_log=run_log)
        graph = quantize_network(net, run_dir / "final.int8.onnx", squares, metadata, config) if config.int8 else None
    else:  # never saw its held-out fold: calibration and threshold are fitted on unseen images
        net, graph = fold_nets[0], fold_graphs[0] if config.int8 else None
    return records, labels, oof, net, graph


def _copy_state(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
