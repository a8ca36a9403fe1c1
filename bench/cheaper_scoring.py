"""Which cheaper way of scoring keeps what the ensemble gives: the guards of issue 33, measured.

    .venv/bin/python bench/cheaper_scoring.py [BUNDLE] > bench/cheaper_scoring_results.json

Schemes, each against today's scoring (the bundle's test-time views, every member):

- ``one_view``: the identity view alone (half the forward passes);
- ``cascade_m{k}_{band}``: member k alone, the other members only when its risk is within
  `band` (a factor, on the risk's scale) of the threshold.

Guards:

1. Leave-one-source-out: each source is scored by the fold network that never saw it (as in the
   bundle's out_of_fold.csv.gz), under the scheme: its melanoma AUC may drop by at most 0.005 on
   any source, against the same network rescored today's way and against the OOF file itself.
   (A cascade has no honest leave-one-source-out score: its other members saw the source.)
   HAM10000 is split over all four members by lesion. With the exact int8 kernel the members
   rescored today's way reproduce the file (the 0.44 risk differences seen before were the
   saturating kernel of CPUs without VNNI).
2. The uncertainty still ranks errors: AUC of `risk_spread` for wrong referrals (the
   ensemble's decision against the label, all members, leave-one-source-out images) no lower.
3. The referral (and the photo gate's verdict) agree with today's on >= 98% of isic2020/test_128,
   read with its metadata as `dermsight predict ../shared/datasets/isic2020/test_128` reads it.

Member networks are cut out of the ensemble graph (onnx.utils.extract_model: the member's
own nodes and weights, unchanged), so each held-out image costs one network, not four.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dermsight.data.dataset import deduplicate, load_sources
from dermsight.data.inputs import records_from_inputs
from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.imaging.batches import iter_batches
from dermsight.inference.onnx_session import ParallelSession
from dermsight.inference.predictor import Predictor, softmax
from dermsight.models.bundle import load_bundle
from dermsight.models.metadata import encode_metadata

DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SOURCES = ["ham10000", "isic9/train", "isic2020", "isic2017", "derm7pt"]
AUC_DROP = 0.005
AGREEMENT = 0.98
CASCADE_BANDS = (2.0, 3.0, 4.0)  # the first member decides alone outside [t / band, t * band]


def member_graph(bundle_path: Path, member: int, out: Path) -> Path:
    """Member `member`'s own graph cut out of the ensemble graph (inputs image, metadata; output m{k}_logits)."""
    import onnx.utils

    onnx.utils.extract_model(str(bundle_path / "model.onnx"), str(out), ["image", "metadata"], [f"m{member}_logits"])
    return out


def view_logits(session: ParallelSession, output: str, refs: list, metadata: np.ndarray, bundle) -> tuple[np.ndarray, list[int]]:
    """(V, N, ...) logits of `output` in each of the bundle's views, and the readable rows."""
    parts, rows = [], []
    for batch in iter_batches(refs, bundle.preprocessing, 32, views=bundle.views):
        if not batch.indices:
            continue
        n_views, n = batch.images.shape[:2]
        flat = batch.images.reshape(-1, *batch.images.shape[2:])
        meta = np.tile(metadata[batch.indices].astype(np.float32), (n_views, 1))
        out = session.run([output], {"image": flat, "metadata": meta})[0]
        parts.append(out.reshape(n_views, n, *out.shape[1:]))
        rows.extend(batch.indices)
    return np.concatenate(parts, axis=1), rows


def auc(y: np.ndarray, score: np.ndarray) -> float | None:
    return round(float(roc_auc_score(y, score)), 4) if 0 < y.sum() < len(y) else None


def held_out_guard(bundle, oof: pd.DataFrame, workdir: Path, limit: int | None) -> dict:
    records = deduplicate(load_sources([str(DATA / s) for s in SOURCES])).records
    records = records[records["image_ref"].notna() & records["image_id"].isin(oof.index)].reset_index(drop=True)
    records = records.assign(source=records["image_id"].map(oof["source"]), fold=records["image_id"].map(oof["fold"]))
    mel = bundle.classes.index("MEL")
    per_source, per_image = {}, []
    for member in sorted(records["fold"].unique()):
        part = records[records["fold"] == member].sample(frac=1.0, random_state=0).head(limit).reset_index(drop=True)
        session = ParallelSession(member_graph(bundle.path, int(member), workdir / f"m{member}.onnx"))
        logits, rows = view_logits(session, f"m{member}_logits", part["image_ref"].tolist(),
                                   encode_metadata(part, bundle.metadata_features), bundle)
        part = part.iloc[rows].reset_index(drop=True)
        today = softmax(logits.mean(axis=0) / bundle.temperature, axis=1)[:, mel]
        one = softmax(logits[0] / bundle.temperature, axis=1)[:, mel]
        per_image.append(part.assign(today=today, one_view=one, oof=oof.loc[part["image_id"], "MEL"].to_numpy()))
    frame = pd.concat(per_image, ignore_index=True)
    frame["melanoma"] = (frame["diagnosis"] == "MEL").to_numpy()
    for source, part in frame.groupby("source"):
        y = part["melanoma"].to_numpy()
        entry = {"images": len(part), "melanomas": int(y.sum()), "member": sorted(part["fold"].unique().tolist()),
                 "auc_oof_file": auc(y, part["oof"].to_numpy()), "auc_today_rescored": auc(y, part["today"].to_numpy()),
                 "auc_one_view": auc(y, part["one_view"].to_numpy())}
        if entry["auc_one_view"] is not None:
            entry["one_view_minus_today"] = round(entry["auc_one_view"] - entry["auc_today_rescored"], 4)
            entry["one_view_minus_oof_file"] = round(entry["auc_one_view"] - entry["auc_oof_file"], 4)
        per_source[source] = entry
    drops = [min(e["one_view_minus_today"], e["one_view_minus_oof_file"]) for e in per_source.values() if "one_view_minus_today" in e]
    return {
        "per_source": per_source,
        "rescored_vs_oof_file_max_abs_risk_difference": round(float((frame["today"] - frame["oof"]).abs().max()), 5),
        "worst_auc_change": round(min(drops), 4) if drops else None,
        "met": bool(drops) and bool(min(drops) >= -AUC_DROP),
    }, frame


def ensemble_outputs(predictor: Predictor, records: pd.DataFrame) -> tuple[dict, list[int]]:
    """Every member's logits per view (V, N, members, K) on `records`, and the gate's verdict
    today (gate features averaged over the views) and on the first view alone."""
    bundle = predictor.bundle
    metadata = encode_metadata(records, bundle.metadata_features)
    out: dict[str, list] = {"members": [], "gate_today": [], "gate_one_view": []}
    rows: list[int] = []
    for batch in iter_batches(records["image_ref"].tolist(), bundle.preprocessing, 32, views=bundle.views):
        if not batch.indices:
            continue
        n_views, n = batch.images.shape[:2]
        flat = batch.images.reshape(-1, *batch.images.shape[2:])
        meta = np.tile(metadata[batch.indices].astype(np.float32), (n_views, 1))
        members, gate = predictor.session.run(["member_logits", "gate_features"], {"image": flat, "metadata": meta})
        out["members"].append(members.reshape(n_views, n, *members.shape[1:]))
        gate = gate.reshape(n_views, n, -1)
        out["gate_today"].append(predictor.accepts(gate.mean(axis=0), batch.images[0]))
        out["gate_one_view"].append(predictor.accepts(gate[0], batch.images[0]))
        rows.extend(batch.indices)
    return {k: np.concatenate(v, axis=1 if k == "members" else 0) for k, v in out.items()}, rows


def spread_ranks_errors(frame: pd.DataFrame, risks: np.ndarray, threshold: float) -> float | None:
    """AUC of the members' spread for a wrong referral (the ensemble's decision against the label)."""
    wrong = (risks.mean(axis=1) >= threshold) != frame["melanoma"].to_numpy()
    return auc(wrong, risks.std(axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per member and of test_128 "
                        "(checks the code; the figures need all)")
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = os.getloadavg()
    predictor = Predictor(args.bundle)
    bundle = predictor.bundle
    if tuple(bundle.views) != ("identity", "hflip"):
        sys.exit(f"{bundle.path}: views {bundle.views}; this bench compares identity+hflip with identity alone")
    mel, threshold, temperature = predictor.melanoma_index, bundle.melanoma_threshold, bundle.temperature
    result: dict = {"bundle": bundle.name, "views_today": bundle.views, "threshold": threshold}
    oof = load_out_of_fold(bundle).set_index("image_id")
    with tempfile.TemporaryDirectory() as tmp:
        result["leave_one_source_out"], frame = held_out_guard(bundle, oof, Path(tmp), args.limit)

    # Uncertainty: every member on a source-balanced sample of the held-out images (bench/uncertainty.py's 400 per source).
    sample = frame.sample(frac=1.0, random_state=0).groupby("source").head(400).reset_index(drop=True)
    outputs, rows = ensemble_outputs(predictor, sample)
    sample = sample.iloc[rows].reset_index(drop=True)
    member_risk = softmax(outputs["members"] / temperature, axis=3)[..., mel]  # (V, N, members)
    today_spread = spread_ranks_errors(
        sample, softmax(outputs["members"].mean(axis=0) / temperature, axis=2)[..., mel], threshold)
    one_spread = spread_ranks_errors(sample, member_risk[0], threshold)
    result["uncertainty"] = {
        "images": len(sample), "auc_spread_for_wrong_referral_today": today_spread,
        "auc_spread_for_wrong_referral_one_view": one_spread, "met": bool(one_spread >= today_spread),
    }

    # test_128 with its metadata: referral and gate of the whole bundle.
    records = records_from_inputs([str(DATA / "isic2020" / "test_128")])[0]
    records = records[records["image_ref"].notna()].head(args.limit).reset_index(drop=True)
    outputs, rows = ensemble_outputs(predictor, records)
    members = outputs["members"]
    today_risk = softmax(members.mean(axis=(0, 2)) / temperature, axis=1)[:, mel]
    one_risk = softmax(members[0].mean(axis=1) / temperature, axis=1)[:, mel]
    today_gate, one_gate = outputs["gate_today"], outputs["gate_one_view"]
    accepted = today_gate & one_gate
    result["test_128"] = {
        "images": len(rows),
        "one_view": {
            "referral_agreement": round(float(((today_risk >= threshold) == (one_risk >= threshold)).mean()), 4),
            "referral_agreement_accepted_by_both": round(float(((today_risk >= threshold) == (one_risk >= threshold))[accepted].mean()), 4),
            "gate_agreement": round(float((today_gate == one_gate).mean()), 4),
            "refused_today": round(float((~today_gate).mean()), 4),
            "refused_one_view": round(float((~one_gate).mean()), 4),
            "median_abs_risk_difference": round(float(np.median(np.abs(today_risk - one_risk))), 5),
        },
    }
    for k in range(members.shape[2]):
        first = softmax(members[:, :, k].mean(axis=0) / temperature, axis=1)[:, mel]
        for band in CASCADE_BANDS:
            near = (first >= threshold / band) & (first <= threshold * band)
            cascade = np.where(near, today_risk, first)
            result["test_128"][f"cascade_m{k}_{band:g}"] = {
                "share_needing_all_members": round(float(near.mean()), 4),
                "referral_agreement": round(float(((today_risk >= threshold) == (cascade >= threshold)).mean()), 4),
                "forward_cost_vs_today": round(float((1 + 3 * near.mean()) / 4), 3),
            }
    result["test_128"]["one_view"]["met"] = bool(min(result["test_128"]["one_view"]["referral_agreement"],
                                                     result["test_128"]["one_view"]["gate_agreement"]) >= AGREEMENT)
    result["limit"] = args.limit
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_at_start_and_end"] = [load_start, os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
