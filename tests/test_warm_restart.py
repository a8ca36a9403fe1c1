"""Finetune's learning-rate schedule and its warm restart: a finished run extended with
`--restart-epochs` (resuming its checkpoint) ends where a fresh run of the whole schedule
ends, on real HAM10000 images."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dermsight.imaging.preprocess import Preprocessing
from dermsight.models.metadata import encode_metadata
from dermsight.training.config import TrainConfig
from dermsight.training.finetune import RESTART_PEAK, decode_all, train_one_model, warmup_cosine

CLASSES = ["MEL", "NV"]


def learning_rates(total_steps: int, restart_steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps, 0.1, restart_steps)
    rates = []
    for _ in range(total_steps + restart_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_restart_leaves_the_first_cycle_alone_then_climbs_back_and_decays():
    plain, restarted = learning_rates(100, 0), learning_rates(100, 40)
    assert restarted[:100] == plain  # so a finished run's checkpoint is a valid start for the longer one
    assert max(plain) == pytest.approx(1.0) and plain[-1] < 0.01
    second = restarted[100:]
    assert second[0] == pytest.approx(RESTART_PEAK) and second[-1] < 0.01 * RESTART_PEAK
    assert all(a >= b for a, b in zip(second, second[1:]))


@pytest.fixture(scope="module")
def tiny_set(ham):
    table = ham.records
    records = pd.concat([table[table["diagnosis"] == code].head(12) for code in CLASSES]).reset_index(drop=True)
    squares, ok = decode_all(records, Preprocessing(size=32), progress=False)
    assert ok.all()
    return squares, encode_metadata(records), records["diagnosis"].map(CLASSES.index).to_numpy()


def train(tiny_set, tmp_path, name: str, epochs: int, restart_epochs: int, validation: bool = False):
    squares, metadata, labels = tiny_set
    config = TrainConfig(
        sources=[], image_size=32, epochs=epochs, restart_epochs=restart_epochs, batch_size=8, patience=1,
        views=("identity",), progress=False,
    )
    held_out = (squares[::3], metadata[::3], labels[::3]) if validation else None
    net, best_epoch = train_one_model(squares, metadata, labels, CLASSES, config, tmp_path / name, held_out)
    state = torch.load(tmp_path / name, weights_only=False)
    return net, best_epoch, state


def test_extending_a_finished_run_with_a_restart_equals_training_it_in_one_go(tiny_set, tmp_path):
    train(tiny_set, tmp_path, "extended.pt", epochs=2, restart_epochs=0)
    extended, _, extended_state = train(tiny_set, tmp_path, "extended.pt", epochs=2, restart_epochs=1)
    fresh, _, fresh_state = train(tiny_set, tmp_path, "fresh.pt", epochs=2, restart_epochs=1)
    assert extended_state["epoch"] == fresh_state["epoch"] == 3
    for key, value in fresh.state_dict().items():
        assert torch.allclose(extended.state_dict()[key].float(), value.float(), atol=1e-5), key


@pytest.mark.parametrize(
    ("epochs", "restart_epochs", "scores", "trained", "best"),
    [
        (3, 2, [0.5, 0.6, 0.55, 0.3, 0.4], 5, 2),  # the restart dips and runs to its end all the same
        (3, 2, [0.5, 0.6, 0.55, 0.3, 0.7], 5, 5),  # ... and its last epoch can be the best
        (4, 2, [0.5, 0.4, 0.9, 0.9, 0.9, 0.9], 2, 1),  # the first cycle stops early: no restart
    ],
)
def test_early_stopping_spares_the_restart_and_a_stopped_run_stays_stopped(
    tiny_set, tmp_path, monkeypatch, epochs, restart_epochs, scores, trained, best
):
    """patience=1 on a scripted sequence of held-out scores; rerunning a finished run trains nothing more."""
    from dermsight.training import finetune

    sequence = iter(scores)
    monkeypatch.setattr(finetune, "balanced_accuracy", lambda *args: next(sequence))
    _, best_epoch, state = train(tiny_set, tmp_path, "run.pt", epochs, restart_epochs, validation=True)
    assert (state["epoch"], best_epoch) == (trained, best)
    _, again, state = train(tiny_set, tmp_path, "run.pt", epochs, restart_epochs, validation=True)
    assert (state["epoch"], again) == (trained, best)

def test_the_same_seed_trains_the_same_network(tiny_set, tmp_path):
    """Augmentation included: albumentations has its own random generator."""
    first, _, _ = train(tiny_set, tmp_path, "first.pt", epochs=1, restart_epochs=0)
    second, _, _ = train(tiny_set, tmp_path, "second.pt", epochs=1, restart_epochs=0)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key
