"""Evaluation on small real prediction sets: a bundle trained on 300 real images scores 18 real
HAM10000 images it never saw, and the metrics are checked against counts made by hand here;
bad input is accounted for row by row; the report is self-contained; the CLI exits cleanly."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from dermsight.cli import app
from dermsight.data.dataset import save_manifest
from dermsight.data.records import Loaded
from dermsight.data.schema import CLASSES
from dermsight.evaluation.evaluate import EvaluationError, evaluate_cv, evaluate_predictions
from dermsight.evaluation.joined_metrics import age_band
from dermsight.evaluation.report import write_report
from dermsight.inference.predictor import Predictor
from dermsight.training.config import TrainConfig
from dermsight.training.train import train

N_BOOT = 200


@pytest.fixture(scope="module")
def bundle(shared, tmp_path_factory):
    return train(
        TrainConfig(
            sources=[str(shared / "ham10000"), str(shared / "isic9" / "train")],
            output=tmp_path_factory.mktemp("bundles") / "eval",
            max_images=300,
            folds=3,
            views=("identity",),  # one test-time view: half the embedding time, same evaluation code paths
            cache_dir=tmp_path_factory.mktemp("cache"),
            progress=False,
        )
    )


@pytest.fixture(scope="module")
def held_out(ham, bundle) -> pd.DataFrame:
    """18 real HAM10000 records the bundle never trained on: 7 melanomas (two images of one
    lesion among them) and 11 images of four other classes."""
    seen = set(pd.read_csv(bundle.path / "out_of_fold.csv.gz", usecols=["image_id"])["image_id"])
    pool = ham.records[~ham.records["image_id"].isin(seen)].sort_values("image_id")
    melanomas = pool[pool["diagnosis"] == "MEL"]
    twin = melanomas["lesion_id"][melanomas["lesion_id"].duplicated()].iloc[0]
    parts = [melanomas[melanomas["lesion_id"] == twin], melanomas[melanomas["lesion_id"] != twin].head(5)]
    parts += [pool[pool["diagnosis"] == code].head(n) for code, n in (("NV", 5), ("BKL", 3), ("BCC", 2), ("DF", 1))]
    return pd.concat(parts).reset_index(drop=True).copy()


@pytest.fixture(scope="module")
def scored(bundle, held_out) -> pd.DataFrame:
    table, errors = Predictor(bundle.path).predict_records(held_out, progress=False)
    assert not errors and len(table) == len(held_out)
    return table


@pytest.fixture(scope="module")
def result(scored, held_out, bundle) -> dict:
    return evaluate_predictions(scored, held_out, bundle, n_boot=N_BOOT)


def truth_of(held_out: pd.DataFrame) -> dict[str, str]:
    return dict(zip(held_out["image_id"], held_out["diagnosis"]))


# ---------------------------------------------------------------------------------------------
# Metrics against hand counts


def test_operating_point_matches_hand_counts(result, scored, held_out, bundle):
    truth = truth_of(held_out)
    threshold = round(bundle.melanoma_threshold, 6)  # compared at the CSV's 6 decimals
    counts = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    for image, risk in zip(scored["image"], scored["melanoma_risk"]):
        flagged = round(float(risk), 6) >= threshold
        if truth[image] == "MEL":
            counts["tp" if flagged else "fn"] += 1
        else:
            counts["fp" if flagged else "tn"] += 1
    melanoma = result["melanoma"]
    assert {k: melanoma[k] for k in counts} == counts
    assert melanoma["n"] == 18 and melanoma["positives"] == 7
    assert melanoma["sensitivity"]["value"] == pytest.approx(counts["tp"] / 7)
    assert melanoma["specificity"]["value"] == pytest.approx(counts["tn"] / 11)
    low, high = melanoma["sensitivity"]["ci_low"], melanoma["sensitivity"]["ci_high"]
    assert low <= melanoma["sensitivity"]["value"] <= high
    check = result["threshold_check"]
    assert check["holds"] == (counts["tp"] / 7 >= bundle.threshold["target_sensitivity"])
    assert check["validation_sensitivity"] == bundle.threshold["sensitivity"]
    # the threshold that would reach the target here is the k-th highest melanoma risk
    mel_risks = sorted((round(r, 6) for i, r in zip(scored["image"], scored["melanoma_risk"]) if truth[i] == "MEL"), reverse=True)
    needed = int(np.ceil(bundle.threshold["target_sensitivity"] * 7))
    assert check["here"]["threshold"] == pytest.approx(mel_risks[needed - 1])


def test_auc_and_calibration_match_hand_computation(result, scored, held_out):
    truth = truth_of(held_out)
    risk = {i: round(float(r), 6) for i, r in zip(scored["image"], scored["melanoma_risk"])}
    mel = [risk[i] for i in risk if truth[i] == "MEL"]
    other = [risk[i] for i in risk if truth[i] != "MEL"]
    wins = sum(1.0 if m > o else 0.5 if m == o else 0.0 for m in mel for o in other)
    assert result["melanoma"]["auc"]["value"] == pytest.approx(wins / (len(mel) * len(other)))
    gaps = 0.0
    for b in range(10):
        members = [i for i in risk if min(int(risk[i] * 10), 9) == b]
        if members:
            observed = np.mean([truth[i] == "MEL" for i in members])
            gaps += len(members) * abs(observed - np.mean([risk[i] for i in members]))
    assert result["calibration"]["ece_melanoma"] == pytest.approx(gaps / 18)
    assert result["calibration"]["melanoma_rate"] == pytest.approx(7 / 18)


def test_official_balanced_accuracy_equals_sklearn_on_the_same_table(result, scored, held_out):
    truth = [truth_of(held_out)[i] for i in scored["image"]]
    predicted = np.asarray(CLASSES)[scored[list(CLASSES)].round(6).to_numpy().argmax(axis=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        expected = balanced_accuracy_score(truth, predicted)
    assert result["official"]["balanced_accuracy"] == pytest.approx(expected)
    assert result["multiclass"]["balanced_accuracy"] == pytest.approx(expected)
    per_class = result["multiclass"]["per_class"]
    for code in ("MEL", "NV", "BKL", "BCC", "DF"):
        support = sum(t == code for t in truth)
        hits = sum(t == code and p == code for t, p in zip(truth, predicted))
        assert per_class[code]["support"] == support
        assert per_class[code]["recall"] == pytest.approx(hits / support)
    assert sum(map(sum, result["multiclass"]["confusion_matrix"])) == 18


def test_subgroups_count_by_hand_and_flag_small_groups(scored, held_out, bundle, result):
    bands = [age_band(a) for a in held_out["age"]]
    table = pd.DataFrame(result["subgroups"]["rows"])
    ages = table[table["variable"] == "age_band"].set_index("value")
    for band in set(bands):
        assert ages.loc[band, "n"] == bands.count(band)
    sexes = table[table["variable"] == "sex"].set_index("value")
    for sex, n in held_out["sex"].fillna("unknown").value_counts().items():
        assert sexes.loc[sex, "n"] == n
    assert table["too_small"].all()  # 18 images: every group is under 30
    relaxed = evaluate_predictions(scored, held_out, bundle, n_boot=0, min_count=4, min_positives=2)
    for row in relaxed["subgroups"]["rows"]:
        assert row["too_small"] == (row["n"] < 4 or row["positives"] < 2), row
    assert age_band(29.9) == "<30" and age_band(30) == "30-50" and age_band(70) == ">=70" and age_band(np.nan) == "unknown"


def test_worst_false_negatives_are_the_lowest_risk_melanomas(result, scored, held_out, bundle):
    truth = truth_of(held_out)
    mel = scored[[truth[i] == "MEL" for i in scored["image"]]].sort_values("melanoma_risk")
    worst = result["worst_false_negatives"]
    assert [w["image"] for w in worst] == list(mel["image"])  # 7 melanomas, fewer than the 8 shown
    assert [w["missed"] for w in worst] == list(mel["melanoma_risk"].round(6) < round(bundle.melanoma_threshold, 6))
    assert all(w["image_ref"] for w in worst)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_rows_are_counted_with_reasons_never_silently_dropped(scored, held_out, bundle, result):
    bad = scored.copy()
    bad.loc[0, "NV"] = np.nan
    bad.loc[1, "BKL"] = 1.5
    bad["MEL"] = bad["MEL"].astype(object)
    bad.loc[2, "MEL"] = "abc"
    conflict = bad.iloc[[3]].assign(MEL=0.5)
    stranger = bad.iloc[[4]].assign(image="ISIC_9999999")
    no_id = bad.iloc[[4]].assign(image=None)
    bad = pd.concat([bad, bad.iloc[[5, 6]], conflict, stranger, no_id], ignore_index=True)
    truth = held_out.copy()
    truth.loc[7, "diagnosis"] = "XYZ"
    truth.loc[8, "diagnosis"] = None
    # an agreeing duplicate is merged; a disagreeing one leaves its image without a trustworthy label
    truth = pd.concat([truth, truth.iloc[[9]], truth.iloc[[10]].assign(diagnosis="VASC")], ignore_index=True)

    out = evaluate_predictions(bad, truth, bundle, n_boot=0)
    reasons = {r["reason"]: r["rows"] for r in out["ignored"]["reasons"]}
    assert reasons == {
        "missing_image_id": 1,
        "invalid_probability": 3,
        "duplicate_prediction": 2,
        "conflicting_predictions": 2,
        "no_truth": 1,
        "unknown_class": 1,
        "unlabelled": 1,
        "conflicting_truth": 1,
    }
    assert out["ignored"]["prediction_rows"] == len(bad) == 23
    assert out["ignored"]["rows"] == sum(reasons.values()) == 12
    assert out["data"]["images"] == len(bad) - 12 == 11
    invalid = next(r for r in out["ignored"]["reasons"] if r["reason"] == "invalid_probability")
    assert set(invalid["examples"]) == set(scored["image"][:3]) and "BKL=1.5" in " ".join(invalid["details"])
    assert out["ignored"]["truth_rows_not_evaluated"]["duplicate_rows_merged"] == 2
    # what is left is evaluated exactly like a clean table of the same images
    kept = ~scored.index.isin([0, 1, 2, 3, 7, 8, 10])
    clean = evaluate_predictions(scored[kept], held_out, bundle, n_boot=0)
    assert out["melanoma"]["auc"] == clean["melanoma"]["auc"]
    assert out["official"]["balanced_accuracy"] == clean["official"]["balanced_accuracy"]


def test_unk_rows_are_negatives_and_all_zero_for_the_official_scorer(scored, held_out, bundle):
    truth = held_out.copy()
    truth.loc[truth["diagnosis"] == "NV", "diagnosis"] = "UNK"
    out = evaluate_predictions(scored, truth, bundle, n_boot=0)
    assert out["official"]["images"] == 18 and out["melanoma"]["n"] == 18 and out["melanoma"]["positives"] == 7
    assert out["multiclass"]["n"] == 13 and out["multiclass"]["excluded_unk"] == 5
    assert out["data"]["diagnoses"]["UNK"] == 5


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p, t: (p.drop(columns=["MEL"]), t), "probability column"),
        (lambda p, t: (p.drop(columns=["image"]), t), "no image id column"),
        (lambda p, t: (p, t.drop(columns=["diagnosis"])), "no 'diagnosis' column"),
        (lambda p, t: (p.assign(image="x" + p["image"]), t), "no prediction could be matched"),
        (lambda p, t: (p, t.assign(diagnosis="NV")), "include no melanoma"),
    ],
)
def test_unusable_input_raises_a_clear_error(scored, held_out, bundle, damage, message):
    predictions, truth = damage(scored.copy(), held_out.copy())
    with pytest.raises(EvaluationError, match=message):
        evaluate_predictions(predictions, truth, bundle, n_boot=0)


# ---------------------------------------------------------------------------------------------
# Cross-validation, report, CLI


def test_evaluate_cv_reproduces_the_bundle_metrics(bundle):
    out = evaluate_cv(bundle, n_boot=N_BOOT)
    pooled = bundle.metrics["pooled"]
    assert out["mode"] == "cross-validation" and out["ignored"]["rows"] == 0
    assert out["data"]["images"] == bundle.training["n_images"]
    assert out["melanoma"]["auc"]["value"] == pytest.approx(pooled["melanoma"]["auc"]["value"], abs=1e-4)
    assert out["multiclass"]["balanced_accuracy"] == pytest.approx(pooled["multiclass"]["balanced_accuracy"], abs=1e-6)
    assert out["threshold_check"]["holds"]  # the threshold was chosen on these predictions
    assert out["melanoma"]["sensitivity"]["value"] == pytest.approx(bundle.threshold["sensitivity"])
    summary = out["cross_validation"]["fold_summary"]
    for key in ("melanoma_auc", "balanced_accuracy"):
        assert summary[key]["mean"] == pytest.approx(bundle.metrics["fold_summary"][key]["mean"], abs=1e-4)
        assert summary[key]["sd"] == pytest.approx(bundle.metrics["fold_summary"][key]["sd"], abs=1e-4)
    per_fold = out["cross_validation"]["per_fold"]
    assert sum(f["images"] for f in per_fold) == out["data"]["images"]
    assert summary["melanoma_auc"]["mean"] == pytest.approx(np.mean([f["melanoma_auc"] for f in per_fold]))


def test_cv_report_on_one_source_keeps_only_its_images(bundle, shared, tmp_path):
    """`evaluate --cv DATA`: the bundle's cross-validation restricted to DATA's images (here the
    HAM10000 share of a HAM10000 + isic9 bundle), with the counts and metrics of that share."""
    oof = pd.read_csv(bundle.path / "out_of_fold.csv.gz")
    ham = oof[oof["source"].str.contains("ham10000")]
    assert 0 < len(ham) < len(oof)
    result = CliRunner().invoke(
        app, ["evaluate", "-m", str(bundle.path), "--cv", str(shared / "ham10000"), "-o", str(tmp_path), "--bootstrap", "20"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["images"] == len(ham)
    assert report["melanoma"]["positives"] == int((ham["diagnosis"] == "MEL").sum())
    assert sum(f["images"] for f in report["cross_validation"]["per_fold"]) == len(ham)
    with pytest.raises(EvaluationError, match="none of the given images"):
        evaluate_cv(bundle, only_images={"ISIC_not_there"}, n_boot=0)


def test_report_is_written_and_self_contained(result, tmp_path):
    paths = write_report(result, tmp_path / "report")
    assert paths["json"].exists() and paths["html"].exists()
    assert json.loads(paths["json"].read_text())["melanoma"]["tp"] == result["melanoma"]["tp"]
    page = paths["html"].read_text()
    assert "not a diagnosis" in page
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert links and all(link.startswith("data:") for link in links)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, flags=re.I)
    assert "url(" not in page and "@import" not in page
    images = re.findall(r"<img\b[^>]*>", page, flags=re.I)
    assert len(images) == 4 + len(result["worst_false_negatives"])  # ROC, PR, confusion, reliability + thumbnails
    assert all(re.search(r'src="data:image/(png|jpeg);base64,', img) for img in images)
    assert page.count("data:image/jpeg;base64,") == len(result["worst_false_negatives"])
    assert "too small" in page and "Rows left out" in page


def test_cli_scores_data_then_reevaluates_its_own_predictions(bundle, held_out, tmp_path):
    manifest = tmp_path / "held_out.csv"
    save_manifest(Loaded(held_out, []), manifest, sources=["ham10000"], n_folds=1, seed=0)
    runner = CliRunner()
    first = runner.invoke(app, ["evaluate", "--model", str(bundle.path), str(manifest), "-o", str(tmp_path / "a"), "--bootstrap", "50"])
    assert first.exit_code == 0, first.output
    for name in ("report.html", "report.json", "predictions.csv"):
        assert (tmp_path / "a" / name).exists()
    again = runner.invoke(
        app,
        ["evaluate", "-m", str(bundle.path), str(manifest), "--predictions", str(tmp_path / "a" / "predictions.csv"),
         "-o", str(tmp_path / "b"), "--bootstrap", "50"],
    )
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert a["melanoma"] == b["melanoma"] and a["official"] == b["official"] and a["subgroups"] == b["subgroups"]
    cv = runner.invoke(app, ["evaluate", "--model", str(bundle.path), "--cv", "-o", str(tmp_path / "c"), "--bootstrap", "50"])
    assert cv.exit_code == 0, cv.output
    assert "fold AUC mean" in cv.output
    assert json.loads((tmp_path / "c" / "report.json").read_text())["mode"] == "cross-validation"


def test_cli_bad_input_exits_1_with_a_message(bundle, scored, held_out, tmp_path):
    manifest = tmp_path / "held_out.csv"
    save_manifest(Loaded(held_out, []), manifest, sources=["ham10000"], n_folds=1, seed=0)
    scored.drop(columns=["MEL"]).to_csv(tmp_path / "no_mel.csv", index=False)
    (tmp_path / "not_a_bundle").mkdir()
    model = ["--model", str(bundle.path)]
    cases = {
        "no such predictions file": [*model, str(manifest), "--predictions", str(tmp_path / "missing.csv")],
        "probability column": [*model, str(manifest), "--predictions", str(tmp_path / "no_mel.csv")],
        "give the labelled DATA": model,
        "not a DermSight model bundle": ["--model", str(tmp_path / "not_a_bundle"), "--cv"],
        "takes no --predictions": [*model, "--cv", "--predictions", str(tmp_path / "no_mel.csv")],
        "cannot read": [*model, str(tmp_path / "nowhere")],
    }
    runner = CliRunner()
    for message, args in cases.items():
        outcome = runner.invoke(app, ["evaluate", *args, "-o", str(tmp_path / "out")])
        assert outcome.exit_code == 1, (args, outcome.output)
        assert message in " ".join(outcome.output.split()), (message, outcome.output)
        assert "Traceback" not in outcome.output and isinstance(outcome.exception, SystemExit)


def test_refused_rows_are_counted_as_refused_and_left_out(scored, held_out, bundle):
    """`dermsight predict` keeps a row for an image the gate refused, with its reason and every
    model output blank: evaluate counts it under "refused" and scores the rest exactly as without it."""
    from dermsight.inference.predictor import withhold_refused

    table = scored.assign(looks_dermoscopic=True)
    table.loc[[0, 1], "looks_dermoscopic"] = False
    withheld = withhold_refused(table)
    assert withheld.loc[[0, 1], "refusal"].tolist() == ["not_dermoscopic"] * 2 and withheld.loc[[0, 1], "MEL"].isna().all()
    out = evaluate_predictions(withheld, held_out, bundle, n_boot=0)
    refused = next(r for r in out["ignored"]["reasons"] if r["reason"] == "refused")
    assert refused["rows"] == 2 and set(refused["examples"]) == set(scored["image"][:2])
    clean = evaluate_predictions(scored.iloc[2:], held_out, bundle, n_boot=0)
    assert out["data"]["images"] == len(scored) - 2 and out["melanoma"]["auc"] == clean["melanoma"]["auc"]
