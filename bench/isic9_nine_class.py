"""The 9-class teaching set scored on its own nine classes (balanced accuracy), grouped CV.

DermSight's label space is ISIC 2019's, where "pigmented benign keratosis" and "seborrheic
keratosis" are both BKL, so the bundle itself answers 8 codes (`bench/accuracy.py`). The
9-class figure comes from a 9-class linear head (embed mode's head: class-weighted softmax
regression, views as augmentation) over image embeddings, cross-fitted on the bundle's
grouped folds (the images of a lesion never straddle two folds):

- fine-tuned: the fold networks of the default recipe. Fold k's images are embedded by the
  int8 network trained without fold k, and fold k's head is fitted on the other folds'
  images embedded by that same network. Needs the training checkpoints (CHECKPOINTS).
- frozen: the ImageNet Lite0 of embed mode at 224 px (the floor; needs nothing but the repo).

    python bench/isic9_nine_class.py [CHECKPOINTS] > bench/isic9_results.json

CHECKPOINTS defaults to the directory `dermsight train` left beside the default bundle's
output (runs/<name>.checkpoints), with fold0.int8.onnx ... fold4.int8.onnx in it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, recall_score

from dermsight.data import readers
from dermsight.models.bundle import load_bundle
from dermsight.models.metadata import METADATA_FEATURES, encode_metadata
from dermsight.training import embed_mode
from dermsight.training.config import TrainConfig
from dermsight.training.finetune import decode_all, graph_logits

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets"))
VIEWS = ("identity", "hflip")


def teaching_set_with_folds(bundle) -> tuple[pd.DataFrame, list[str], np.ndarray, np.ndarray]:
    """The teaching set's records (folder name kept as original_label) that have a fold in the
    bundle's out-of-fold table, its classes, class indices and folds."""
    records = readers.read_class_folders(DATA / "isic9" / "train").records
    folds = pd.read_csv(bundle.path / "out_of_fold.csv.gz", usecols=["image_id", "fold"])
    records = records.merge(folds, on="image_id").reset_index(drop=True)
    classes = sorted(records["original_label"].unique())
    return records, classes, records["original_label"].map(classes.index).to_numpy(), records["fold"].to_numpy()


def cross_fitted(features_for_fold, labels: np.ndarray, folds: np.ndarray, n_classes: int, config: TrainConfig) -> np.ndarray:
    """Held-out predicted classes: fold k's head fitted on the other folds, on features_for_fold(k) (V, N, D)."""
    predicted = np.zeros(len(labels), int)
    for fold in sorted(set(folds)):
        features, train = features_for_fold(fold), folds != fold
        head = embed_mode.fit_head(features[:, train], labels[train], n_classes, config)
        predicted[~train] = embed_mode.tta_logits(head, features[:, ~train]).argmax(axis=1)
    return predicted


def summary(labels: np.ndarray, predicted: np.ndarray, classes: list[str], seconds: float) -> dict:
    recalls = recall_score(labels, predicted, labels=range(len(classes)), average=None)
    return {
        "balanced_accuracy_9_class": float(balanced_accuracy_score(labels, predicted)),
        "recall": {c: round(float(r), 3) for c, r in zip(classes, recalls)},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="?", default=None,
                        help="the default recipe's training checkpoints (default: runs/<bundle name>.checkpoints)")
    bundle = load_bundle(REPO / "bundles" / "default")
    checkpoints = parser.parse_args().checkpoints or REPO / "runs" / f"{bundle.name}.checkpoints"
    records, classes, labels, folds = teaching_set_with_folds(bundle)
    config = TrainConfig(sources=[], views=VIEWS, progress=False)
    result = {"images": int(len(records)), "classes": classes, "folds": int(len(set(folds)))}

    started = time.perf_counter()
    frozen, errors = embed_mode.embed_features(records, TrainConfig(sources=[], image_size=224, views=VIEWS, progress=False))
    assert not errors, errors
    frozen = frozen[:, :, : -len(METADATA_FEATURES)]  # the teaching set has no metadata
    result["frozen_lite0_224"] = summary(labels, cross_fitted(lambda k: frozen, labels, folds, len(classes), config), classes, time.perf_counter() - started)

    graphs = [checkpoints / f"fold{k}.int8.onnx" for k in sorted(set(folds))]
    if all(g.exists() for g in graphs):
        started = time.perf_counter()
        prep = bundle.preprocessing
        squares, ok = decode_all(records, prep, progress=False)
        assert ok.all()
        metadata = encode_metadata(records)  # the embedding does not depend on it

        def fold_features(k: int) -> np.ndarray:  # (1, N, F): graph_logits averages the views
            return graph_logits(graphs[k], squares, metadata, prep, VIEWS, output="embedding")[None]

        predicted = cross_fitted(fold_features, labels, folds, len(classes), config)
        result["finetuned_fold_networks"] = {"checkpoints": str(checkpoints), **summary(labels, predicted, classes, time.perf_counter() - started)}
    else:
        result["finetuned_fold_networks"] = f"skipped: no {graphs[0].name} ... in {checkpoints}"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
