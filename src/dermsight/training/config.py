"""Every training setting in one typed place; the defaults run on a 2-core laptop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dermsight.imaging.preprocess import Preprocessing
from dermsight.cache import default_cache_dir


@dataclass
class TrainConfig:
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
    class_weighting: bool = True
    l2: float = 0.1  # embed mode: L2 penalty on the standardised head weights
    target_sensitivity: float = 0.90
    # finetune mode
    epochs: int = 3
    batch_size: int = 48
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    restart_epochs: int = 0  # finetune: after the `epochs` cosine cycle, a warm restart of this many epochs
    patience: int = 2
    validation_folds: int | None = None  # finetune: train only this many of the folds for validation (None = all)
    refit: bool = True  # finetune: refit on every image; False ships the first fold's network (calibrated on its held-out fold)
    int8: bool = False  # finetune: ship the int8 graph; out-of-fold logits (calibration, threshold) come from int8 graphs
    max_images: int | None = None  # a subset, for smoke runs
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.image_size)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output"], data["cache_dir"] = str(self.output), str(self.cache_dir)
        data["views"] = list(self.views)
        return data
