"""train: `dermsight train` in embed mode (frozen backbone, cached embeddings, linear head) on
the bundle's sources, cold and warm embedding cache; and the shipped recipe's own recorded
training time. The train_minutes target is the shipped recipe's: these embed-mode runs count
for it only when the bundle was itself trained in embed mode. A finetune bundle (the default:
a 4-network finetune ensemble) is not retrained here, so the target is left unmeasured and
the bundle's own recorded time is reported beside it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .common import (
    REPO, Settings, child_env, dermsight_command, load_bundle, now, rounded, run_measured, shared_sources,
    test_128_records,
)


def run(args, settings: Settings, results: dict) -> dict:
    bundle = load_bundle(args.model)
    sources = shared_sources(bundle.training.get("config", {}).get("sources", []))
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-bench-train-"))
    config = bundle.training.get("config", {})
    shipped_mode = config.get("mode", "embed")
    recorded = bundle.training.get("duration_seconds")
    members = bundle.training.get("members")  # a count in bundle.json (4 for the default ensemble)
    out: dict = {
        "what": "dermsight train in embed mode on the bundle's sources, cold and warm embedding cache"
        + ("" if shipped_mode == "embed" else
           f" (NOT the shipped recipe: the bundle was trained in {shipped_mode} mode)"),
        "sources": sources,
        # What the bundle's own training run took (its own clock, a machine shared with other
        # jobs): the shipped recipe is not rerun here (a 4-network finetune run takes hours on 2 cores).
        "shipped_recipe": {
            "command": bundle.training.get("command"),
            "mode": shipped_mode,
            "ensemble_members": members if isinstance(members, int) else len(members or []) or None,
            "recorded_seconds": recorded,
            "recorded_minutes": rounded(recorded / 60, 1) if recorded else None,
            "timed_by_this_bench": shipped_mode == "embed",
            "note": "recorded by the bundle's training run itself (bundle.json training.duration_seconds); "
                    + ("the embed-mode runs below are that recipe" if shipped_mode == "embed" else
                       "not rerun here: the train_minutes target is unmeasured for this bundle"),
        },
    }
    try:
        def train(cache: Path, name: str, max_images: int | None) -> dict:
            cmd = [*dermsight_command(), "train", *sources, "-o", str(workdir / name)]
            if max_images:
                cmd += ["--max-images", str(max_images)]
            result = run_measured(cmd, env=child_env({"DERMSIGHT_CACHE": str(cache)}), cwd=REPO)
            if result["returncode"] != 0:
                raise RuntimeError(f"dermsight train failed: {result['stderr'][-1500:]}")
            info = json.loads((workdir / name / "bundle.json").read_text())["training"]
            return {
                "max_images": max_images,
                "images": info["n_images"],
                "seconds": rounded(result["seconds"], 1),
                "minutes": rounded(result["seconds"] / 60, 2),
                "peak_rss_mb": rounded(result["peak_rss_mb"], 1),
            }

        cold_cache = workdir / "cache"
        if settings.train_cold:
            out["cold"] = train(cold_cache, "cold", None)
            out["warm"] = train(cold_cache, "warm", None)  # the cache the cold run filled
        else:
            # Warm: the user's cache (filled when the default bundle was trained); cold estimated below.
            from dermsight.cache import default_cache_dir

            out["warm"] = train(default_cache_dir(), "warm", settings.train_max_images)
            out["warm"]["cache"] = "the default cache (assumed warm for the bundle's sources)"
        out["embedding"] = measure_cold_embedding(bundle, settings.cold_sample, workdir / "sample-cache")
        views = len(bundle.views)
        full_images = bundle.training.get("n_images")
        if "cold" not in out and full_images:
            scale = full_images / out["warm"]["images"]
            out["cold_estimate_seconds_full"] = rounded(
                out["warm"]["seconds"] * scale + full_images * views / out["embedding"]["embeddings_per_second"], 0
            )
            out["note"] = (
                "quick: warm run on a subset; the full-set cold time is a rough upper bound: the subset's warm time "
                "scaled by the image count (fixed costs such as reading the sources do not really scale) + images x "
                "views / embeddings per second"
            )
        out["minutes_cold_is_estimate"] = "cold" not in out
        headline = out.get("cold", out["warm"]) if settings.train_cold else None
        out["minutes_cold"] = headline["minutes"] if headline else rounded(out["cold_estimate_seconds_full"] / 60, 2)
        out["minutes_warm"] = out["warm"]["minutes"] if out["warm"]["max_images"] is None else None
        # The target's figure: the shipped recipe's training time, only where these runs are that recipe.
        out["shipped_recipe_minutes_measured"] = out["minutes_cold"] if shipped_mode == "embed" else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def measure_cold_embedding(bundle, n: int, cache: Path) -> dict:
    """Embeddings per second into an empty cache (the embedder graph copied in, not exported)."""
    from dermsight.cache import default_cache_dir
    from dermsight.training.embeddings import EmbeddingCache, embed_records

    records = test_128_records(n)
    source = EmbeddingCache(default_cache_dir(), bundle.backbone, bundle.preprocessing.size).embedder_path
    target = EmbeddingCache(cache, bundle.backbone, bundle.preprocessing.size).embedder_path
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    started = now()  # what a cold training run does per image: hash, decode, embed every view, cache
    embed_records(records, bundle.backbone, bundle.preprocessing, tuple(bundle.views), cache, progress=False)
    seconds = now() - started
    return {
        "images": len(records),
        "views": len(bundle.views),
        "embeddings_per_second": rounded(len(records) * len(bundle.views) / seconds, 1),
    }
