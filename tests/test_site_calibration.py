"""Site calibration on real images: `dermsight calibrate` then `predict --site` (and the API),
the profile's fitting on the bundle's real held-out predictions, and every bad input named,
with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from scipy.stats import binomtest
from typer.testing import CliRunner

from dermsight.cli import app as cli
from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.evaluation.site_calibration import (
    CalibrationError,
    choose_site_threshold,
    fit_profile,
    lower_bound,
    melanomas_needed,
    read_labels,
)
from dermsight.models.bundle import DEFAULT_BUNDLE, load_bundle
from dermsight.models.bundle import with_site
from dermsight.models.site_profile import SiteProfileError, read_profile
from dermsight.serving.app import create_app

MELANOMAS, BENIGN = 12, 28


@pytest.fixture(scope="module")
def site_cases(shared) -> tuple[list[str], pd.DataFrame]:
    """40 real ISIC Archive (isic2017) images, 12 melanomas, as image files, and their labels."""
    meta = pd.read_csv(shared / "isic2017" / "metadata.csv")
    chosen = pd.concat([meta[meta["diagnosis_isic2019"] == "MEL"].head(MELANOMAS),
                        meta[meta["diagnosis_isic2019"] != "MEL"].head(BENIGN)])
    files = [str(shared / "isic2017" / "images" / f"{i}.jpg") for i in chosen["isic_id"]]
    labels = pd.DataFrame({"image_name": chosen["isic_id"], "melanoma": (chosen["diagnosis_isic2019"] == "MEL").astype(int)})
    return files, labels


@pytest.fixture(scope="module")
def calibrated(site_cases, tmp_path_factory) -> dict:
    """One `calibrate` run, a plain `predict` and a `predict --site` of the same images."""
    files, labels = site_cases
    folder = tmp_path_factory.mktemp("site")
    labels.to_csv(folder / "labels.csv", index=False)
    runner = CliRunner()
    made = runner.invoke(cli, ["calibrate", *files, "--labels", str(folder / "labels.csv"), "-o", str(folder / "site.json"),
                               "--site-name", "Test clinic"])
    assert made.exit_code == 0, made.output
    plain = runner.invoke(cli, ["predict", *files, "-o", str(folder / "plain.csv")])
    sited = runner.invoke(cli, ["predict", *files, "--site", str(folder / "site.json"), "-o", str(folder / "site.csv")])
    assert plain.exit_code == 0 and sited.exit_code == 0, plain.output + sited.output
    return {"folder": folder, "output": made.output, "predict_output": sited.output, "profile": read_profile(folder / "site.json"),
            "plain": pd.read_csv(folder / "plain.csv"), "site": pd.read_csv(folder / "site.csv"), "labels": labels}


def test_calibrate_then_predict_round_trip(calibrated):
    """The profile's threshold gives, on its own cases, exactly the sensitivity and specificity it
    states; predict --site shows the recalibrated risk, refers by the profile and says so."""
    profile, plain, site, labels = calibrated["profile"], calibrated["plain"], calibrated["site"], calibrated["labels"]
    data = profile.data
    # an image the gate refuses gets no risk in use, so calibrate leaves it out and says so
    refused = site["refusal"].fillna("").astype(str) != ""
    assert (calibrated["output"].count("left out of the calibration") == refused.sum())
    plain, site = plain[~refused.to_numpy()], site[~refused]
    truth = site["image"].map(labels.set_index("image_name")["melanoma"]).to_numpy()
    assert (data["n_cases"], data["n_melanomas"]) == (len(site), truth.sum()) and len(site) >= MELANOMAS + BENIGN - 3
    assert data["bundle"]["version"] == load_bundle(DEFAULT_BUNDLE).version
    assert site["above_threshold"][truth == 1].mean() == pytest.approx(data["sensitivity"]["value"])
    assert 1 - site["above_threshold"][truth == 0].mean() == pytest.approx(data["specificity"]["value"])
    assert data["sensitivity"]["value"] >= 0.90
    ci = binomtest(data["sensitivity"]["successes"], truth.sum()).proportion_ci(0.95, method="exact")  # gate-refused ones out
    assert (data["sensitivity"]["ci_low"], data["sensitivity"]["ci_high"]) == pytest.approx((ci.low, ci.high))
    # the recalibrated risk is the profile's map of the bundle's own risk (CSV: six decimals on both sides, and the
    # map, steeper than 1 where it stretches the risks, widens the bundle risk's rounding accordingly)
    ends = [profile.recalibrate(plain["melanoma_risk"].to_numpy() + d) for d in (-5e-7, 5e-7)]
    low, high = np.minimum(*ends) - 5e-7, np.maximum(*ends) + 5e-7
    assert ((site["melanoma_risk"].to_numpy() >= low) & (site["melanoma_risk"].to_numpy() <= high)).all()
    np.testing.assert_allclose(site["MEL"], site["melanoma_risk"], atol=1e-6)
    assert (site["above_threshold"] == (plain["melanoma_risk"] >= data["model_threshold"] - 1e-6)).all()
    assert (site["above_threshold"] == (site["melanoma_risk"] >= data["threshold"] - 1e-5)).all()
    assert not (site["above_threshold"] == plain["above_threshold"]).all()  # the site's threshold, not the bundle's
    probabilities = site[["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]].sum(axis=1)
    np.testing.assert_allclose(probabilities, 1.0, atol=1e-5)
    statement = (f"calibrated on {len(site)} cases ({truth.sum()} melanomas) at Test clinic: "
                 f"sensitivity {data['sensitivity']['value']:.2f}")
    assert statement in calibrated["output"].replace("\n", " ") and statement in calibrated["predict_output"].replace("\n", " ")
    assert f"only {truth.sum()} melanomas" in calibrated["output"]  # too few for a usable interval, said plainly


def test_the_api_applies_the_profile_as_predict_does(calibrated, site_cases, tmp_path):
    """The app with the profile (via DERMSIGHT_SITE, as `serve` reads it) scores an upload with the
    risk, threshold and referral of `predict --site`, and says which profile is active."""
    files, _ = site_cases
    profile, site = calibrated["profile"], calibrated["site"].set_index("image")
    chosen = [files[0], files[-1]]  # a melanoma and a benign lesion
    with TestClient(create_app(DEFAULT_BUNDLE, f"sqlite:///{tmp_path / 'db.sqlite'}", storage_dir=tmp_path, dev=True,
                               site=profile.path)) as client:
        response = client.post("/api/images", files=[("files", (Path(f).name, Path(f).read_bytes(), "image/jpeg")) for f in chosen])
        model = client.get("/api/model").json()
        page = client.get("/learn").text
        client.app.state.storage.engine.dispose()
    assert response.status_code == 201, response.text
    for path, prediction in zip(chosen, response.json()["predictions"]):
        row = site.loc[Path(path).stem]
        assert prediction["melanoma_risk"] == pytest.approx(row["melanoma_risk"], abs=1e-5)
        assert prediction["threshold"] == pytest.approx(profile.threshold)
        assert prediction["above_threshold"] == bool(row["above_threshold"])
        assert prediction["unsure"] == bool(row["unsure"])
    assert model["melanoma_threshold"] == pytest.approx(profile.threshold)
    cases, melanomas = profile.data["n_cases"], profile.data["n_melanomas"]
    assert model["site"]["n_melanomas"] == melanomas and model["operating_point"] == profile.statement()
    assert f"calibrated on {cases} cases ({melanomas} melanomas) at Test clinic" in page


def test_without_a_profile_the_app_says_the_threshold_comes_from_other_clinics(tmp_path):
    with TestClient(create_app(DEFAULT_BUNDLE, f"sqlite:///{tmp_path / 'db.sqlite'}", storage_dir=tmp_path, dev=True)) as client:
        model = client.get("/api/model").json()
        client.app.state.storage.engine.dispose()
    assert model["site"] is None
    assert model["operating_point"].startswith("no site profile: referral threshold") and "never saw" in model["operating_point"]


def test_threshold_rules_on_real_held_out_predictions():
    """On Derm7pt's leave-one-source-out predictions: the plain rule is the highest threshold that
    reaches 90%; with --confidence the highest whose exact one-sided bound does (and the next
    melanoma's risk above it would not)."""
    oof = load_out_of_fold(load_bundle(DEFAULT_BUNDLE))
    part = oof[oof["source"] == "derm7pt"]
    y, risk = (part["diagnosis"] == "MEL").to_numpy().astype(int), part["MEL"].to_numpy()
    melanoma = np.sort(risk[y == 1])
    plain = choose_site_threshold(y, risk, 0.90)
    assert np.mean(melanoma >= plain["model_threshold"]) >= 0.90
    assert np.mean(melanoma > plain["model_threshold"]) < 0.90
    sure = choose_site_threshold(y, risk, 0.90, confidence=0.95)
    detected = int(np.sum(melanoma >= sure["model_threshold"]))
    assert detected == sure["sensitivity"]["successes"]
    assert sure["sensitivity"]["lower_bound"]["value"] == pytest.approx(lower_bound(detected, len(melanoma), 0.95))
    assert lower_bound(detected, len(melanoma), 0.95) >= 0.90
    assert lower_bound(int(np.sum(melanoma > sure["model_threshold"])), len(melanoma), 0.95) < 0.90
    assert sure["model_threshold"] < plain["model_threshold"]  # confidence costs specificity
    with pytest.raises(CalibrationError, match=r"28 melanomas cannot show .* at least 29 are needed"):
        choose_site_threshold(np.r_[np.ones(28), np.zeros(5)], np.linspace(0, 1, 33), 0.90, confidence=0.95)


def test_the_site_map_is_the_logistic_fit_of_the_sites_cases():
    """On each left-out source's real held-out risks, the Platt map a profile stores, applied as
    predict and the API apply it, is the maximum-likelihood logistic fit: its mean risk equals
    the source's melanoma rate (the fit's score equation) and its log loss is below the raw
    risk's. A sign slip between fitting and applying the intercept breaks both."""
    from sklearn.metrics import log_loss

    from dermsight.evaluation.site_calibration import platt
    from dermsight.models.site_profile import recalibrate

    oof = load_out_of_fold(load_bundle(DEFAULT_BUNDLE))
    for source in ("derm7pt", "isic_archive", "isic2020"):
        part = oof[oof["source"] == source]
        y, risk = (part["diagnosis"] == "MEL").to_numpy().astype(int), part["MEL"].to_numpy(dtype=float)
        site = recalibrate(risk, *platt(y, risk))
        assert site.mean() == pytest.approx(y.mean(), abs=1e-3), source
        assert log_loss(y, site) < log_loss(y, risk), source


def test_a_risk_missing_is_refused_by_name_not_fitted():
    """A refused image has no risk: fitting on it must say so, not write a profile of NaNs (the
    ISIC 2020 test_128 bench once got 'damaged site profile' instead)."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    oof = load_out_of_fold(bundle)
    part = oof[oof["source"] == "derm7pt"]
    risk = part["MEL"].to_numpy(dtype=float).copy()
    risk[[3, 7]] = np.nan
    with pytest.raises(CalibrationError, match=r"2 images have no risk"):
        fit_profile(bundle, part["image_id"], risk, oof=oof, site="derm7pt")


def test_melanomas_needed_for_a_usable_interval():
    n = melanomas_needed(0.90, 0.05)
    for trials, usable in ((n, True), (n - 1, False)):
        k = math.ceil(0.9 * trials)
        low = binomtest(k, trials).proportion_ci(0.95, method="exact").low
        assert (k / trials - low <= 0.05) is usable


@pytest.mark.parametrize("header, rows", [("image_name,melanoma", ["ISIC_1.jpg,1", "ISIC_2,0"]),
                                          ("image,MEL", ["ISIC_1,1.0", "ISIC_2,0.0"]),
                                          ("image_name,target,patient_id", ["ISIC_1,1,IP_1", "ISIC_2,0,IP_1"])])
def test_label_layouts(tmp_path, header, rows):
    (tmp_path / "l.csv").write_text("\n".join([header, *rows]) + "\n")
    assert read_labels(tmp_path / "l.csv").to_dict() == {"ISIC_1": 1, "ISIC_2": 0}


def _run(*arguments) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in arguments])
    return result.exit_code, " ".join(result.output.split())


def test_bad_labels_are_named_and_nothing_is_written(tmp_path, site_cases, calibrated):
    files, labels = site_cases
    out = tmp_path / "site.json"
    cases = {
        "image_name,diagnosis\nISIC_1,MEL\n": "needs the columns image_name,melanoma or image,MEL or image_name,target; "
                                               "it has image_name, diagnosis",
        "image_name,melanoma\nISIC_1,yes\n": "1 row(s) without an image id or with a melanoma that is not 0 or 1 (line(s) 2",
        "image_name,melanoma\nISIC_1,1\nISIC_1,0\n": "1 image(s) labelled both 0 and 1, e.g. ISIC_1",
    }
    for text, message in cases.items():
        (tmp_path / "labels.csv").write_text(text)
        code, output = _run("calibrate", *files[:2], "--labels", tmp_path / "labels.csv", "-o", out)
        assert code == 1 and message in output and "labels.csv" in output, output
    # labels of images that were not among the INPUTS; images without labels; one class only
    scored = files[MELANOMAS - 2: MELANOMAS + 2]  # two melanomas, two benign
    known = labels.iloc[MELANOMAS - 2: MELANOMAS + 2]
    extra = pd.concat([known, pd.DataFrame({"image_name": ["ISIC_9999999"], "melanoma": [0]})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    code, output = _run("calibrate", *scored, "--labels", tmp_path / "extra.csv", "-o", out)
    assert code == 1 and "1 of 5 label row(s) of" in output and "name images not found" in output and "ISIC_9999999" in output
    known.iloc[:3].to_csv(tmp_path / "short.csv", index=False)
    code, output = _run("calibrate", *scored, "--labels", tmp_path / "short.csv", "-o", out)
    assert code == 1 and "1 of 4 scored image(s) have no label in" in output and known.iloc[3]["image_name"] in output
    benign = known[known["melanoma"] == 0]
    benign.to_csv(tmp_path / "benign.csv", index=False)
    code, output = _run("calibrate", *scored[2:], "--labels", tmp_path / "benign.csv", "-o", out)
    assert code == 1 and "the 2 labelled case(s) include no melanoma" in output
    assert not out.exists() and not list(tmp_path.glob(".site.json*"))


def test_a_profile_of_another_bundle_or_damaged_is_refused(tmp_path, site_cases, calibrated):
    files, _ = site_cases
    data = json.loads((calibrated["folder"] / "site.json").read_text())
    other = {**data, "bundle": {"name": "other", "version": "other@2026-01-01T00:00:00Z"}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "damaged.json").write_text((calibrated["folder"] / "site.json").read_text()[:300])
    no_threshold = {k: v for k, v in data.items() if k != "threshold"}
    (tmp_path / "partial.json").write_text(json.dumps(no_threshold))
    expected = {
        "other.json": "was made for bundle other@2026-01-01T00:00:00Z, not robust-lite0",
        "damaged.json": "damaged site profile, not JSON",
        "partial.json": "damaged site profile, missing key(s) threshold",
    }
    for name, message in expected.items():
        out = tmp_path / f"{name}.csv"
        code, output = _run("predict", files[0], "--site", tmp_path / name, "-o", out)
        assert code == 1 and message in output and name in output, output
        assert not out.exists()
        with pytest.raises(SiteProfileError, match=message.split(",")[0]):
            with_site(load_bundle(DEFAULT_BUNDLE), tmp_path / name)


def test_prediction_table_applies_the_profile_as_every_engine_gets_it(calibrated, site_cases):
    """`prediction_table` (what the local Predictor, the API and the Ray/Spark group-by tasks call with
    the bundle) on real scores: risk, every member's risk and so the spread and `unsure` in the site's
    units; the referral decided on the network's own risk at the profile's model threshold."""
    from dermsight.inference.predictor import Predictor, prediction_table

    files, _ = site_cases
    profile, bundle = calibrated["profile"], load_bundle(DEFAULT_BUNDLE)
    _, scores, _ = Predictor(bundle).predict_images([Path(f).read_bytes() for f in files[:8]], pd.DataFrame(index=range(8)))
    table = prediction_table(scores, [f"image {i}" for i in range(8)], None, with_site(bundle, profile))
    mel = bundle.classes.index("MEL")
    members = profile.recalibrate(scores.member_probabilities[:, :, mel])
    np.testing.assert_allclose(table["melanoma_risk"], profile.recalibrate(scores.probabilities[:, mel]), rtol=1e-5)
    np.testing.assert_allclose(table["risk_spread"], members.std(axis=1), rtol=1e-4, atol=1e-6)  # float32 spreads near 0
    assert (table["unsure"] == (table["risk_spread"] > bundle.unsure_level)).all()
    assert (table["above_threshold"] == (scores.probabilities[:, mel] >= profile.model_threshold)).all()
