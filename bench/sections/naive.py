"""naive: what scoring costs when written the obvious way, one image at a time: PIL open (a
full decode, no reduced-scale `draft`), the bundle's own preprocessing (its fit, colour
constancy and normalisation, so the numbers are the same as predict's), then every view at
batch 1 through the network, and the end-to-end path's speed-up over it.

The network, in order of preference:
* `torch`: the bundle's float network rebuilt in eager torch from weights.pt (a single-network
  bundle ships it);
* `onnx`: the bundle's own ONNX graph in a default ONNX Runtime session (its own thread pool,
  none of DermSight's: no ParallelSession, no static-padding graph, no batching, no decode
  pool). An ensemble bundle ships no float weights, so this is its baseline; the graph is
  the one predict runs, so the speed-up is what the pipeline alone buys.

Runs in a child process (bench/run.py --child naive) so that torch's threads and allocator
start clean. `baseline` in the JSON says which network was used; `--naive onnx` forces the
ONNX one on any bundle."""

from __future__ import annotations

import numpy as np

from .common import (
    Settings, load_bundle, now, originals_records, rounded, run_child_section, test_128_records, warm_page_cache,
)


def run(args, settings: Settings, results: dict) -> dict:
    payload = run_child_section("naive", args, "env")
    e2e = results.get("batch", {}).get("test_128", {}).get("images_per_second")
    payload["speedup_of_end_to_end"] = rounded(e2e / payload["images_per_second"], 2) if e2e else None
    e2e_originals = results.get("batch", {}).get("train_originals", {}).get("images_per_second")
    payload["speedup_of_end_to_end_train_originals"] = (
        rounded(e2e_originals / payload["train_originals_images_per_second"], 2) if e2e_originals else None
    )
    return payload


def baseline_of(bundle, wanted: str | None = None) -> str:
    """`torch` when the bundle ships float weights (weights.pt), else `onnx`; `wanted` forces one."""
    if wanted:
        if wanted == "torch" and not (bundle.path / "weights.pt").exists():
            raise SystemExit(f"--naive torch needs {bundle.path / 'weights.pt'} (this bundle ships no float weights)")
        return wanted
    return "torch" if (bundle.path / "weights.pt").exists() else "onnx"


def child(args, settings: Settings) -> dict:
    """One image at a time: PIL open (no draft) + the bundle's preprocessing + every view at batch 1."""
    from PIL import Image

    from dermsight.imaging.preprocess import view
    from dermsight.inference.predictor import Predictor

    bundle = load_bundle(args.model)
    prep = bundle.preprocessing
    kind = baseline_of(bundle, getattr(args, "naive", None))
    n_meta = len(bundle.metadata_features)
    if kind == "torch":
        import torch

        from dermsight.models.network import DermSightNet

        net = DermSightNet.from_bundle(bundle)
        meta = torch.zeros(1, n_meta)

        def forward(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return net(torch.from_numpy(x), meta)[0].numpy()

        threads = torch.get_num_threads()
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()  # ONNX Runtime's defaults but the exact int8 kernel: the same numbers as predict
        options.add_session_config_entry("session.x64quantprecision", "1")
        session = ort.InferenceSession(str(bundle.onnx_path), options, providers=["CPUExecutionProvider"])
        meta = np.zeros((1, n_meta), np.float32)
        logits_at = [output.name for output in session.get_outputs()].index("logits")

        def forward(x: np.ndarray) -> np.ndarray:  # every output, as predict needs them
            return session.run(None, {"image": x, "metadata": meta})[logits_at]

        threads = None  # ONNX Runtime's default: one intra-op thread per core

    def score(path: str) -> np.ndarray:
        with Image.open(path) as image:
            x = prep(np.asarray(image.convert("RGB")))[None]
        return np.mean([forward(np.ascontiguousarray(view(x, name))) for name in bundle.views], axis=0)

    records = test_128_records(settings.naive_images)
    paths = records["image_ref"].tolist()
    warm_page_cache(paths)
    first = score(paths[0])  # warm-up, and a check that the baseline computes the bundle's numbers
    with Image.open(paths[0]) as image:
        x = prep(np.asarray(image.convert("RGB")))
    feeds = {"image": np.stack([view(x, v) for v in bundle.views]),
             "metadata": np.zeros((len(bundle.views), n_meta), np.float32)}
    reference = Predictor(bundle).session.run(["logits"], feeds)[0].mean(axis=0)
    started = now()
    for path in paths:
        score(path)
    rate = len(paths) / (now() - started)
    originals = originals_records()["image_ref"].tolist()
    warm_page_cache(originals)
    started = now()
    for path in originals:
        score(path)
    originals_rate = len(originals) / (now() - started)
    network = {
        "torch": "eager torch DermSightNet from weights.pt (float32)",
        "onnx": "the bundle's model.onnx in a default onnxruntime.InferenceSession (with the exact int8 kernel)",
    }[kind]
    return {
        "what": f"PIL open (no draft) + the bundle's preprocessing + {network}, batch 1, every view, one image at a "
        "time; test_128 images, and the full-size train_originals",
        "baseline": kind,
        "images": len(paths),
        "views": list(bundle.views),
        "threads": threads,
        "allocator": args.allocator,
        "images_per_second": rounded(rate, 1),
        "forward_passes_per_second": rounded(rate * len(bundle.views), 1),
        # torch vs an int8 graph: the quantization error; onnx: the same graph, so ~0.
        "max_abs_logit_difference_vs_predictor_session": rounded(np.abs(first[0] - reference).max(), 5),
        "train_originals_images": len(originals),
        "train_originals_images_per_second": rounded(originals_rate, 1),
    }
