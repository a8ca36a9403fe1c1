import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score

from dermsight.data.schema import CLASSES
from dermsight.evaluation.metrics import (
    binary_summary,
    bootstrap_ci,
    expected_calibration_error,
    multiclass_summary,
    official_scores,
    partial_auc,
    reliability_curve,
    sensitivity_specificity,
    subgroup_table,
)

# Eight cases, sorted by score: P P P N P N N N.
# AUC: positives .9/.8/.7 beat all 4 negatives (12 pairs), .4 beats .3/.2/.1 (3) -> 15/16.
# ROC points: (0,.25) (0,.5) (0,.75) (.25,.75) (.25,1) ... (1,1); above TPR .8 the curve sits at
# FPR .25, so the ISIC 2024 pAUC is the strip .2 high and 1 - .25 wide: .15.
Y8 = np.array([1, 1, 1, 0, 1, 0, 0, 0])
S8 = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])


def realistic_multiclass(n=200, seed=0, signal=2.0):
    """Seeded 8-class predictions with ISIC-like prevalence; every class appears."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.18, 0.50, 0.12, 0.04, 0.10, 0.02, 0.02, 0.02])
    y = np.concatenate([np.arange(len(CLASSES)), rng.choice(len(CLASSES), n - len(CLASSES), p=prevalence)])
    logits = rng.normal(size=(n, len(CLASSES))) + signal * np.eye(len(CLASSES))[y] + np.log(prevalence)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    truth = pd.DataFrame(np.eye(len(CLASSES))[y], index=ids, columns=list(CLASSES))
    return y, truth, pd.DataFrame(probs, index=ids, columns=list(CLASSES))


def area_above_sensitivity(y_true, score, min_tpr: float = 0.80) -> float:
    """The ISIC 2019 package's auc_sens_80, by hand: the area under the ROC curve (TPR over FPR) from
    where sensitivity first reaches `min_tpr` to FPR 1, for untied scores. Each negative, taken in
    descending score order, adds a strip 1/N wide at the TPR reached so far; the strips at or above
    `min_tpr` are the area."""
    y = np.asarray(y_true, bool)[np.argsort(-np.asarray(score))]
    tpr_at_negatives = (np.cumsum(y) / y.sum())[~y]
    return float(tpr_at_negatives[tpr_at_negatives >= min_tpr].sum() / (~y).sum())


def test_area_above_sensitivity_by_hand():
    # Y8's ROC reaches TPR .8 at FPR .25 and stays at 1 from there: .75 wide, 1 high.
    assert area_above_sensitivity(Y8, S8) == pytest.approx(0.75)
    assert area_above_sensitivity(Y8, S8, min_tpr=0.0) == pytest.approx(15 / 16)  # the whole AUC


def test_sensitivity_specificity_by_hand():
    # >= .5 calls .9 .8 .7 .6 positive: TP 3, FP 1 (.6), TN 3, FN 1 (.4).
    assert sensitivity_specificity(Y8, S8, 0.5) == {
        "sensitivity": 0.75, "specificity": 0.75, "ppv": 0.75, "npv": 0.75, "tp": 3, "fp": 1, "tn": 3, "fn": 1
    }
    # >= .4 also calls .4: TP 4, FP 1, TN 3, FN 0; the threshold itself counts as positive.
    result = sensitivity_specificity(Y8, S8, 0.4)
    assert (result["sensitivity"], result["specificity"], result["ppv"], result["npv"]) == (1.0, 0.75, 0.8, 1.0)


def test_sensitivity_undefined_without_positives():
    result = sensitivity_specificity([0, 0, 0], [0.1, 0.6, 0.7], 0.5)
    assert math.isnan(result["sensitivity"]) and result["specificity"] == pytest.approx(1 / 3)
    assert (result["ppv"], result["npv"], result["fp"], result["tn"]) == (0.0, 1.0, 2, 1)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0/1"):
        sensitivity_specificity([0, 2, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        sensitivity_specificity([0, 1], [0.1, np.nan], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        partial_auc([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="both positives and negatives"):
        partial_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_partial_auc_by_hand():
    assert partial_auc(Y8, S8) == pytest.approx(0.15)
    # Tie straddling TPR .8: positives .9 .8 .7 then {.5 .5 positive, .5 negative} tied.
    # The ROC goes (0,.6) -> (.2,1) diagonally: FPR .1 at TPR .8, .2 at TPR 1, so the strip is a
    # trapezoid .2 high with widths .9 and .8: .2 * .85 = .17.
    y = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert partial_auc(y, s) == pytest.approx(0.17)


def test_partial_auc_extremes():
    y = [0, 0, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.8, 0.9]
    assert partial_auc(y, s) == pytest.approx(0.2)
    assert partial_auc(y, s[::-1]) == pytest.approx(0.0, abs=1e-12)
    # min_tpr 0 is the whole AUC.
    assert partial_auc(Y8, S8, min_tpr=0.0) == pytest.approx(15 / 16)


def test_expected_calibration_error_by_hand():
    prob = [0.05, 0.15, 0.15, 0.62, 0.68, 0.95, 0.95, 0.95]
    y = [0, 0, 1, 1, 0, 1, 1, 0]
    # bin 0: conf .05, observed 0    -> gap .05  x1
    # bin 1: conf .15, observed .5   -> gap .35  x2
    # bin 6: conf .65, observed .5   -> gap .15  x2
    # bin 9: conf .95, observed 2/3  -> gap .2833 x3
    # ECE = (.05 + .70 + .30 + .85) / 8 = .2375
    assert expected_calibration_error(y, prob) == pytest.approx(0.2375)
    curve = reliability_curve(y, prob)
    assert curve["count"].tolist() == [1, 2, 0, 0, 0, 0, 2, 0, 0, 3]
    assert curve["bin_centre"].tolist() == pytest.approx([0.05 + 0.1 * i for i in range(10)])
    assert curve.loc[6, "mean_predicted"] == pytest.approx(0.65) and curve.loc[9, "observed"] == pytest.approx(2 / 3)
    assert curve.loc[[2, 3, 4, 5, 7, 8], ["mean_predicted", "observed"]].isna().all().all()


def test_top_label_ece_by_hand():
    prob = [[0.72, 0.2, 0.08], [0.64, 0.3, 0.06], [0.2, 0.76, 0.04], [0.1, 0.06, 0.84]]
    y = [0, 1, 1, 2]
    # bin 7: .72, .76 both right -> |1 - .74| x2; bin 6: .64 wrong -> .64; bin 8: .84 right -> .16
    # ECE = (.52 + .64 + .16) / 4 = .33
    assert expected_calibration_error(y, prob) == pytest.approx(0.33)


def test_ece_of_calibrated_probabilities_is_small():
    rng = np.random.default_rng(1)
    prob = rng.random(20000)
    y = (rng.random(20000) < prob).astype(int)
    assert expected_calibration_error(y, prob) < 0.02
    assert expected_calibration_error(y, prob**3) > 0.1


def test_bootstrap_ci_contains_point_estimate_and_is_reproducible():
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.3).astype(int)
    s = rng.normal(size=200) + y
    low, high = bootstrap_ci(roc_auc_score, y, s, n_boot=300)
    assert low < roc_auc_score(y, s) < high
    assert 0.0 < high - low < 0.4
    assert bootstrap_ci(roc_auc_score, y, s, n_boot=300) == (low, high)


def test_cluster_bootstrap_is_wider_on_clustered_data():
    # 40 patients x 10 near-identical images: rows are far from independent.
    rng = np.random.default_rng(3)
    patient_label = (rng.random(40) < 0.4).astype(int)
    patient_score = rng.normal(size=40) + patient_label
    patients = np.repeat(np.arange(40), 10)
    y = patient_label[patients]
    s = patient_score[patients] + rng.normal(scale=0.01, size=400)
    rows = bootstrap_ci(roc_auc_score, y, s, n_boot=300)
    clustered = bootstrap_ci(roc_auc_score, y, s, n_boot=300, groups=[f"P{p}" for p in patients])
    assert clustered[1] - clustered[0] > 1.5 * (rows[1] - rows[0])
    assert clustered[0] <= roc_auc_score(y, s) <= clustered[1]


def test_bootstrap_skips_single_class_resamples():
    # One positive among 20: about a third of resamples miss it; the metric would raise on those.
    y = np.array([1] + [0] * 19)
    s = np.linspace(1, 0, 20)
    low, high = bootstrap_ci(roc_auc_score, y, s, n_boot=200)
    assert low == high == 1.0


def test_binary_summary():
    summary = binary_summary(Y8, S8, threshold=0.5, n_boot=200)
    json.dumps(summary, allow_nan=False)
    assert summary["auc"]["value"] == pytest.approx(15 / 16)
    assert summary["pauc_80"]["value"] == pytest.approx(0.15)
    assert summary["sensitivity"]["value"] == 0.75 and summary["specificity"]["value"] == 0.75
    assert (summary["tp"], summary["fp"], summary["tn"], summary["fn"]) == (3, 1, 3, 1)
    assert summary["n"] == 8 and summary["positives"] == 4
    assert summary["ece"] == pytest.approx(expected_calibration_error(Y8, S8))
    for name in ("auc", "pauc_80", "average_precision", "sensitivity", "specificity"):
        assert summary[name]["ci_low"] <= summary[name]["ci_high"]
    grouped = binary_summary(Y8, S8, threshold=0.5, groups=[1, 1, 2, 2, 3, 3, 4, 4], n_boot=200)
    assert grouped["cluster_bootstrap"] and grouped["auc"]["value"] == summary["auc"]["value"]


def test_official_scores_agree_with_sklearn():
    y, truth, probs = realistic_multiclass()
    result = official_scores(truth, probs.sample(frac=1.0, random_state=0))  # row order must not matter
    json.dumps(result, allow_nan=False)
    assert result["skipped_classes"] == [] and result["classes"] == list(CLASSES)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.to_numpy().argmax(axis=1)))
    for j, code in enumerate(CLASSES):
        scores = result["per_class"][code]
        assert scores["auc"] == pytest.approx(roc_auc_score(y == j, probs[code]))
        assert scores["auc_sens_80"] == pytest.approx(area_above_sensitivity(y == j, probs[code].to_numpy()))
        assert scores["sensitivity"] == pytest.approx(np.mean(probs[code].to_numpy()[y == j] > 0.5))
    assert result["macro_average"]["auc"] == pytest.approx(np.mean([result["per_class"][c]["auc"] for c in CLASSES]))


def test_official_scores_skip_classes_without_positives():
    y, truth, probs = realistic_multiclass()
    scc, nv = list(CLASSES).index("SCC"), list(CLASSES).index("NV")
    # The SCC images become NV with SCC still predicted first and NV second: errors that dropping the
    # SCC column from the balanced accuracy would turn into hits.
    probs.loc[y == scc] = 0.02
    probs.loc[y == scc, ["SCC", "NV"]] = [0.54, 0.34]
    y = np.where(y == scc, nv, y)
    truth = pd.DataFrame(np.eye(len(CLASSES), dtype=int)[y], index=truth.index, columns=truth.columns)  # ints are fine
    result = official_scores(truth, probs)
    assert result["skipped_classes"] == ["SCC"] and "SCC" not in result["per_class"]
    assert all(math.isfinite(s["auc_sens_80"]) for s in result["per_class"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that SCC is predicted but never true
        expected = balanced_accuracy_score(y, probs.to_numpy().argmax(axis=1))
    assert result["balanced_accuracy"] == pytest.approx(expected)


def test_official_scores_refuse_mismatched_frames():
    _, truth, probs = realistic_multiclass(n=20)
    with pytest.raises(ValueError, match="miss 1 images"):
        official_scores(truth, probs.iloc[1:])
    with pytest.raises(ValueError, match="class columns"):
        official_scores(truth, probs.drop(columns="DF"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        official_scores(truth, probs * 2)


def test_multiclass_summary():
    y, _, probs = realistic_multiclass()
    labels = np.array(CLASSES)[y]
    predicted = probs.to_numpy().argmax(axis=1)
    summary = multiclass_summary(labels, probs[list(reversed(CLASSES))], CLASSES)  # frame columns are reordered
    json.dumps(summary, allow_nan=False)
    assert summary["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert summary["confusion_matrix"] == confusion_matrix(y, predicted, labels=range(8)).tolist()
    recalls = recall_score(y, predicted, average=None, labels=range(8))
    for j, code in enumerate(CLASSES):
        assert summary["per_class"][code]["recall"] == pytest.approx(recalls[j])
        assert summary["per_class"][code]["auc"] == pytest.approx(roc_auc_score(y == j, probs[code]))


def test_multiclass_summary_by_hand():
    # true MEL MEL NV NV NV; predicted MEL NV NV NV MEL
    probs = np.array([[0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.1, 0.9, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0]])
    summary = multiclass_summary(["MEL", "MEL", "NV", "NV", "NV"], probs, ["MEL", "NV", "BCC"])
    assert summary["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert summary["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # BCC absent: not averaged
    assert summary["per_class"]["MEL"]["precision"] == 0.5 and summary["per_class"]["BCC"]["recall"] is None
    # MEL scores: positives .8 .4, negatives .1 .3 .6 -> .8 beats 3, .4 beats 2: 5/6.
    assert summary["per_class"]["MEL"]["auc"] == pytest.approx(5 / 6) and summary["per_class"]["BCC"]["auc"] is None
    with pytest.raises(ValueError, match="UNK"):
        multiclass_summary(["MEL", "UNK", "NV", "NV", "NV"], probs, ["MEL", "NV", "BCC"])


def test_subgroup_table():
    rng = np.random.default_rng(4)
    sex = np.array(["male"] * 60 + ["female"] * 12 + [None] * 8, dtype=object)
    y = np.array([1] * 10 + [0] * 50 + [1] * 2 + [0] * 10 + [0] * 8)
    frame = pd.DataFrame({"p": rng.random(80) * 0.5 + 0.5 * y, "mel": y, "sex": sex}, index=rng.permutation(80) + 1000)
    table = subgroup_table(frame, "p", "mel", ["sex"], threshold=0.5).set_index("value")
    assert table["variable"].tolist() == ["all", "sex", "sex", "sex"] and table.index[0] == "all"
    assert table.loc["all", ["n", "positives"]].tolist() == [80, 12]
    assert table.loc["male", ["n", "positives", "too_small"]].tolist() == [60, 10, False]
    assert table.loc["female", ["n", "positives", "too_small"]].tolist() == [12, 2, True]
    missing = table.loc[table.index.isna()].iloc[0]
    assert missing["n"] == 8 and math.isnan(missing["auc"]) and math.isnan(missing["sensitivity"])
    male = frame[frame["sex"] == "male"]
    assert table.loc["male", "auc"] == pytest.approx(roc_auc_score(male["mel"], male["p"]))
    expected = sensitivity_specificity(male["mel"], male["p"], 0.5)
    assert table.loc["male", "specificity"] == pytest.approx(expected["specificity"])
