"""The 9-class teaching set scored on its own nine classes (balanced accuracy), cross-fitted.

    python bench/isic9_nine_class.py [BUNDLE] > bench/isic9_results.json

DermSight's label space is ISIC 2019's, where "pigmented benign keratosis" and "seborrheic
keratosis" are both BKL, so the bundle itself answers 8 codes (`bench/accuracy.py`). The
9-class figure comes from a 9-class linear head (embed mode's head: class-weighted softmax
regression, the views as augmentation) over image embeddings. Every image of `isic9/train` is
scored (an image in two class folders twice, once per label):

- fine-tuned: the member networks of the default bundle (an ensemble trained with
  leave-one-source-out folds: member k never trained on fold k). Each image is embedded by the
  member that never trained on it: a HAM10000 copy (the bundle's table holds it under ham10000)
  by the member of its lesion-grouped HAM fold, so that member saw neither encoding of the
  lesion; the other images (the teaching set's own source, `class_folders`, left out whole) by
  that source's member, which never saw any of them; this includes the copies training dropped
  for conflicting labels (in no fold, so no member trained on them). Every image is held out from
  its member this way.
- frozen: the ImageNet Lite0 of embed mode at 224 px (the floor), one embedding space.

The heads are cross-fitted on HEAD_FOLDS folds of their own, stratified by class and grouped
(a HAM lesion's images, and an image's copies in two folders, stay in one fold), not on the
bundle's folds: those hold every non-HAM image in one fold, so a head scoring it would never
have seen a melanoma or a seborrheic keratosis. An image in head fold h is scored by a head
fitted on the images outside h, in its member's embedding space (each member's embeddings of
those images: most were in that member's training set, which can only make the head's
training features cleaner than the held-out ones it scores). No head is fitted on an image it
scores, nor on a copy or lesion sibling of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold

from dermsight.data import readers
from dermsight.imaging.batches import iter_batches
from dermsight.inference.onnx_session import ParallelSession
from dermsight.models.bundle import load_bundle
from dermsight.models.metadata import METADATA_FEATURES, encode_metadata
from dermsight.training import embed_mode
from dermsight.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets"))
SOURCE = "class_folders"  # the source name the teaching set's own images carry in the bundle's table
HAM_LACKS = ("seborrheic keratosis", "squamous cell carcinoma")  # no HAM10000 label of their own
HEAD_FOLDS = 5
BATCH = 32


def embedding_members(image_ids: pd.Series, table: pd.DataFrame) -> np.ndarray:
    """Per image, the member network that never trained on it: its fold in the bundle's table
    (member k trained without fold k), or, for an image absent from the table (a copy training
    dropped), the fold of the left-out SOURCE."""
    left_out = table.loc[table["source"] == SOURCE, "fold"].unique()
    if len(left_out) != 1:
        raise SystemExit(f"out_of_fold.csv.gz: source {SOURCE} lies in folds {sorted(left_out)}; "
                         "expected one left-out fold (a bundle trained with --source-folds)")
    folds = image_ids.map(table.drop_duplicates("image_id").set_index("image_id")["fold"])
    return folds.fillna(left_out[0]).astype(int).to_numpy()


def head_folds(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """HEAD_FOLDS folds stratified by class, every group (lesion, or image id) in one fold."""
    folds = np.zeros(len(labels), int)
    splitter = StratifiedGroupKFold(HEAD_FOLDS, shuffle=True, random_state=0)
    for fold, (_, held_out) in enumerate(splitter.split(labels, labels, groups)):
        folds[held_out] = fold
    return folds


def cross_fitted(features: np.ndarray, members: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                 n_classes: int, config: TrainConfig) -> np.ndarray:
    """Held-out predicted classes. `features` (V, M, N, D): every image in every member's
    embedding space; image i is scored in members[i]'s space by the head fitted there on the
    images outside i's fold."""
    predicted = np.full(len(labels), -1)
    for fold in np.unique(folds):
        scored = folds == fold
        for member in np.unique(members[scored]):
            space = features[:, member]
            head = embed_mode.fit_head(space[:, ~scored], labels[~scored], n_classes, config)
            rows = scored & (members == member)
            predicted[rows] = embed_mode.tta_logits(head, space[:, rows]).argmax(axis=1)
    return predicted


def member_embeddings(bundle, records: pd.DataFrame) -> np.ndarray:
    """(V, M, N, F): every image embedded by each member of the ensemble graph, in each of the
    bundle's views (the graph's `member_embeddings` output: each member's pooled features,
    before its head; the metadata does not enter them)."""
    session = ParallelSession(bundle.onnx_path)
    if "member_embeddings" not in {o.name for o in session.get_outputs()}:
        raise SystemExit(f"{bundle.onnx_path}: no member_embeddings output (not an ensemble of fold networks)")
    refs = records["image_ref"].tolist()
    metadata = encode_metadata(records, bundle.metadata_features).astype(np.float32)
    parts = []
    for batch in iter_batches(refs, bundle.preprocessing, BATCH, views=bundle.views):
        if batch.errors:
            raise SystemExit(f"unreadable images: {batch.errors}")
        n_views, n = batch.images.shape[:2]
        feeds = {"image": batch.images.reshape(-1, *batch.images.shape[2:]), "metadata": np.tile(metadata[batch.indices], (n_views, 1))}
        out = session.run(["member_embeddings"], feeds)[0]  # (V * n, M, F)
        parts.append(out.reshape(n_views, n, *out.shape[1:]).swapaxes(1, 2))
        print(f"embedded {batch.indices[-1] + 1}/{len(refs)}", file=sys.stderr, flush=True)
    return np.concatenate(parts, axis=2)


def summary(labels: np.ndarray, predicted: np.ndarray, classes: list[str], seconds: float) -> dict:
    recalls = dict(zip(classes, recall_score(labels, predicted, labels=range(len(classes)), average=None)))
    return {
        "balanced_accuracy_9_class": round(float(balanced_accuracy_score(labels, predicted)), 4),
        "recall": {c: round(float(r), 3) for c, r in recalls.items()},
        "classes_ham10000_lacks": {"mean_recall": round(float(np.mean([recalls[c] for c in HAM_LACKS])), 3),
                                   **{c: round(float(recalls[c]), 3) for c in HAM_LACKS}},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=REPO / "bundles" / "default",
                        help="an ensemble bundle trained with --source-folds (default: bundles/default)")
    bundle = load_bundle(parser.parse_args().bundle)
    records = readers.read_class_folders(DATA / "isic9" / "train").records
    table = pd.read_csv(bundle.path / "out_of_fold.csv.gz", usecols=["image_id", "lesion_id", "source", "fold"])
    classes = sorted(records["original_label"].unique())
    labels = records["original_label"].map(classes.index).to_numpy()
    members = embedding_members(records["image_id"], table)
    lesions = records["image_id"].map(table.drop_duplicates("image_id").set_index("image_id")["lesion_id"])
    folds = head_folds(labels, lesions.fillna(records["image_id"]).to_numpy())
    config = TrainConfig(sources=[], views=tuple(bundle.views), progress=False)
    result = {
        "bundle": bundle.name,
        "images": int(len(records)),
        "images_in_two_class_folders": int(records["image_id"].duplicated(keep=False).sum()),
        "classes": classes,
        "head_folds": HEAD_FOLDS,
        "images_per_member": {int(m): int(n) for m, n in zip(*np.unique(members, return_counts=True))},
        "images_in_bundle_table": int(records["image_id"].isin(table["image_id"]).sum()),
        "load_average": open("/proc/loadavg").read().split()[:3],
    }

    started = time.perf_counter()
    frozen, errors = embed_mode.embed_features(records, TrainConfig(sources=[], image_size=224, views=config.views, progress=False))
    if errors:
        raise SystemExit(f"unreadable images: {errors}")
    frozen = frozen[:, None, :, : -len(METADATA_FEATURES)]  # one embedding space; no metadata in the teaching set
    predicted = cross_fitted(frozen, np.zeros(len(records), int), labels, folds, len(classes), config)
    result["frozen_lite0_224"] = summary(labels, predicted, classes, time.perf_counter() - started)

    started = time.perf_counter()
    features = member_embeddings(bundle, records)
    predicted = cross_fitted(features, members, labels, folds, len(classes), config)
    result["finetuned_member_networks"] = summary(labels, predicted, classes, time.perf_counter() - started)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
