"""Interruption-safe finetune training on real HAM10000 images: a real SIGTERM mid-epoch
checkpoints and stops; a crash keeps the last timed checkpoint; either way the resumed run
ends with exactly the weights of an uninterrupted run (augmentations, metadata dropout and
a noisy loss standing in for dropout all drawing from restored states)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermsight.imaging.preprocess import Preprocessing
from dermsight.models.metadata import encode_metadata
from dermsight.training import finetune
from dermsight.training.config import TrainConfig
from dermsight.training.resumable import RecipeMismatch, RunLog, TrainingInterrupted

CLASSES = ["MEL", "NV"]
STEPS_PER_EPOCH = 3  # 24 images, batches of 8


@pytest.fixture(scope="module")
def tiny_set(ham):
    table = ham.records
    records = pd.concat([table[table["diagnosis"] == code].head(12) for code in CLASSES]).reset_index(drop=True)
    squares, ok = finetune.decode_all(records, Preprocessing(size=32), progress=False)
    assert ok.all()
    return squares, encode_metadata(records), records["diagnosis"].map(CLASSES.index).to_numpy()


def config(**overrides) -> TrainConfig:
    """Every random lever on: augmentation with acquisition changes, metadata dropout."""
    settings = dict(
        sources=[], image_size=32, epochs=2, batch_size=8, patience=0, views=("identity",), progress=False,
        acquisition_augmentation=True, metadata_dropout=0.5, checkpoint_minutes=0.0,
    )
    return TrainConfig(**{**settings, **overrides})


def train(tiny_set, checkpoint, settings: TrainConfig, step: int = 0, action=None, **options):
    """`train_one_model` with a loss that draws noise from torch's global generator (as dropout
    would: the network has none), and runs `action` inside the `step`-th optimizer step
    (1-based, over all epochs); `options` go to `train_one_model`."""
    real, calls = finetune.make_loss, itertools.count(1)

    def make_loss(*args):
        criterion = real(*args)

        def loss(logits, target):
            if next(calls) == step:
                action()
            return criterion(logits + 0.5 * torch.randn_like(logits), target)

        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "make_loss", make_loss)
        net, _ = finetune.train_one_model(*tiny_set, CLASSES, settings, checkpoint, **options)
    return net.state_dict()


def assert_same_weights(resumed: dict, uninterrupted: dict) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


@pytest.fixture(scope="module")
def uninterrupted(tiny_set, tmp_path_factory):
    return train(tiny_set, tmp_path_factory.mktemp("plain") / "net.pt", config())


def test_sigterm_mid_epoch_checkpoints_stops_and_resumes_to_the_same_weights(tiny_set, tmp_path, uninterrupted):
    checkpoint = tmp_path / "net.pt"
    handler_before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier test in this worker set (Ray's)
    with pytest.raises(TrainingInterrupted) as stopped:  # a real SIGTERM in epoch 2, step 2
        train(tiny_set, checkpoint, config(), STEPS_PER_EPOCH + 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert stopped.value.exit_code == 128 + signal.SIGTERM and stopped.value.signal_name == "SIGTERM"
    state = torch.load(checkpoint, weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 2)  # mid-epoch: the step under way finished, then it stopped
    assert sorted(state["order"].tolist()) == list(range(24)) and state["augmentation"] is not None
    assert not checkpoint.with_suffix(".tmp").exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored after training
    assert_same_weights(train(tiny_set, checkpoint, config()), uninterrupted)


def test_a_crash_resumes_from_the_last_timed_checkpoint(tiny_set, tmp_path, uninterrupted):
    """checkpoint_minutes tiny: a checkpoint after every step; the process dies in step 2 of epoch 1."""

    def crash():
        raise MemoryError("killed")

    checkpoint = tmp_path / "net.pt"
    with pytest.raises(MemoryError):
        train(tiny_set, checkpoint, config(checkpoint_minutes=1e-9), 2, crash)
    state = torch.load(checkpoint, weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 1)
    assert_same_weights(train(tiny_set, checkpoint, config(checkpoint_minutes=1e-9)), uninterrupted)


SOURCES = np.array(["small" if i % 4 == 0 else "large" for i in range(24)], dtype=object)  # 6 and 18 images


def test_ema_and_source_sampling_resume_to_the_same_weights_and_change_them(tiny_set, tmp_path, uninterrupted):
    """The EMA weights and the source-weighted draws are part of the checkpoint: a SIGTERM in
    epoch 2 resumes to the uninterrupted run's weights, and those are not the plain run's."""
    levers = config(ema_decay=0.999, source_sampling=1.0)
    whole = train(tiny_set, tmp_path / "whole.pt", levers, sources=SOURCES)
    checkpoint = tmp_path / "net.pt"
    with pytest.raises(TrainingInterrupted):
        train(tiny_set, checkpoint, levers, STEPS_PER_EPOCH + 2, lambda: os.kill(os.getpid(), signal.SIGTERM), sources=SOURCES)
    assert torch.load(checkpoint, weights_only=False)["ema"] is not None
    assert_same_weights(train(tiny_set, checkpoint, levers, sources=SOURCES), whole)
    last = train(tiny_set, tmp_path / "last.pt", config(source_sampling=1.0), sources=SOURCES)
    assert not torch.equal(whole["head.weight"], last["head.weight"])  # the average is shipped, not the last step
    assert not torch.equal(last["head.weight"], uninterrupted["head.weight"])  # the draws changed


def test_source_sampling_draws_sources_by_the_power_of_their_size():
    sources = np.array(["large"] * 3000 + ["small"] * 300, dtype=object)
    for power, small_share in ((0.0, 300 / 3300), (0.5, 300**0.5 / (300**0.5 + 3000**0.5)), (1.0, 0.5)):
        draw = finetune.source_sampling_weights(sources, power)
        assert draw[sources == "small"].sum() == pytest.approx(small_share)
        order = finetune.epoch_order(None, len(sources), seed=0, epoch=0, draw=draw).numpy()
        assert len(order) == len(sources) and np.mean(sources[order] == "small") == pytest.approx(small_share, abs=0.03)
    assert np.array_equal(order, finetune.epoch_order(None, len(sources), seed=0, epoch=0, draw=draw).numpy())
    with pytest.raises(ValueError, match="torchrun"):
        finetune.train_one_model(
            np.zeros((24, 32, 32, 3), np.uint8), np.zeros((24, 12), np.float32), np.arange(24) % 2, CLASSES,
            config(source_sampling=1.0), Path("unused.pt"), sources=SOURCES, global_order=True,
        )


def test_run_log_counts_resumes_and_refuses_another_recipe(tmp_path):
    recipe = config().to_dict()
    RunLog(tmp_path, recipe, "dermsight train x").save(ended="stopped by SIGTERM")
    extended = {**recipe, "checkpoint_minutes": 1.0, "restart_epochs": 2}  # changes that keep the weights
    log = RunLog(tmp_path, extended, "dermsight train --resume y")
    log.save(ended="finished")
    assert log.resumes == 1 and log.data["command"] == "dermsight train x"
    assert [s["ended"] for s in log.data["sessions"]] == ["stopped by SIGTERM", "finished"]
    assert log.total_seconds == sum(s["seconds"] for s in log.data["sessions"])
    with pytest.raises(RecipeMismatch, match=r"epochs: 2 -> 3"):
        RunLog(tmp_path, {**recipe, "epochs": 3}, None)
    assert TrainConfig.from_dict(RunLog.load_recipe(tmp_path)) == TrainConfig.from_dict(extended)
    older = {k: v for k, v in recipe.items() if k != "ema_decay"}  # written before the option existed
    RunLog(tmp_path / "older", older, None).save()
    RunLog(tmp_path / "older", recipe, None, defaults=config().to_dict())  # read as the default: resumes
    with pytest.raises(RecipeMismatch, match=r"ema_decay: 0.0 -> 0.99"):
        RunLog(tmp_path / "older", {**recipe, "ema_decay": 0.99}, None, defaults=config().to_dict())


RUN = [  # a real `dermsight train` of about a minute: 300 HAM10000 images, 64 px, 2 epochs of 9 steps
    "--mode", "finetune", "--max-images", "300", "--image-size", "64", "--epochs", "2", "--batch-size", "16",
    "--folds", "2", "--validation-folds", "1", "--no-refit", "--patience", "0", "--views", "identity",
    "--checkpoint-minutes", "0.002",
]


def dermsight_train(shared, output, cache, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DERMSIGHT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("dermsight")), "train", *extra]
    if "--resume" not in extra:
        command += [str(shared / "ham10000"), *RUN, "--output", str(output)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=1800)
    return process.returncode, err


@pytest.mark.slow
def test_a_real_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(shared, tmp_path):
    """SIGTERM to a real `dermsight train` subprocess once its first timed checkpoint exists
    (mid-epoch), then the resume command it prints: the bundle's weights and the fold network's
    checkpoint equal an uninterrupted run's, and the bundle counts one resume."""
    plain = dermsight_train(shared, tmp_path / "plain", tmp_path / "cache-plain")
    code, err = finish(plain)
    assert code == 0, err[-3000:]
    killed = dermsight_train(shared, tmp_path / "killed", tmp_path / "cache")
    runs = tmp_path / "cache" / "runs"
    deadline = time.monotonic() + 1200
    while not list(runs.glob("killed-*/fold0.pt")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    killed.send_signal(signal.SIGTERM)
    code, err = finish(killed)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    run_dir = next(runs.glob("killed-*"))
    stopped = torch.load(run_dir / "fold0.pt", weights_only=False)
    assert stopped["step"] > 0, "the signal should land mid-epoch"
    assert f"dermsight train --resume {run_dir}" in err.splitlines()[-1]
    code, err = finish(dermsight_train(shared, None, tmp_path / "cache", "--resume", str(run_dir)))
    assert code == 0, err[-3000:]

    bundles = {name: json.loads((tmp_path / name / "bundle.json").read_text()) for name in ("plain", "killed")}
    assert (bundles["plain"]["training"]["resumes"], bundles["killed"]["training"]["resumes"]) == (0, 1)
    assert bundles["killed"]["training"]["run_dir"] == str(run_dir)
    log = json.loads((run_dir / "run.json").read_text())
    assert log["sessions"][0]["ended"].startswith("stopped by SIGTERM at epoch")
    print(f"\nstopped at epoch {stopped['epoch'] + 1}, step {stopped['step']}; sessions {log['sessions']}")
    assert_same_weights(torch.load(tmp_path / "killed" / "weights.pt"), torch.load(tmp_path / "plain" / "weights.pt"))
    plain_dir = next((tmp_path / "cache-plain" / "runs").glob("plain-*"))
    assert_same_weights(
        torch.load(run_dir / "fold0.pt", weights_only=False)["model"],
        torch.load(plain_dir / "fold0.pt", weights_only=False)["model"],
    )
