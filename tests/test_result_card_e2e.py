"""The answer a clinician reads, in a real headless Chromium against a real server running the
committed ensemble bundle: a melanoma, a benign nevus above and one below the threshold, a blurred and a
tiny photo and a melanoma the model is unsure of, each card with its graded decision, what the risk means,
its differential, how sure the model is, what is wrong with the photo, and the photo and heat map.

Screenshots go to $DERMSIGHT_SCREENSHOTS (README's docs/screenshots were made with
`DERMSIGHT_SCREENSHOTS=docs/screenshots pytest tests/test_result_card_e2e.py`), else a tmp folder."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from dermsight.data.readers import read_isic_cli
from dermsight.inference.ood import REFUSAL_MESSAGE
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import DEFAULT_BUNDLE
from dermsight.serving.app import create_app
from live_server import in_thread
from dermsight.serving.schemas import DECISIONS
from test_web_e2e import DISCLAIMER, browser, images_loaded, open_page, submit_upload, wait_until  # noqa: F401


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app(DEFAULT_BUNDLE, storage_dir=tmp_path_factory.mktemp("cards"), dev=True)
    with in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DERMSIGHT_SCREENSHOTS") or tmp_path_factory.mktemp("card-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def blur(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(2.4)))


def shrink(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((100, 100), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos(shared) -> dict[str, bytes]:
    """Real ISIC archive images (256 x 256): a melanoma and a nevus as they are, the melanoma out of
    focus (Gaussian blur, 2.4 px: the warning) and the nevus shrunk to 100 x 100 px, and a melanoma
    the model is unsure of, and a nevus below the referral threshold. Each is the first of its kind, in the archive's order, that the committed
    bundle's photo gate accepts with its altered copy, the copy earning its warning (a refused photo
    gets the other card), the model sure of both."""
    records = read_isic_cli(shared / "isic2017").records
    predictor = Predictor(DEFAULT_BUNDLE)

    def scored(*images: bytes):
        n = len(images)  # the metadata the page's form sends below
        metadata = pd.DataFrame({"age": [58.0] * n, "sex": ["male"] * n, "site": ["torso"] * n})
        table, _, _ = predictor.predict_images(list(images), metadata)
        return table

    def first(diagnosis: str, keep) -> bytes:
        for path in records.loc[records["diagnosis"] == diagnosis, "image_ref"]:
            if keep(Path(path).read_bytes()):
                return Path(path).read_bytes()
        raise AssertionError(f"no {diagnosis} image of isic2017 fits")

    def with_copy(alter, warning: str):
        def keep(data: bytes) -> bool:
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            table = scored(jpeg(rgb), jpeg(alter(rgb)))
            sure = not table["unsure"].any()  # only the "unsure" card may say the model is unsure
            return bool(table["looks_dermoscopic"].all()) and sure and warning in table["quality_warnings"].iloc[1]
        return keep

    def unsure(data: bytes) -> bool:
        row = scored(data).iloc[0]
        return bool(row["looks_dermoscopic"] and row["unsure"])

    def below(data: bytes) -> bool:
        row = scored(data).iloc[0]
        return bool(row["looks_dermoscopic"] and not row["above_threshold"])

    melanoma = np.asarray(Image.open(io.BytesIO(first("MEL", with_copy(blur, "out_of_focus")))).convert("RGB"))
    nevus = np.asarray(Image.open(io.BytesIO(first("NV", with_copy(shrink, "too_small")))).convert("RGB"))
    return {
        "melanoma": jpeg(melanoma), "unsure": first("MEL", unsure), "nevus": jpeg(nevus), "below": first("NV", below),
        "blurred": jpeg(blur(melanoma)), "tiny": jpeg(shrink(nevus)),
    }


# What each photo gets from the committed bundle: its referral grade(s) and their badge words.
LABELS = {"urgent": "Refer urgently", "routine": "Refer", "not_prompted": "No referral prompted"}
REFERRALS = {
    "melanoma": {"urgent", "routine"}, "unsure": {"urgent", "routine"}, "blurred": {"urgent", "routine", "not_prompted"},
    "nevus": {"not_prompted", "routine"}, "tiny": {"not_prompted", "routine", "urgent"}, "below": {"not_prompted"},
}


@pytest.mark.parametrize(
    ("name", "warning"),
    [("melanoma", None), ("nevus", None), ("blurred", "out_of_focus"), ("tiny", "too_small"), ("unsure", None),
     ("below", None)],
)
def test_card_shows_differential_uncertainty_and_photo_quality(browser, server, photos, shots, name, warning):  # noqa: F811
    page = open_page(browser, 1100, 1000)
    page.goto(f"{server}/")
    page.set_input_files("input[name=files]", [{"name": f"{name}.jpg", "mimeType": "image/jpeg", "buffer": photos[name]}])
    page.fill("input[name=age]", "58")
    page.select_option("select[name=sex]", "male")
    page.select_option("select[name=site]", "torso")
    submit_upload(page)
    card = page.query_selector("#results .card")
    text = card.inner_text()
    assert DISCLAIMER in text and "melanoma risk" in text
    differential = card.query_selector_all("ol.differential li")
    assert len(differential) == 3
    if name in ("melanoma", "unsure"):  # these melanomas, as photographed, get a malignant class among the three
        assert any("malignant" in li.inner_text() for li in differential)
    # Decision first, in words and a text badge (never colour alone), graded for the clinician.
    first = card.query_selector("p.verdict")
    assert card.eval_on_selector("h3 + p", "e => e.classList.contains('verdict')")
    grade = first.query_selector(".badge").get_attribute("data-referral")
    assert grade in REFERRALS[name], grade
    assert first.query_selector(".badge").inner_text() == LABELS[grade]
    assert first.query_selector(".decision").inner_text() == DECISIONS[grade]
    assert "if it changes or worries you" not in text  # written for the clinician, not the patient
    # What the risk means, from the bundle's own validation images, named.
    meaning = card.query_selector(".meaning").inner_text()
    assert re.search(r"of the 500 validation images whose risks were nearest \([\d.]+% to [\d.]+%\), \d+ \(\d+%\) "
                     r"were melanoma", meaning), meaning
    assert "out-of-fold validation images (HAM10000" in card.query_selector(".meaning details").text_content()
    # How sure, in percentage points, and no louder than the decision.
    sure = card.query_selector("p.uncertainty").inner_text()
    assert "percentage point" in sure and "±" not in sure
    assert (card.query_selector("p.uncertainty.unsure") is not None) == (name == "unsure")
    assert sure.startswith("The model is unsure") == (name == "unsure")
    # Sure, above or below the threshold: whether the decision hinges on the spread, as the API's numbers say.
    prediction = page.request.get(f"{server}/api/predictions/{card.get_attribute('data-prediction-id')}").json()
    assert prediction["decision"] == DECISIONS[grade] and prediction["uncertainty"] == sure
    # The differential is the API's, in its order, each malignant class marked as such.
    shown = [li.inner_text() for li in differential]
    assert [(t.startswith(d["name"] + " "), "malignant" in t) for t, d in zip(shown, prediction["differential"])] == [
        (True, d["malignant"]) for d in prediction["differential"]]
    if name == "unsure":
        assert sure.endswith("give your own examination more weight than this risk.")
    else:
        assert sure.startswith("The model's networks agree: their melanoma risks differ by ")
        hinges = prediction["risk_spread"] >= abs(prediction["melanoma_risk"] - prediction["threshold"])
        assert sure.endswith("the decision is a close call." if hinges else "the decision does not hinge on it.")
    weight = "el => getComputedStyle(el).fontWeight"
    assert int(card.eval_on_selector("p.uncertainty", weight)) < int(card.eval_on_selector(".verdict .decision", weight))
    warnings = [li.get_attribute("data-warning") for li in card.query_selector_all(".quality li")]
    if warning:
        assert warning in warnings and "About the photo:" in text
    else:
        assert warnings == [] and card.query_selector(".quality") is None
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete)")
    assert images_loaded(page, "#results img")
    # The photo and the heat map in the same framing (the whole frame, as the network saw it), with a scale.
    photo, heat = (card.query_selector(f".pictures img[alt*='{alt}']").bounding_box() for alt in ("lesion", "heat map"))
    assert abs(photo["width"] / photo["height"] - heat["width"] / heat["height"]) < 0.01
    natural = card.eval_on_selector(".pictures img", "i => i.naturalWidth / i.naturalHeight")
    assert abs(photo["width"] / photo["height"] - natural) < 0.02
    assert card.query_selector(".scale .ramp") and "not the lesion's outline" in card.inner_text()
    card.screenshot(path=shots / f"card-{name}.png")
    assert page.script_errors == []


@pytest.mark.parametrize("kind", ["photo", "document"])
def test_refused_card_shows_the_refusal_and_its_reason_only(
    browser, server, clinical_photos, document_png, shots, kind  # noqa: F811
):
    """A real ordinary photo of a mole (Derm7pt clinical photo, a case no detector saw), and a rendered page of
    text whose brightness the quality check flags: the card says it was refused and why, and nothing else: no risk,
    heat map, differential or photo advice (the API still reports the page's quality warning)."""
    page = open_page(browser, 1100, 1000)
    page.goto(f"{server}/")
    name, data, mime = ((clinical_photos[0].name, clinical_photos[0].read_bytes(), "image/jpeg") if kind == "photo"
                        else ("chart.png", document_png, "image/png"))
    page.set_input_files("input[name=files]", [{"name": name, "mimeType": mime, "buffer": data}])
    submit_upload(page)
    card = page.query_selector("#results .card.ood")
    assert card is not None
    prediction = page.request.get(f"{server}/api/predictions/{card.get_attribute('data-prediction-id')}").json()
    warnings = [w["message"] for w in prediction["quality_warnings"]]
    assert bool(warnings) == (kind == "document")
    text = card.inner_text()
    assert REFUSAL_MESSAGE in text and "Refused: no risk given." in text
    assert card.query_selector("[data-refusal]").get_attribute("data-refusal") == "not_dermoscopic"
    for absent in ("img", ".risk", "ol.differential", ".quality", ".disclaimer", "p.unsure", "p.muted"):
        assert card.query_selector(absent) is None, absent
    assert not any(message in text for message in warnings) and "About the photo" not in text
    assert "risk " not in text.lower().replace("no risk given", "") and "%" not in text
    card.screenshot(path=shots / f"card-refused-{kind}.png")
    assert page.script_errors == []
