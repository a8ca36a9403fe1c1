import json

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from dermsight.evaluation.calibration import (
    MIN_SOURCE_MELANOMAS,
    IsotonicCalibrator,
    TemperatureScaler,
    choose_threshold,
    choose_threshold_every_source,
)
from dermsight.evaluation.metrics import expected_calibration_error, sensitivity_specificity


def logits_with_temperature(temperature, n=5000, classes=8, seed=0):
    """Labels drawn from softmax(z); the model reports z * temperature (over-confident when > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, classes)) + 2.0 * np.eye(classes)[rng.integers(0, classes, n)]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)
    return z * temperature, y


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_scaler_recovers_known_temperature(temperature):
    logits, y = logits_with_temperature(temperature)
    fitted = TemperatureScaler().fit(logits, y).temperature_
    assert fitted == pytest.approx(temperature, rel=0.05)

    def nll(t):
        scaled = logits / t
        log_norm = np.log(np.exp(scaled - scaled.max(axis=1, keepdims=True)).sum(axis=1)) + scaled.max(axis=1)
        return np.mean(log_norm - scaled[np.arange(len(y)), y])

    assert nll(fitted) < min(nll(fitted * 1.01), nll(fitted / 1.01))  # the fit is the NLL minimum


def test_temperature_scaling_improves_calibration_and_round_trips():
    logits, y = logits_with_temperature(3.0, seed=1)
    scaler = TemperatureScaler().fit(logits, y)
    probs = scaler.transform(logits)
    assert probs.shape == logits.shape and np.allclose(probs.sum(axis=1), 1.0)
    raw = np.exp(logits - logits.max(axis=1, keepdims=True))
    raw /= raw.sum(axis=1, keepdims=True)
    assert expected_calibration_error(y, probs) < expected_calibration_error(y, raw) / 2
    loaded = TemperatureScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert loaded.temperature_ == scaler.temperature_
    assert np.array_equal(loaded.transform(logits), probs)


def test_temperature_scaler_refuses_bad_input():
    with pytest.raises(NotFittedError):
        TemperatureScaler().transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class index"):
        TemperatureScaler().fit(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaler.from_dict({"kind": "temperature", "temperature": -1.0})


def test_isotonic_round_trip_is_identical():
    rng = np.random.default_rng(5)
    score = rng.normal(size=500)
    y = (rng.random(500) < 1 / (1 + np.exp(-2 * score))).astype(int)
    calibrator = IsotonicCalibrator().fit(score, y)
    new = np.concatenate([rng.normal(scale=2, size=300), [-10.0, 10.0], score[:5]])
    out = calibrator.transform(new)
    loaded = IsotonicCalibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert np.array_equal(loaded.transform(new), out)
    # Same as sklearn's own prediction, monotone, clipped to the end values outside the fitted range.
    reference = IsotonicRegression(out_of_bounds="clip").fit(score, y).predict(new)
    assert np.allclose(out, reference)
    order = np.argsort(new)
    assert (np.diff(out[order]) >= 0).all() and out.min() >= 0 and out.max() <= 1
    assert out[-7] == calibrator.y_thresholds_[0] and out[-6] == calibrator.y_thresholds_[-1]


def test_isotonic_by_hand():
    # Pool-adjacent-violators on y = 0 1 0 1 sorted by score: (1, 0) pool to .5 -> 0 .5 .5 1.
    calibrator = IsotonicCalibrator().fit([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1])
    assert calibrator.transform([1.0, 2.5, 3.5, 4.0]).tolist() == [0.0, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="isotonic"):
        IsotonicCalibrator.from_dict({"kind": "isotonic", "x": [2.0, 1.0], "y": [0.0, 1.0]})


def test_choose_threshold_by_hand_with_ties():
    # positives .9 .8 .8 .7 .3; negatives .85 .5 .2 .1
    y = [1, 1, 1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.8, 0.7, 0.3, 0.85, 0.5, 0.2, 0.1]
    # >= .8 catches 3/5 = .6; >= .9 only 1/5. Both .8 ties count, so .8 serves targets .41 to .6.
    for target in (0.5, 0.6):
        result = choose_threshold(y, s, target)
        assert (result["threshold"], result["sensitivity"], result["specificity"]) == (0.8, 0.6, 0.75)
    # .7 needs 4/5: threshold .7 (sensitivity .8); .9 needs 5/5: the lowest positive, .3.
    assert choose_threshold(y, s, 0.7)["threshold"] == 0.7
    result = choose_threshold(y, s, 0.9)
    assert (result["threshold"], result["sensitivity"], result["specificity"]) == (0.3, 1.0, 0.5)
    assert choose_threshold(y, s, 0.2)["threshold"] == 0.9


def test_choose_threshold_is_highest_reaching_target():
    rng = np.random.default_rng(6)
    y = (rng.random(300) < 0.2).astype(int)
    s = np.round(rng.normal(size=300) + 1.5 * y, 1)  # rounding makes ties
    for target in (0.8, 0.9, 0.95, 1.0):
        result = choose_threshold(y, s, target)
        assert result["sensitivity"] >= target
        assert result["sensitivity"] == sensitivity_specificity(y, s, result["threshold"])["sensitivity"]
        higher = np.unique(s[s > result["threshold"]])
        assert all(sensitivity_specificity(y, s, t)["sensitivity"] < target for t in higher)
        assert sensitivity_specificity(y, s, np.nextafter(result["threshold"], np.inf))["sensitivity"] < target


def test_choose_threshold_refuses_no_positives_and_bad_targets():
    with pytest.raises(ValueError, match="at least one positive"):
        choose_threshold([0, 0, 0], [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold([0, 1], [0.1, 0.9], 0.0)


def test_threshold_every_source_never_rises_above_the_pooled_one():
    """A source with 40 melanomas scored 0.60-0.99 sets a threshold of its own (0.64 catches 36);
    one with 10 melanomas scored 0.10-0.19 is too small to (MIN_SOURCE_MELANOMAS), but its
    melanomas count in the pool: 45 of the 50 are caught only from 0.15 down. The rule takes the
    lowest of the pooled and per-source thresholds, so 0.15, where pooled sensitivity is the
    target; the per-source threshold alone (0.64) would catch 40 of 50."""
    big = np.round(0.60 + 0.01 * np.arange(40), 2)
    small = np.round(0.10 + 0.01 * np.arange(10), 2)
    negatives = np.round(np.linspace(0.0, 0.7, 60), 3)
    score = np.concatenate([big, small, negatives])
    y = np.r_[np.ones(50, int), np.zeros(60, int)]
    sources = ["big"] * 40 + ["small"] * 10 + ["big", "small"] * 30
    assert MIN_SOURCE_MELANOMAS == 20
    result = choose_threshold_every_source(y, score, sources, 0.9)
    assert result["per_source"] == {"big": 0.64}
    assert choose_threshold(y, score, 0.9)["threshold"] == result["threshold"] == 0.15
    assert result["sensitivity"] == 0.9 == sensitivity_specificity(y, score, 0.15)["sensitivity"]
    assert result["specificity"] == sensitivity_specificity(y, score, 0.15)["specificity"]


def test_threshold_every_source_at_another_target_and_at_the_melanoma_minimum():
    """Target 0.80 on the same scores: "big" alone needs 0.68 (32 of 40), the pool 0.60 (40 of 50).
    A source with exactly MIN_SOURCE_MELANOMAS melanomas sets a threshold of its own."""
    big = np.round(0.60 + 0.01 * np.arange(40), 2)
    small = np.round(0.10 + 0.01 * np.arange(10), 2)
    score = np.concatenate([big, small, np.linspace(0.0, 0.7, 60)])
    y = np.r_[np.ones(50, int), np.zeros(60, int)]
    sources = ["big"] * 40 + ["small"] * 10 + ["big", "small"] * 30
    result = choose_threshold_every_source(y, score, sources, 0.8)
    assert set(result) == {"threshold", "target_sensitivity", "sensitivity", "specificity", "ppv", "npv", "tp", "fp",
                           "tn", "fn", "rule", "per_source"}
    assert (result["threshold"], result["target_sensitivity"], result["per_source"]) == (0.6, 0.8, {"big": 0.68})
    assert result["rule"] == "the lowest of the pooled and each source's threshold for the target sensitivity"
    twenty = np.r_[np.ones(MIN_SOURCE_MELANOMAS, int), np.zeros(5, int)]
    both = choose_threshold_every_source(np.r_[y, twenty], np.r_[score, np.linspace(0.3, 0.5, 25)],
                                         sources + ["clinic"] * 25, 0.8)
    assert set(both["per_source"]) == {"big", "clinic"}
