"""batch: Predictor.predict_records (what `dermsight predict` runs) on isic2020/test_128 and
on the full-size isic2020/train_originals: images/s, forward passes/s (images x views), ratio
to the ceiling; on test_128 also the paired ratio (rounds of a batch-32 forward block followed
by a predict pass, in one session: the ratio that machine drift moves least)."""

from __future__ import annotations

import statistics

import numpy as np

from .common import Settings, load_bundle, now, originals_records, rounded, test_128_records, warm_page_cache


def run(args, settings: Settings, results: dict) -> dict:
    from dermsight.imaging.batches import iter_batches
    from dermsight.inference.predictor import Predictor

    bundle = load_bundle(args.model)
    n_views = len(bundle.views)
    ceiling = results.get("ceiling", {}).get("images_per_second")
    best = results.get("ceiling", {}).get("best_images_per_second")
    test = test_128_records(settings.test_images)
    originals = originals_records()
    warm_page_cache([*test["image_ref"], *originals["image_ref"]])
    predictor = Predictor(bundle)
    predictor.predict_records(test.iloc[:32], progress=False)  # warm-up: arenas, thread pools

    def measure(records, passes: int) -> dict:
        seconds = []
        unreadable = {}
        for _ in range(passes):
            started = now()
            table, unreadable = predictor.predict_records(records, progress=False)
            seconds.append(now() - started)
        assert len(table) + len(unreadable) == len(records)
        rate = len(records) / statistics.median(seconds)
        forward = rate * n_views
        return {
            "images": len(records),
            "passes": passes,
            "seconds": rounded(statistics.median(seconds), 2),
            "images_per_second": rounded(rate, 1),
            "forward_passes_per_second": rounded(forward, 1),
            "image_ratio_to_ceiling": rounded(rate / ceiling) if ceiling else None,
            "forward_ratio_to_ceiling": rounded(forward / ceiling) if ceiling else None,
            "forward_ratio_to_best_run_size": rounded(forward / best) if best else None,
            "unreadable": len(unreadable),
        }

    out = {
        "what": "Predictor.predict_records (= dermsight predict) from image files to the prediction table",
        "views": list(bundle.views),
        "batch_size": 32,
        "rows_per_onnx_run": results.get("ceiling", {}).get("predictor_rows_per_run"),
        "test_128": measure(test, 1),
        "train_originals": measure(originals, settings.originals_passes),
    }
    out["test_128"]["paired"] = paired_ratio(predictor, test, settings)
    # Diagnostics: decoding alone (same thread pool, no inference), to show which side bounds the pipeline.
    for name, records in (("test_128", test), ("train_originals", originals)):
        started = now()
        count = sum(len(b.indices) for b in iter_batches(records["image_ref"].tolist(), bundle.preprocessing, 32))
        out[name]["decode_only_images_per_second"] = rounded(count / (now() - started), 1)
    sizes = []
    from PIL import Image

    for ref in originals["image_ref"]:
        with Image.open(ref) as image:
            sizes.append(image.size)
    out["train_originals"]["largest_source_pixels"] = "x".join(map(str, max(sizes, key=lambda s: s[0] * s[1])))
    return out


def paired_ratio(predictor, records, settings: Settings) -> dict:
    """The ratio measured side by side: rounds of a batch-32 forward block (random input, in
    the Predictor's own session) right before a predict pass over `records`. The ceiling
    drifts by +-5% within minutes on a shared machine; pairing cancels most of that drift."""
    bundle = predictor.bundle
    size, n, views = bundle.preprocessing.size, settings.ceiling_batch, len(bundle.views)
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((n, 3, size, size)).astype(np.float32),
             "metadata": np.zeros((n, len(bundle.metadata_features)), np.float32)}
    ceilings, forwards = [], []
    for _ in range(settings.paired_rounds):
        runs, started = 0, now()
        while now() - started < settings.paired_ceiling_seconds:
            predictor.session.run(None, feeds)
            runs += 1
        ceilings.append(runs * n / (now() - started))
        started = now()
        predictor.predict_records(records, progress=False)
        forwards.append(len(records) * views / (now() - started))
    return {
        "rounds": settings.paired_rounds,
        "ceiling_images_per_second": [rounded(c, 1) for c in ceilings],
        "forward_passes_per_second": [rounded(f, 1) for f in forwards],
        "forward_ratio_to_ceiling": rounded(statistics.median(f / c for f, c in zip(forwards, ceilings))),
    }
