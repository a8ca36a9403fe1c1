"""A few steps of finetune training on real images, to check data-parallel training.

    torchrun --standalone --nproc_per_node 2 -m dermsight.training.ddp_check --out DIR
    python -m dermsight.training.ddp_check --out DIR        # the single-process reference

Both run `finetune.train_one_model` (the production loop: DDP over gloo on CPU, rank-0
checkpointing) on the same real HAM10000 images with augmentation off. Under torchrun each
rank saves its final weights as DIR/rank{R}.pt; alone, the process saves DIR/single.pt,
having drawn its batches in DistributedSampler order, so that its k-th batch holds exactly
the images of the ranks' k-th batches together (the same global batch size), and - unless
--emulate-ranks 1 - having batch-normalised each batch in the ranks' shares, as DDP does.

Each file holds {"parameters", "buffers", "initial" (the parameters before training),
"world_size", "rank", "batch_size" (per process), "micro_batches"}. What to expect: every
rank ends with the same parameters (DDP averages the gradients), and the single process with
--emulate-ranks 2 ends with those parameters up to float rounding. With --emulate-ranks 1 it
does not: batch normalisation in training mode normalises over the images it is given, so
16+16 images under DDP are not 32 in one process (at 64 px the gradients differ by more than
their own size). Batch-norm running statistics differ between ranks (each rank's last
batch; rank 0's are the ones checkpointed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from dermsight.data.readers import read_ham10000
from dermsight.imaging.preprocess import Preprocessing
from dermsight.models.metadata import METADATA_FEATURES, encode_metadata
from dermsight.models.network import DermSightNet
from dermsight.training.config import TrainConfig
from dermsight.training.finetune import decode_all, setup_distributed, train_one_model

CLASSES = ["MEL", "NV"]


def default_data() -> Path:
    return Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[4] / "shared" / "datasets"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the weights (rank{R}.pt or single.pt).")
    parser.add_argument("--data", type=Path, default=default_data(), help="The shared datasets folder.")
    parser.add_argument("--images", type=int, default=64, help="Real HAM10000 images: half melanoma, half nevus.")
    parser.add_argument("--size", type=int, default=64, help="Image size in pixels.")
    parser.add_argument("--global-batch", type=int, default=32, help="Images per step over all ranks.")
    parser.add_argument("--epochs", type=int, default=1, help="Passes over the images (steps = epochs * images / global batch).")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--emulate-ranks", type=int, default=2,
        help="Single process only: batch-normalise each batch in this many rank shares, as DDP does (1: the whole batch).",
    )
    args = parser.parse_args(argv)

    distributed = setup_distributed()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} ranks")
    records = real_images(args.data, args.images)
    prep = Preprocessing(size=args.size)
    squares, ok = decode_all(records, prep, progress=False)
    if not ok.all():
        raise SystemExit(f"{(~ok).sum()} of the chosen images cannot be read")
    metadata = encode_metadata(records)
    labels = records["diagnosis"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    config = TrainConfig(
        sources=[str(args.data / "ham10000")], output=args.out, image_size=args.size, seed=args.seed,
        batch_size=args.global_batch // world, epochs=args.epochs, learning_rate=args.learning_rate,
        class_weighting=False,  # a class-weighted mean over each rank's share is not the weighted mean over the batch
        progress=False,
    )
    torch.manual_seed(config.seed)  # the initial network train_one_model builds from the same seed
    initial = DermSightNet.create(config.backbone, len(METADATA_FEATURES), len(CLASSES))
    tag = f"rank{rank}" if distributed else "single"
    net, _ = train_one_model(
        squares, metadata, labels, CLASSES, config, args.out / f"checkpoint-{'ddp' if distributed else 'single'}.pt",
        augment=False, global_order=True, micro_batches=1 if distributed else args.emulate_ranks,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "parameters": {name: p.detach().clone() for name, p in net.named_parameters()},
            "buffers": {name: b.detach().clone() for name, b in net.named_buffers()},
            "initial": {name: p.detach().clone() for name, p in initial.named_parameters()},
            "world_size": world, "rank": rank, "batch_size": config.batch_size,
            "micro_batches": 1 if distributed else args.emulate_ranks,
        },
        args.out / f"{tag}.pt",
    )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def real_images(data: Path, n: int) -> pd.DataFrame:
    """The first n/2 melanomas and n/2 nevi of HAM10000 by image id: the same on every rank."""
    records = read_ham10000(data / "ham10000").records
    records = records[records["image_ref"].notna()].sort_values("image_id")
    chosen = [records[records["diagnosis"] == c].head(n // 2) for c in CLASSES]
    return pd.concat(chosen).sort_values("image_id").reset_index(drop=True)


if __name__ == "__main__":
    main()
