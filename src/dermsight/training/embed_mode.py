"""Embed mode, the CPU default: frozen ImageNet backbone, cached multi-view embeddings,
a linear head over [embedding, metadata] fitted per grouped fold (for honest
out-of-fold predictions) and once more on everything (for the bundle)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from rich.progress import track

from dermsight.models.metadata import encode_metadata
from dermsight.training.config import TrainConfig
from dermsight.training.embeddings import embed_records
from dermsight.training.linear_head import LinearHead, fit_linear_head
from dermsight.training.losses import balanced_class_weights


def embed_features(records: pd.DataFrame, config: TrainConfig) -> tuple[np.ndarray, dict[int, str]]:
    """(V, N, F + M) inputs of the head: each view's embedding with the metadata."""
    embeddings, _, errors = embed_records(
        records, config.backbone, config.preprocessing, config.views, config.cache_dir, progress=config.progress
    )
    metadata = encode_metadata(records, config.metadata_features)
    stacked = np.concatenate([embeddings, np.broadcast_to(metadata, (len(config.views), *metadata.shape))], axis=2)
    return stacked, errors


def fit_head(features: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig) -> LinearHead:
    """Fit on every view of every training image (views act as augmentation)."""
    n_views = features.shape[0]
    flat = features.reshape(-1, features.shape[2])
    weights = balanced_class_weights(labels, n_classes) if config.class_weighting else None
    return fit_linear_head(flat, np.tile(labels, n_views), n_classes, weights, config.l2, config.loss, seed=config.seed)


def tta_logits(head: LinearHead, features: np.ndarray) -> np.ndarray:
    """Logits averaged over the views: (V, N, D) -> (N, K)."""
    return np.mean([head.logits(view) for view in features], axis=0)


def out_of_fold_logits(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, n_classes: int, config: TrainConfig) -> np.ndarray:
    """Each record's logits from the head fitted without its fold."""
    oof = np.zeros((len(labels), n_classes), np.float32)
    for fold in track(sorted(set(folds)), description="cross-validating heads", disable=not config.progress):
        train, held_out = folds != fold, folds == fold
        head = fit_head(features[:, train], labels[train], n_classes, config)
        oof[held_out] = tta_logits(head, features[:, held_out])
    return oof
