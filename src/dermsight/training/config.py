"""Every training setting in one typed place; the defaults run on a 2-core laptop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dermsight.imaging.preprocess import Preprocessing
from dermsight.cache import default_cache_dir
from dermsight.models.metadata import METADATA_FEATURES


class RecipeError(ValueError):
    """A training recipe whose options cannot go together (the CLI says so and exits 2)."""


@dataclass
class TrainConfig:
    """What `dermsight train` does, field by field as its CLI options: the sources and folds,
    embed (frozen backbone, linear heads) or finetune mode, backbone, input size and views, the
    source-robust levers (fit, colour constancy, acquisition augmentation, source prior,
    metadata), schedule, quantization, ensemble and gate. Saved in bundle.json as the recipe."""

    sources: list[str]
    output: Path = Path("runs/bundle")
    mode: str = "embed"  # "embed" | "finetune"
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    views: tuple[str, ...] = ("identity", "hflip")
    folds: int = 5
    seed: int = 0
    binary: bool = False  # melanoma vs everything else (reported as MEL / UNK) instead of the ISIC classes
    loss: str = "ce"  # "ce" | "focal"
    melanoma_head: bool = False  # finetune: a melanoma-vs-rest head beside the class head gives the risk (multi-task)
    class_weighting: bool = True
    l2: float = 0.1  # embed mode: L2 penalty on the standardised head weights
    target_sensitivity: float = 0.90
    threshold_every_source: bool = False  # without source_folds: the target sensitivity on every source's held-out images
    # finetune mode
    epochs: int = 3
    batch_size: int = 48
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    restart_epochs: int = 0  # finetune: after the `epochs` cosine cycle, a warm restart of this many epochs
    ema_decay: float = 0.0  # finetune: ship an exponential moving average of the weights (timm ModelEmaV3, warm-up); 0 = off
    source_sampling: float = 0.0  # finetune: draw images with probability ~ (their source's size) ** -power; 0 = natural mix
    patience: int = 2
    validation_folds: int | None = None  # finetune: train only this many of the folds for validation (None = all)
    refit: bool = True  # finetune: refit on every image; False ships the first fold's network (calibrated on its held-out fold)
    int8: bool = False  # finetune: ship the int8 graph; out-of-fold logits (calibration, threshold) come from int8 graphs
    max_images: int | None = None  # a subset, for smoke runs
    # Source robustness (see README, "Sources the model never saw")
    source_folds: bool = False  # the largest source in grouped folds, every other source a fold of its own (leave-one-source-out)
    fit: str = "crop"  # preprocessing: "crop" (shorter side, centre crop) or "squash" (whole frame to a square)
    colour_constancy: bool = False  # Shades of Gray in training and inference alike
    acquisition_augmentation: bool = False  # finetune: JPEG re-encoding, downscaling, blur, noise, aspect changes
    strong_augmentation: bool = False  # finetune: the SIIM-ISIC 2020 winners' distortions, CLAHE, HSV, affine, cut-out
    source_prior: bool = False  # finetune: logit adjustment by each source's class mix (replaces class weighting)
    metadata_features: tuple[str, ...] = METADATA_FEATURES  # what the network reads; a subset of METADATA_FEATURES
    metadata_dropout: float = 0.0  # finetune: share of training images shown with every metadata field missing
    gate_negatives: tuple[str, ...] = ()  # Derm7pt folders: their clinical photos (train split) as the gate's negatives
    ensemble: bool = False  # finetune: ship the fold networks as one averaged graph instead of a refit (implies no refit)
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True
    # finetune: interruption safety (see dermsight.training.resumable)
    checkpoint_minutes: float = 5.0  # a mid-epoch checkpoint this often (0: epoch ends and signals only)
    run_dir: Path | None = None  # checkpoints and run.json; None: resumable.default_run_dir

    def check(self) -> None:
        """Raise RecipeError if the options cannot go together."""
        if self.mode not in ("embed", "finetune"):
            raise RecipeError(f"unknown mode {self.mode!r}; expected 'embed' or 'finetune'")
        if self.int8 and self.mode != "finetune":
            raise RecipeError("--int8 needs --mode finetune (embed mode's heads are fitted on float embeddings)")
        if self.melanoma_head and (self.mode != "finetune" or self.binary):
            raise RecipeError("--melanoma-head needs --mode finetune and the ISIC classes (a --binary network is melanoma-only already)")
        if self.melanoma_head and not (self.class_weighting or self.source_prior):
            raise RecipeError("--melanoma-head composes balanced heads: it needs class weighting or --source-prior")

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.image_size, fit=self.fit, colour_constancy=self.colour_constancy)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output"], data["cache_dir"] = str(self.output), str(self.cache_dir)
        data["run_dir"] = str(self.run_dir) if self.run_dir is not None else None
        data["views"], data["metadata_features"] = list(self.views), list(self.metadata_features)
        data["gate_negatives"] = list(self.gate_negatives)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The config `to_dict` wrote (a run folder's recipe)."""
        data = dict(data)
        data["output"], data["cache_dir"] = Path(data["output"]), Path(data["cache_dir"])
        data["run_dir"] = Path(data["run_dir"]) if data.get("run_dir") else None
        for key in ("views", "metadata_features", "gate_negatives"):
            data[key] = tuple(data[key])
        return cls(**data)
