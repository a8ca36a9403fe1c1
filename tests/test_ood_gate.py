"""The out-of-distribution gate: fitted honestly, saved faithfully, and on the real
default bundle refusing real non-skin photos while accepting unseen dermoscopy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermsight.evaluation.ood_images import non_dermoscopic_images
from dermsight.inference.inputs import records_from_inputs
from dermsight.inference.ood import OOD_FILE, OODGate, fit_ood_gate
from dermsight.inference.predictor import Predictor


def test_held_out_threshold_refuses_about_the_chosen_share(tmp_path):
    rng = np.random.default_rng(0)
    mixing = [rng.standard_normal((8, 20)), rng.standard_normal((8, 30))]

    def sample(n: int, spread: float = 1.0) -> np.ndarray:
        return np.hstack([spread * rng.standard_normal((n, 8)) @ m + 0.3 * rng.standard_normal((n, m.shape[1])) for m in mixing])

    gate = fit_ood_gate(sample(3000), (20, 30), folds=np.arange(3000) % 5, n_components=8, quantile=0.98)
    fresh = gate.accepts(sample(5000))
    assert 0.96 < fresh.mean() < 0.995
    assert not gate.accepts(sample(200, spread=4.0)).any()

    gate.save(tmp_path)
    loaded = OODGate.load(tmp_path)
    probe = sample(50)
    np.testing.assert_allclose(loaded.score(probe), gate.score(probe), rtol=1e-4)
    assert loaded.block_sizes == (20, 30) and loaded.threshold == pytest.approx(gate.threshold)


def test_a_gate_of_the_old_format_is_refused_with_a_reason(tmp_path):
    np.savez(tmp_path / OOD_FILE, mean=np.zeros(3), components=np.eye(3), precision=np.eye(3), threshold=1.0)
    with pytest.raises(ValueError, match="retrain"):
        OODGate.load(tmp_path)


@pytest.fixture(scope="module")
def default_predictor(trained_bundle) -> Predictor:
    return Predictor(trained_bundle)


def test_real_non_skin_photos_are_refused(default_predictor):
    images = non_dermoscopic_images()
    categories = {category for category, _, _ in images}
    assert {"scikit-image", "scikit-learn", "matplotlib", "face (LFW)", "document", "blank frame"} <= categories
    _, scores, _ = default_predictor.predict_images([data for _, _, data in images], pd.DataFrame({"age": [None] * len(images)}))
    accepted = [f"{category}: {name}" for (category, name, _), ok in zip(images, scores.looks_dermoscopic) if ok]
    assert len(accepted) <= 0.03 * len(images), accepted
    named = {name: ok for (_, name, _), ok in zip(images, scores.looks_dermoscopic)}
    # The default ensemble's gate lets 5 of the 241 through (camera, ihc, moon, retina, china: README, Results)
    assert not any(named[name] for name in ("astronaut.png", "coffee.png", "page.png", "text.png"))
    assert not any(ok for (category, _, _), ok in zip(images, scores.looks_dermoscopic) if category in ("document", "blank frame"))


def test_unseen_dermoscopy_is_accepted(default_predictor, shared):
    records, _ = records_from_inputs([str(shared / "isic2020" / "test_128")])
    table, errors = default_predictor.predict_records(records.sample(300, random_state=1), progress=False)
    assert not errors and len(table) == 300
    assert table["looks_dermoscopic"].mean() >= 0.95
