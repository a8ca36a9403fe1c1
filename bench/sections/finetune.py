"""finetune: images/s of finetune-mode training steps (the bundle's image size, batch 48,
channels_last), each allocator set-up in a child process of its own (bench/run.py --child)."""

from __future__ import annotations

import numpy as np

from .common import DATA, Settings, now, rounded, run_child_section


def run(args, settings: Settings, results: dict) -> dict:
    tuned = run_child_section("finetune", args, "env")
    via_mallopt = run_child_section("finetune", args, "mallopt")
    default = run_child_section("finetune", args, "default")
    tuned["images_per_second_mallopt"] = via_mallopt["images_per_second"]
    tuned["images_per_second_glibc_defaults"] = default["images_per_second"]
    tuned["allocator_speedup"] = rounded(tuned["images_per_second"] / default["images_per_second"], 2)
    tuned["peak_rss_mb_glibc_defaults"] = default["process_peak_rss_mb"]
    return tuned


def child(args, settings: Settings) -> dict:
    """A few finetune-mode steps exactly as train_one_model runs them (augmentation, channels_last, AdamW)."""
    if args.allocator == "mallopt":
        from dermsight.allocator import tune_for_torch

        assert tune_for_torch() == "mallopt"
    import torch
    from torch.utils.data import DataLoader

    from dermsight.data import readers
    from dermsight.imaging.preprocess import Preprocessing
    from dermsight.models.metadata import METADATA_FEATURES, encode_metadata
    from dermsight.models.network import DermSightNet
    from dermsight.training.finetune import LesionImages, decode_all
    from dermsight.training.losses import make_loss

    from .common import load_bundle

    size, batch = load_bundle(args.model).preprocessing.size, 48  # the default bundle's training resolution
    prep = Preprocessing(size=size)
    steps = settings.finetune_warmup + settings.finetune_steps
    records = readers.read_ham10000(DATA / "ham10000").records.iloc[: batch * steps].reset_index(drop=True)
    squares, _ = decode_all(records, prep, progress=False)
    labels = np.arange(len(records)) % 7
    dataset = LesionImages(squares, encode_metadata(records), labels, prep, train=True)
    loader = DataLoader(dataset, batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    net = DermSightNet.create("efficientnet_lite0", len(METADATA_FEATURES), 7).to(memory_format=torch.channels_last)
    net.train()
    criterion = make_loss("ce", None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    seconds = []
    batches = iter(loader)
    for _ in range(len(loader)):
        started = now()
        images, meta, target, _ = next(batches)  # augmentation happens here (the last item: source-prior offsets)
        loss = criterion(net(images.to(memory_format=torch.channels_last), meta)[0], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(now() - started)
    timed = seconds[settings.finetune_warmup :]
    return {
        "what": "finetune-mode training steps (augmentation + forward + backward + AdamW), data loading included",
        "image_size": size,
        "batch_size": batch,
        "channels_last": True,
        "steps_timed": len(timed),
        "torch_threads": torch.get_num_threads(),
        "allocator": args.allocator,
        "images_per_second": rounded(batch * len(timed) / sum(timed), 1),
    }
