"""Does scoring more test-time views rank melanomas better on sources the networks never saw?

    python bench/tta.py [BUNDLE] > bench/tta_results.json

Images of each source a fold network was trained without (isic9 non-HAM copies, Derm7pt,
SIIM-ISIC 2020, the isic2017 archive) and of HAM10000's lesion-grouped CV: at most PER_CLASS
melanomas and PER_CLASS benign images per source, a fixed random sample (AUC does not depend on
the class mix; the sample keeps the CPU of 8 views within reach of this shared machine), each
scored by the member network that never saw it (that member's subgraph of the ensemble graph), in each
of the eight square symmetries (the bundle's preprocessing, then flips, 90-degree rotations and
transposes of the (3, S, S) array; the networks trained with flips and 90-degree rotations). View
sets (logits averaged over the views) are compared with the bundle's own two views, each on the same
images: melanoma AUC and the specificity at the source's own 90%-sensitivity threshold, with
the CPU seconds per image-view of one member network, and each set's AUC gain over the bundle's
two views with a 95% paired bootstrap interval (images resampled within the source).
"out_of_fold_file" is the bundle's recorded out-of-fold risk of the same images (what training's
fold graphs gave), for reference. The per-view logits are cached (TTA_CACHE, default
/tmp/dermsight-tta.npz) so the comparison can be recomputed without rescoring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import pandas as pd
from frozen_heads import paired_gain, specificity_at
from robustness import labelled_records
from sklearn.metrics import roc_auc_score

from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.evaluation.robustness import decode_all, members_of
from dermsight.inference.onnx_session import ParallelSession
from dermsight.inference.predictor import Predictor, softmax
from dermsight.models.metadata import encode_metadata

PER_CLASS = 1200
BATCH = 32
DIHEDRAL = ("identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose")
BUNDLE_VIEWS = "2 views (bundle: identity, hflip)"
VIEW_SETS = {
    "1 view (identity)": ("identity",),
    BUNDLE_VIEWS: ("identity", "hflip"),
    "4 views (flips, rot180)": ("identity", "hflip", "vflip", "rot180"),
    "4 views (identity, hflip, rot90, transpose)": ("identity", "hflip", "rot90", "transpose"),
    "8 views (every square symmetry)": DIHEDRAL,
}


def dihedral(images: np.ndarray, name: str) -> np.ndarray:
    """One of the eight symmetries of a (N, 3, S, S) batch."""
    flipped = {"identity": images, "hflip": images[..., ::-1], "vflip": images[..., ::-1, :],
               "rot180": images[..., ::-1, ::-1]}
    if name in flipped:
        return flipped[name]
    transposed = images.swapaxes(-1, -2)
    return {"transpose": transposed, "rot90": transposed[..., ::-1, :], "rot270": transposed[..., ::-1],
            "antitranspose": transposed[..., ::-1, ::-1]}[name]


def scored_records(predictor: Predictor, oof: pd.DataFrame) -> pd.DataFrame:
    """The held-out images described above, each with the member that never saw it."""
    records = labelled_records(oof)
    records = records[records["image_id"].isin(set(oof["image_id"]))].copy()
    records["member"] = members_of(predictor, records["fold"].to_numpy())
    records["melanoma"] = records["diagnosis"] == "MEL"
    sample = records.sample(frac=1.0, random_state=0).groupby(["source", "melanoma"]).head(PER_CLASS)
    return sample.sort_values(["member", "source", "image_id"]).reset_index(drop=True)


def member_graph(bundle_graph: Path, member: int) -> Path:
    """Member `member`'s subgraph of an ensemble graph (its logits only), extracted once into /tmp."""
    stat = bundle_graph.stat()
    path = Path("/tmp/dermsight-tta-members") / f"{stat.st_size}-{stat.st_mtime_ns}-m{member}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.utils.extract_model(str(bundle_graph), str(path), ["image", "metadata"], [f"m{member}_logits"])
    return path


def member_batches(predictor: Predictor, records: pd.DataFrame):
    """(member's logits output, its session, rows, preprocessed images (n, 3, S, S)) for batches of the
    records, each batch scored by its records' member network (the `member` column)."""
    prep = predictor.bundle.preprocessing
    members = records["member"].to_numpy()
    refs = records["image_ref"].tolist()
    for member in np.unique(members):
        session = ParallelSession(member_graph(predictor.bundle.onnx_path, int(member)))
        indices = np.flatnonzero(members == member)
        for start in range(0, len(indices), BATCH):
            rows = indices[start : start + BATCH]
            images = np.stack([prep.normalise(prep.resize(rgb)) for rgb in decode_all([refs[r] for r in rows])])
            yield f"m{member}_logits", session, rows, images
            print(f"member {member}: {start + len(rows)}/{len(indices)}", file=sys.stderr, flush=True)


def view_logits(predictor: Predictor, records: pd.DataFrame) -> tuple[np.ndarray, float]:
    """(8, N, K) logits of every record in every symmetry from its member network, and CPU seconds
    per image-view of one member."""
    metadata = encode_metadata(records, predictor.bundle.metadata_features).astype(np.float32)
    out = np.zeros((len(DIHEDRAL), len(records), len(predictor.classes)), np.float32)
    cpu = 0.0
    for output, session, rows, images in member_batches(predictor, records):
        stacked = np.concatenate([np.ascontiguousarray(dihedral(images, name)) for name in DIHEDRAL])
        began = time.process_time()
        feeds = {"image": stacked, "metadata": np.tile(metadata[rows], (len(DIHEDRAL), 1))}
        logits = session.run([output], feeds)[0]
        cpu += time.process_time() - began
        out[:, rows] = logits.reshape(len(DIHEDRAL), len(rows), -1)
    return out, cpu / (len(records) * len(DIHEDRAL))


def compare(records: pd.DataFrame, logits: np.ndarray, oof: pd.DataFrame, temperature: float, mel: int) -> list[dict]:
    oof_risk = records["image_id"].map(oof.set_index("image_id")["MEL"]).to_numpy()
    rng = np.random.default_rng(0)
    result = []
    for source, rows in records.groupby("source").indices.items():
        y = (records["diagnosis"].to_numpy()[rows] == "MEL").astype(int)
        entry = {"source": source, "held_out": "grouped_cv" if source == "ham10000" else "left_out_source",
                 "images": int(len(rows)), "melanomas": int(y.sum()),
                 "out_of_fold_file": {"auc": float(roc_auc_score(y, oof_risk[rows])),
                                      "specificity_at_90": specificity_at(y, oof_risk[rows])}}
        risks = {}
        for label, names in VIEW_SETS.items():
            mean_logits = logits[[DIHEDRAL.index(n) for n in names]][:, rows].mean(axis=0)
            risks[label] = softmax(mean_logits / temperature, axis=1)[:, mel]
        shipped = risks[BUNDLE_VIEWS]
        for label, risk in risks.items():
            entry[label] = {"auc": float(roc_auc_score(y, risk)), "specificity_at_90": specificity_at(y, risk)}
            if label != BUNDLE_VIEWS:
                entry[label]["auc_gain_ci95"] = paired_gain(y, shipped, risk, rng)
        result.append(entry)
    return result


def main(bundle: str) -> dict:
    predictor = Predictor(bundle)
    oof = load_out_of_fold(predictor.bundle)
    records = scored_records(predictor, oof)
    cache = Path(os.environ.get("TTA_CACHE", "/tmp/dermsight-tta.npz"))
    ids = records["image_id"].to_numpy(dtype=str)
    if cache.exists() and np.array_equal(np.load(cache)["image_id"], ids):
        saved = np.load(cache)
        logits, cpu = saved["logits"], float(saved["cpu_per_view"])
    else:
        logits, cpu = view_logits(predictor, records)
        np.savez(cache, logits=logits, image_id=ids, cpu_per_view=cpu)
    return {
        "bundle": predictor.bundle.name,
        "load_average": open("/proc/loadavg").read().split()[:3],
        "onnx_cpu_seconds_per_image_view_one_member": cpu,
        "note": "the shipped bundle runs its 4 members on every view: its scoring CPU grows with its view count",
        "per_source": compare(records, logits, oof, predictor.bundle.temperature, predictor.classes.index("MEL")),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", default="bundles/default", help="Bundle directory (default: bundles/default).")
    print(json.dumps(main(parser.parse_args().bundle), indent=1))
