"""Should the bundle's backbone run in int8? Static quantization (ONNX Runtime's
quantize_static, per-channel weights, calibrated on real shared images), judged by the
rule of the performance issue: keep int8 only if the melanoma AUC drops by at most 0.005.
Prints one JSON object; never changes the bundle (the int8 graph goes to a temporary
folder unless --save names a file).

    .venv/bin/python bench/quantize.py                       # fold 0 of HAM10000, both formats
    .venv/bin/python bench/quantize.py --quick               # small sets: checks the code; rough numbers
    .venv/bin/python bench/quantize.py --formats qoperator --methods percentile --save /tmp/model.int8.onnx

Data, grouped so that no lesion is on both sides:
* evaluation: the real HAM10000 images of the bundle's out-of-fold fold `--fold` (folds are
  patient/lesion-grouped), scored the way `dermsight predict` scores them (every view,
  metadata, calibration). The bundle's final head was fitted on every fold, so the absolute
  AUC here is optimistic; the fp32 - int8 *difference* is what is judged (a paired, lesion-
  clustered bootstrap gives its interval). The bundle's own out-of-fold AUC on the same
  images is reported beside it.
* calibration: HAM10000 images of lesions outside that fold, in every view of the bundle.
The float reference is the bundle's float network (weights.pt), so an int8 bundle is checked
the same way. An ensemble bundle (the default: four int8 fold networks in one graph) ships no
float weights, so it cannot be checked here: give --model a single-network bundle, e.g. the
previous default from git:

    git archive 1165ff0^ bundles/default | tar -x -C /tmp/previous
    .venv/bin/python bench/quantize.py --model /tmp/previous/bundles/default --formats qdq --methods minmax

Quantization is `dermsight.models.quantize.quantize_graph`, what `dermsight train --int8`
runs (backbone only; the head stays float). Every format x calibration method given is tried,
each twice: with the exact U8U8 kernel DermSight runs (`session.x64quantprecision`) and with ONNX
Runtime's default U8S8 kernel, whose 16-bit sums saturate on x86 CPUs without VNNI ("machine" says
which CPU this was); only the exact one can be kept.

Speed, measured fairly: every graph (fp32 and each int8 variant) is first warmed up (a predict
pass over a few images and --warmup-seconds of forward runs each), then the end-to-end passes
over the evaluation images alternate between the graphs, --rounds times with the order
rotated each round (median per graph); the batch-32 forward figures alternate in blocks too.
The machine's load averages at the start and the end are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets"))
MAX_AUC_DROP = 0.005
EXACT_KERNEL = "exact U8U8"  # session.x64quantprecision: what DermSight runs
SATURATING_KERNEL = "default U8S8"  # ONNX Runtime's default: 16-bit saturating sums on x86 CPUs without VNNI


def held_out_split(bundle, fold: int, n_eval: int | None, n_calibration: int, seed: int = 0):
    """HAM10000 records of `fold` (evaluation) and of the other folds (calibration),
    sampled by whole lesions."""
    from dermsight.data import readers

    oof = pd.read_csv(bundle.path / "out_of_fold.csv.gz", dtype={"image_id": str, "lesion_id": str})
    ham = readers.read_ham10000(DATA / "ham10000").records
    ham = ham[ham["image_ref"].notna()].merge(
        oof[oof["source"] == "ham10000"][["image_id", "fold", "MEL"]].rename(columns={"MEL": "oof_mel"}),
        on="image_id", how="left",
    )
    if not (ham["fold"] == fold).any():
        raise SystemExit(f"the bundle's out-of-fold table has no HAM10000 image in fold {fold}")
    rng = np.random.default_rng(seed)

    def by_lesion(frame: pd.DataFrame, n: int | None) -> pd.DataFrame:
        if not n or n >= len(frame):
            return frame.reset_index(drop=True)
        lesions = frame["lesion_id"].unique()
        rng.shuffle(lesions)
        counts = frame.groupby("lesion_id").size()
        keep = lesions[: int(np.searchsorted(np.cumsum(counts.loc[lesions].to_numpy()), n)) + 1]
        return frame[frame["lesion_id"].isin(keep)].reset_index(drop=True)

    evaluation = by_lesion(ham[ham["fold"] == fold], n_eval)
    # Calibration: any other HAM10000 lesion (a finetune bundle's table may hold one fold only).
    held_out_lesions = set(ham.loc[ham["fold"] == fold, "lesion_id"])
    calibration = by_lesion(ham[~ham["lesion_id"].isin(held_out_lesions)], n_calibration)
    assert not set(evaluation["lesion_id"]) & set(calibration["lesion_id"])
    return evaluation, calibration


def model_inputs(records: pd.DataFrame, bundle) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed real images in every bundle view (N*V, 3, S, S) and their metadata rows."""
    from dermsight.imaging.batches import iter_batches
    from dermsight.models.metadata import encode_metadata

    metadata = encode_metadata(records)
    images, meta = [], []
    for b in iter_batches(records["image_ref"].tolist(), bundle.preprocessing, 16, views=bundle.views):
        images.append(b.images.reshape(-1, *b.images.shape[2:]))
        meta.append(np.tile(metadata[b.indices].astype(np.float32), (len(bundle.views), 1)))
    return np.concatenate(images), np.concatenate(meta)


def paired_bootstrap(truth, a, b, groups, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of AUC(a) - AUC(b), resampling whole lesions (the one cluster bootstrap of
    dermsight.evaluation.metrics)."""
    from dermsight.evaluation.metrics import auc, bootstrap_values, percentile_interval

    def difference(y: np.ndarray, pair: np.ndarray) -> float:
        return auc(y, pair[:, 0]) - auc(y, pair[:, 1])

    return percentile_interval(bootstrap_values(difference, np.asarray(truth), np.column_stack([a, b]), n_boot, seed, groups))


def embedding_error(reference, candidate, feeds: dict) -> float:
    """||e_int8 - e_fp32|| / ||e_fp32 - mean|| over a batch: the error relative to how much
    embeddings differ between images (what the OOD gate and patient context measure)."""
    a = reference.run(["embedding"], feeds)[0]
    b = candidate.run(["embedding"], feeds)[0]
    return float(np.linalg.norm(b - a) / np.linalg.norm(a - a.mean(axis=0)))


def forward_feeds(size: int, n_meta: int, batch: int = 32) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            "metadata": np.zeros((batch, n_meta), np.float32)}


def warm_up(sessions: dict, feeds: dict, seconds: float) -> None:
    """Forward runs of every session in turn for `seconds` in all (at least one each): arenas,
    page mapping and CPU clocks settle before anything is timed."""
    until = time.perf_counter() + seconds
    while True:
        for session in sessions.values():
            session.run(None, feeds)
        if time.perf_counter() >= until:
            return


def forward_speed(sessions: dict, size: int, n_meta: int, runs: int, batch: int = 32) -> dict:
    """Images/s of a batch-32 forward (random input), sessions interleaved against noise
    (after `warm_up`)."""
    feeds = forward_feeds(size, n_meta, batch)
    for session in sessions.values():
        session.run(None, feeds)
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - started)
    return {name: round(batch / statistics.median(t), 1) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="int8 static quantization check (prints JSON).")
    parser.add_argument("--quick", action="store_true", help="~300 evaluation and 48 calibration images.")
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: bundles/default).")
    parser.add_argument("--fold", type=int, default=0, help="The out-of-fold fold to evaluate on.")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="Evaluation images (default: the whole fold; quick: 300).")
    parser.add_argument("--calibration", type=int, default=None, help="Calibration images (default 256; quick 48).")
    parser.add_argument("--formats", default="qdq,qoperator", help="qdq and/or qoperator, comma-separated.")
    parser.add_argument("--methods", default="minmax,percentile",
                        help="Calibration methods to try: minmax, percentile, entropy.")
    parser.add_argument("--keep-float", default="",
                        help="Also keep float the nodes whose name contains one of these (comma-separated), "
                             "e.g. /conv_head/.")
    parser.add_argument("--save", type=Path, default=None, help="Keep the (first format's) int8 graph here.")
    parser.add_argument("--rounds", type=int, default=None,
                        help="End-to-end passes per graph, alternating (default 3; quick 1).")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="Forward runs of all graphs before timing (default 5; quick 1).")
    parser.add_argument("--output", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()

    from run import cpu_model

    from dermsight.evaluation.metrics import auc as roc_auc
    from dermsight.inference.onnx_session import ParallelSession
    from dermsight.inference.predictor import Predictor
    from dermsight.models.bundle import load_bundle
    from dermsight.models.network import DermSightNet, export_onnx
    from dermsight.models.quantize import is_quantized, quantize_graph

    bundle = load_bundle(args.model)
    if not (bundle.path / "weights.pt").exists():
        raise SystemExit(
            f"{bundle.path} ships no float weights (weights.pt): an ensemble bundle keeps its members' float weights "
            "in its training run's checkpoints, so its int8 graph has no float reference here. Run this on a "
            "single-network bundle, e.g. the previous default: `git archive 1165ff0^ bundles/default | tar -x -C "
            "/tmp/previous` and --model /tmp/previous/bundles/default"
        )
    load_at_start = os.getloadavg()
    rounds = args.rounds or (1 if args.quick else 3)
    warmup_seconds = args.warmup_seconds if args.warmup_seconds is not None else (1.0 if args.quick else 5.0)
    n_eval = args.eval_images or (300 if args.quick else None)
    n_cal = args.calibration or (48 if args.quick else 256)
    evaluation, calibration = held_out_split(bundle, args.fold, n_eval, n_cal)
    truth = (evaluation["diagnosis"] == "MEL").to_numpy().astype(int)
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-int8-"))
    fp32_path = workdir / "model.fp32.onnx"  # the bundle's float network (from weights.pt), int8 bundle or not
    export_onnx(DermSightNet.from_bundle(bundle), fp32_path, bundle.preprocessing.size)

    predictor = Predictor(bundle)
    sessions = {"fp32": ParallelSession(fp32_path)}
    report = {
        "bundle": bundle.name,
        "machine": cpu_model(),
        "bundle_graph": "int8" if is_quantized(bundle.onnx_path) else "float",
        "quick": args.quick,
        "evaluation": {
            "source": f"HAM10000 images of out-of-fold fold {args.fold} (lesion-grouped)",
            "images": len(evaluation), "lesions": int(evaluation["lesion_id"].nunique()), "melanomas": int(truth.sum()),
        },
        "calibration": {"images": len(calibration), "views": list(bundle.views),
                        "kept_float": ["pool, metadata concat, linear head, CAM",
                                       *[p for p in args.keep_float.split(",") if p]],
                        "source": "HAM10000 images of lesions outside the evaluation fold"},
        "auc_bundle_out_of_fold_same_images": round(roc_auc(truth, evaluation["oof_mel"].to_numpy()), 4),
        "max_auc_drop_allowed": MAX_AUC_DROP,
        "timing": {"warmup": f"a predict pass over 32 images and {warmup_seconds:g} s of forward runs of every graph",
                   "end_to_end_rounds": rounds,
                   "order": "end-to-end passes alternate between the graphs, the order rotated each round; median"},
        "int8": {},
    }
    started = time.perf_counter()
    calibration_inputs = model_inputs(calibration, bundle)
    report["calibration"]["prepare_seconds"] = round(time.perf_counter() - started, 1)
    probe = dict(zip(("image", "metadata"), model_inputs(evaluation.iloc[:32], bundle)))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    variants = [(f, m.strip()) for m in args.methods.split(",") if m.strip() for f in formats]
    threshold = bundle.melanoma_threshold
    paths = {"fp32": fp32_path}
    for i, (fmt, method) in enumerate(variants):
        name = f"{fmt}-{method}"
        path = args.save if (args.save and i == 0) else workdir / f"model.{name}.onnx"
        started = time.perf_counter()
        quantize_graph(fp32_path, path, *calibration_inputs, method=method, quant_format=fmt,
                       keep_float=tuple(p for p in args.keep_float.split(",") if p))
        report["int8"][name] = {"format": fmt, "calibration_method": method, "kernel": EXACT_KERNEL,
                                "quantize_seconds": round(time.perf_counter() - started, 1)}
        sessions[name], paths[name] = ParallelSession(path), path
        saturating = f"{name} ({SATURATING_KERNEL})"  # the same graph, ONNX Runtime's default kernel
        report["int8"][saturating] = {"format": fmt, "calibration_method": method, "kernel": SATURATING_KERNEL}
        sessions[saturating], paths[saturating] = ParallelSession(path, exact_int8=False), path

    # Warm every graph up, then alternate the end-to-end passes (fp32 no longer runs cold first).
    for session in sessions.values():
        predictor.session = session
        predictor.predict_records(evaluation.iloc[:32], progress=False)
    warm_up(sessions, forward_feeds(bundle.preprocessing.size, len(bundle.metadata_features)), warmup_seconds)
    tables: dict[str, pd.DataFrame] = {}
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            predictor.session = sessions[name]
            started = time.perf_counter()
            table, errors = predictor.predict_records(evaluation, progress=False)
            seconds[name].append(time.perf_counter() - started)
            assert not errors and list(table["image"]) == list(evaluation["image_id"])
            tables.setdefault(name, table)
    report["end_to_end_seconds_by_round"] = {name: [round(x, 2) for x in t] for name, t in seconds.items()}
    fp32_table = tables["fp32"]
    fp32_risk = fp32_table["melanoma_risk"].to_numpy()
    report["auc_fp32"] = round(roc_auc(truth, fp32_risk), 4)
    report["fp32_end_to_end_images_per_second"] = round(len(evaluation) / statistics.median(seconds["fp32"]), 1)

    def at_threshold(risk: np.ndarray) -> dict:
        flagged = risk >= threshold
        return {"sensitivity": round(float(flagged[truth == 1].mean()), 4),
                "specificity": round(float((~flagged[truth == 0]).mean()), 4)}

    report["fp32_at_threshold"] = at_threshold(fp32_risk)
    for name, entry in report["int8"].items():
        table = tables[name]
        risk = table["melanoma_risk"].to_numpy()
        auc = roc_auc(truth, risk)
        low, high = paired_bootstrap(
            truth, fp32_risk, risk, evaluation["lesion_id"].to_numpy(), 200 if args.quick else 1000
        )
        entry.update({
            "auc": round(auc, 4),
            "auc_drop": round(report["auc_fp32"] - auc, 4),
            "auc_drop_95ci": [round(low, 4), round(high, 4)],
            "kept": bool(report["auc_fp32"] - auc <= MAX_AUC_DROP),
            "at_threshold": at_threshold(risk),
            "max_abs_risk_difference": round(float(np.abs(risk - fp32_risk).max()), 4),
            "referral_decisions_changed": int(((risk >= threshold) != (fp32_risk >= threshold)).sum()),
            # The embedding also feeds the out-of-distribution gate and the patient context.
            "ood_gate_decisions_changed": int((table["looks_dermoscopic"] != fp32_table["looks_dermoscopic"]).sum()),
            "embedding_relative_error": round(embedding_error(sessions["fp32"], sessions[name], probe), 4),
            "end_to_end_images_per_second": round(len(evaluation) / statistics.median(seconds[name]), 1),
            "end_to_end_speedup": round(statistics.median(seconds["fp32"]) / statistics.median(seconds[name]), 2),
            "model_mb": round(paths[name].stat().st_size / 1e6, 1),
        })
    speed = forward_speed(sessions, bundle.preprocessing.size, len(bundle.metadata_features), 3 if args.quick else 15)
    report["forward_images_per_second_batch32"] = speed
    for name in report["int8"]:
        report["int8"][name]["forward_speedup"] = round(speed[name] / speed["fp32"], 2)
    report["fp32_model_mb"] = round(Path(fp32_path).stat().st_size / 1e6, 1)
    report["load_average_at_start"] = [round(x, 2) for x in load_at_start]  # 1, 5, 15 min; the whole machine
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    kept = sorted(
        (name for name, r in report["int8"].items()
         if r["kept"] and r["forward_speedup"] > 1.05 and r["kernel"] == EXACT_KERNEL),
        key=lambda name: -report["int8"][name]["forward_speedup"],
    )
    report["verdict"] = (
        f"int8 ({kept[0]}) passes the AUC rule and is faster: worth shipping as a bundle option"
        if kept else "keep fp32: no int8 variant both keeps the AUC within 0.005 and runs faster"
    ) + (
        "; the AUC rule is judged on the point estimate: see auc_drop_95ci and referral_decisions_changed too"
    )
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    for path in workdir.iterdir():
        path.unlink()
    workdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
