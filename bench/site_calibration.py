"""Site calibration on the sources the networks never saw: does a profile from 30% of a clinic's
cases hold on the other 70%?

    dermsight predict ../shared/datasets/isic2020 -o /tmp/test128.parquet   # (test_128 rows are used)
    python bench/site_calibration.py [BUNDLE] [--test-128 /tmp/test128.parquet] [--write] \
        > bench/site_calibration_results.json

Uses the bundle's leave-one-source-out predictions (out_of_fold.csv.gz: each source but the
largest predicted by a fold network trained without any image of it; nothing is re-scored).
For every such source with >= 40 melanomas, 20 seeds of a patient/lesion-grouped 30% / 70% split:
a profile fitted on the 30% (dermsight.evaluation.site_calibration, as `dermsight calibrate`
does), scored on the 70%: sensitivity (mean, 5th percentile), specificity beside the 70%'s own
optimum (its threshold for the target sensitivity), the same with --confidence 0.95, ECE before
and after the recalibration, and the prevalence estimated from the 70%'s images alone (estimator
fitted without the source) against the truth; then the prevalence estimators compared on every
whole left-out source, the default threshold (pooled leave-one-source-out) with every source's
sensitivity and specificity, and on test_128 (unlabelled ISIC 2020 test images scored by the
shipped ensemble) the estimated prevalence and the referral rate with and without a profile.

--write stores the default threshold in the bundle's bundle.json (with the pooled and per-source
metrics recomputed at it, as training does) and rewrites its model card.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from dermsight.data.schema import CLASSES
from dermsight.evaluation.calibration import choose_threshold, choose_threshold_held_out_sources
from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.evaluation.metrics import expected_calibration_error
from dermsight.evaluation.site_calibration import (
    CalibrationError,
    PrevalenceEstimator,
    choose_site_threshold,
    fit_profile,
    melanomas_for_confidence,
    melanomas_needed,
    platt,
    without_refused,
)
from dermsight.models.bundle import load_bundle
from dermsight.models.model_card import write_model_card
from dermsight.models.site_profile import recalibrate

AT_THRESHOLD = ("threshold", "sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn")
TARGET, CONFIDENCE, CALIBRATE_SHARE, SEEDS, MIN_MELANOMAS = 0.90, 0.95, 0.30, 20, 40
DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def held_out_rows(bundle, oof: pd.DataFrame) -> np.ndarray:
    """Rows predicted by a network that never saw their source (every source but the largest)."""
    if not bundle.training.get("config", {}).get("source_folds"):
        raise SystemExit("this bundle was not trained with --source-folds: it has no leave-one-source-out predictions")
    return (oof["source"] != oof["source"].value_counts().idxmax()).to_numpy()


def _groups(part: pd.DataFrame) -> np.ndarray:
    keys = part["patient_id"].combine_first(part["lesion_id"]).combine_first(part["image_id"])
    return pd.factorize(keys)[0]


def splits(part: pd.DataFrame, oof: pd.DataFrame, source: str) -> dict:
    """The 20 calibrate-on-30% / score-on-70% splits of one source."""
    y, risk = (part["diagnosis"] == "MEL").to_numpy().astype(int), part["MEL"].to_numpy(dtype=float)
    estimator = PrevalenceEstimator.fit(oof[oof["source"] != source])  # fitted without this source
    rows = []
    for seed in range(SEEDS):
        fit, score = next(GroupShuffleSplit(1, train_size=CALIBRATE_SHARE, random_state=seed).split(part, groups=_groups(part)))
        yf, rf, ys, rs = y[fit], risk[fit], y[score], risk[score]
        plain = choose_site_threshold(yf, rf, TARGET)["model_threshold"]
        sure = choose_site_threshold(yf, rf, TARGET, CONFIDENCE)["model_threshold"] if yf.sum() >= melanomas_for_confidence(TARGET, CONFIDENCE) else None
        try:  # as `dermsight calibrate` does, a split whose risks rank its melanomas backwards is refused
            calibrated = recalibrate(rs, *platt(yf, rf))
        except CalibrationError:
            calibrated = None
        own = choose_threshold(ys, rs, TARGET)
        rows.append({
            "seed": seed, "melanomas_calibrated": int(yf.sum()), "cases_calibrated": int(len(yf)),
            "sensitivity": float(np.mean(rs[ys == 1] >= plain)), "specificity": float(np.mean(rs[ys == 0] < plain)),
            "optimum_specificity": own["specificity"],
            "sensitivity_confident": None if sure is None else float(np.mean(rs[ys == 1] >= sure)),
            "specificity_confident": None if sure is None else float(np.mean(rs[ys == 0] < sure)),
            "ece_before": expected_calibration_error(ys, rs),
            "calibration_refused": calibrated is None,
            "ece_after": np.nan if calibrated is None else expected_calibration_error(ys, calibrated),
            # the ECE of labels drawn from the recalibrated risks themselves: what perfect calibration measures here
            "ece_floor": np.nan if calibrated is None else
            expected_calibration_error(np.random.default_rng(seed).binomial(1, calibrated), calibrated),
            "prevalence_truth": float(ys.mean()), "prevalence_from_images": estimator.estimate(rs),
        })
    frame = pd.DataFrame(rows)
    confident = frame["sensitivity_confident"].dropna()
    return {
        "source": source, "images": int(len(part)), "melanomas": int(y.sum()),
        "melanomas_in_30pct": {"min": int(frame["melanomas_calibrated"].min()), "max": int(frame["melanomas_calibrated"].max())},
        "sensitivity": {"mean": float(frame["sensitivity"].mean()), "p5": float(frame["sensitivity"].quantile(0.05)),
                        "min": float(frame["sensitivity"].min())},
        "specificity": {"mean": float(frame["specificity"].mean()), "optimum_mean": float(frame["optimum_specificity"].mean()),
                        "gap_mean": float((frame["specificity"] - frame["optimum_specificity"]).mean())},
        "confident": {
            "splits": int(len(confident)),
            "sensitivity_at_least_target": int((confident >= TARGET).sum()),
            "sensitivity_mean": float(confident.mean()) if len(confident) else None,
            "sensitivity_min": float(confident.min()) if len(confident) else None,
            "specificity_mean": float(frame["specificity_confident"].mean()) if len(confident) else None,
            "specificity_given_up": float((frame["specificity"] - frame["specificity_confident"]).mean()) if len(confident) else None,
        },
        "ece": {"before_mean": float(frame["ece_before"].mean()), "after_mean": float(frame["ece_after"].mean()),
                "after_max": float(frame["ece_after"].max()), "floor_mean": float(frame["ece_floor"].mean()),
                "splits_refused": int(frame["calibration_refused"].sum())},  # after_*: over the splits calibrated
        "prevalence": {"truth_mean": float(frame["prevalence_truth"].mean()),
                       "from_images_mean": float(frame["prevalence_from_images"].mean()),
                       "abs_error_mean": float((frame["prevalence_from_images"] - frame["prevalence_truth"]).abs().mean())},
        "splits": rows,
    }


def estimators_compared(oof: pd.DataFrame, held_out: np.ndarray) -> dict:
    """Each prevalence estimator fitted without a left-out source and run on its images: the mean
    risk (raw), the chosen PrevalenceEstimator, Saerens' EM (QuaPy's EMQ.EM on the Platt-recalibrated
    risks) and adjusted classify-and-count at the fitted sources' median melanoma risk."""
    from quapy.method.aggregative import EMQ

    out = {}
    for source in sorted(oof.loc[held_out, "source"].unique()):
        fit, test = oof[oof["source"] != source], oof[oof["source"] == source]
        yf, rf, rt = (fit["diagnosis"] == "MEL").to_numpy().astype(int), fit["MEL"].to_numpy(), test["MEL"].to_numpy()
        estimator = PrevalenceEstimator.fit(fit)
        calibrated = recalibrate(rt, estimator.slope, estimator.intercept)
        prior = np.array([1 - estimator.prior, estimator.prior])
        em = EMQ.EM(prior, np.column_stack([1 - calibrated, calibrated]))[0][1]
        cut = np.median(rf[yf == 1])
        tpr, fpr = np.mean(rf[yf == 1] >= cut), np.mean(rf[yf == 0] >= cut)
        out[source] = {
            "truth": float((test["diagnosis"] == "MEL").mean()), "mean_risk": float(rt.mean()),
            "chosen_platt_mean": float(calibrated.mean()), "saerens_em_quapy": float(em),
            "adjusted_classify_and_count": float(np.clip((np.mean(rt >= cut) - fpr) / (tpr - fpr), 0, 1)),
        }
    return out


def test_128(bundle, oof: pd.DataFrame, path: Path | None, default_threshold: float) -> dict | None:
    """test_128 scored by the shipped ensemble (a `dermsight predict` table of the isic2020 folder):
    the prevalence from its images, the referral rate without a profile, with the prevalence-only
    profile, and with a profile calibrated on all 887 labelled ISIC 2020 images' held-out predictions."""
    if path is None or not path.exists():
        return None
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    names = set(p.stem for p in (DATA / "isic2020" / "test_128").glob("*.jpg"))
    table = table[table["image"].astype(str).isin(names)]
    table, _, refused = without_refused(table)  # as `dermsight calibrate` leaves them out
    risk = table["melanoma_risk"].to_numpy(dtype=float)
    profile = fit_profile(bundle, table["image"], risk, oof=oof, site="test_128")
    isic = oof[oof["source"] == "isic2020"]
    labelled = choose_site_threshold((isic["diagnosis"] == "MEL").to_numpy().astype(int), isic["MEL"].to_numpy(), TARGET)
    return {
        "images": int(len(table)), "refused_as_not_dermoscopic": len(refused),
        "prevalence_from_images": profile.data["prevalence_interval"],
        "expected_prevalence": "about 0.018 (melanoma share of the SIIM-ISIC 2020 training set, 584 / 33,126)",
        "referral_rate": {
            "no_profile": float(np.mean(risk >= default_threshold)),
            "prevalence_only_profile": float(np.mean(risk >= profile.model_threshold)),
            "profile_from_isic2020_labelled_held_out": float(np.mean(risk >= labelled["model_threshold"])),
        },
        "thresholds": {"default": default_threshold, "isic2020_labelled": labelled["model_threshold"]},
        "mean_risk": {"no_profile": float(risk.mean()), "prevalence_only_profile": float(profile.recalibrate(risk).mean())},
        "note": "the ensemble trained on 887 ISIC 2020 training images (48% melanoma), so test_128 is not a source it never saw",
    }


def write_default_threshold(bundle, oof: pd.DataFrame, threshold: dict) -> None:
    """bundle.json's threshold section and its threshold-dependent metrics, recomputed at the new
    threshold as training computes them; then the model card."""
    from dermsight.training.config import TrainConfig
    from dermsight.training.train import cross_validation_metrics, source_metrics

    classes = bundle.classes
    labels = pd.Index(classes).get_indexer(oof["diagnosis"])
    probabilities = oof[classes].to_numpy()
    records = oof.assign(group=_groups(oof))
    config = TrainConfig(sources=[], source_folds=True, seed=bundle.training.get("config", {}).get("seed", 0))
    previous = bundle.threshold.get("previous") or {k: bundle.threshold.get(k) for k in ("melanoma", "rule", "sensitivity", "specificity")}
    metrics = cross_validation_metrics(records, labels, probabilities, classes, threshold["threshold"], int(oof["fold"].nunique()))
    sources = source_metrics(records, labels, probabilities, classes, threshold["threshold"], config)
    # only what depends on the threshold: the rest stays as training computed it (full precision, not the CSV's six decimals)
    bundle.metrics["pooled"]["melanoma"].update({k: metrics["pooled"]["melanoma"][k] for k in AT_THRESHOLD})
    new = {(row["source"], row["held_out"]): row for row in sources}
    for row in bundle.metrics["per_source"]:
        row.update({k: new[(row["source"], row["held_out"])][k] for k in ("sensitivity", "specificity", "flagged")})
    bundle.threshold = {"melanoma": threshold["threshold"], "target_sensitivity": TARGET, **threshold, "previous": previous}
    bundle.save()
    write_model_card(load_bundle(bundle.path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default="bundles/default")
    parser.add_argument("--test-128", type=Path, default=None, help="`dermsight predict` table of the isic2020 folder")
    parser.add_argument("--write", action="store_true", help="store the default threshold in the bundle")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    oof = load_out_of_fold(bundle)
    held_out = held_out_rows(bundle, oof)
    y = (oof["diagnosis"] == "MEL").to_numpy().astype(int)
    default = choose_threshold_held_out_sources(y, oof["MEL"].to_numpy(), oof["source"].to_numpy(), held_out, TARGET)
    sources = [s for s, part in oof[held_out].groupby("source") if (part["diagnosis"] == "MEL").sum() >= MIN_MELANOMAS]
    per_source = [splits(oof[oof["source"] == s].reset_index(drop=True), oof, s) for s in sources]
    prevalence = estimators_compared(oof, held_out)
    result = {
        "bundle": bundle.version,
        "predictions": "leave-one-source-out (out_of_fold.csv.gz), nothing re-scored",
        "sources": sources,
        "left_aside": "ham10000: predicted by grouped cross-validation (networks that saw other HAM10000 lesions), not left out",
        "design": f"{SEEDS} seeds, patient/lesion-grouped {CALIBRATE_SHARE:.0%} calibrate / {1 - CALIBRATE_SHARE:.0%} score; "
                  f"target sensitivity {TARGET}, --confidence {CONFIDENCE}",
        "per_source": per_source,
        "prevalence_estimators_left_out_source": prevalence,
        "default_threshold": {k: default[k] for k in ("threshold", "rule", "sensitivity", "specificity", "pooled_held_out", "held_out_sources")},
        "old_threshold": bundle.threshold.get("previous", {}).get("melanoma") or bundle.threshold.get("melanoma"),
        "melanomas_needed": {
            "usable_interval_0.05": melanomas_needed(TARGET), "usable_interval_0.10": melanomas_needed(TARGET, 0.10),
            "confidence_0.95_possible_at_all": melanomas_for_confidence(TARGET, CONFIDENCE),
        },
        "test_128": test_128(bundle, oof, args.test_128, default["threshold"]),
        "classes": [c for c in bundle.classes if c in CLASSES],
    }
    result["targets"] = {
        "mean_sensitivity_at_least_0.85": {s["source"]: s["sensitivity"]["mean"] >= 0.85 for s in per_source},
        "specificity_within_0.03_of_optimum": {s["source"]: abs(s["specificity"]["gap_mean"]) <= 0.03 for s in per_source},
        "confident_sensitivity_in_19_of_20": {s["source"]: s["confident"]["sensitivity_at_least_target"] >= 19 for s in per_source},
        "ece_after_at_most_0.05": {s["source"]: s["ece"]["after_max"] <= 0.05 and not s["ece"]["splits_refused"] for s in per_source},
        "prevalence_within_0.05": {k: abs(v["chosen_platt_mean"] - v["truth"]) <= 0.05 for k, v in prevalence.items()},
        "default_sensitivity_at_least_0.85": {k: v["sensitivity"]["value"] >= 0.85 for k, v in default["held_out_sources"].items()},
    }
    if result["test_128"]:
        value = result["test_128"]["prevalence_from_images"]["value"]
        result["targets"]["test_128_prevalence_0.005_to_0.04"] = 0.005 <= value <= 0.04
    if args.write:
        write_default_threshold(bundle, oof, default)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
