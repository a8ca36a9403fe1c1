"""The answer a clinician reads, in a real headless Chromium against a real server running the
committed ensemble bundle: a melanoma, a benign nevus, a blurred and a tiny photo, each card with
its differential, how sure the model is and what is wrong with the photo.

Screenshots go to $DERMSIGHT_SCREENSHOTS (README's docs/screenshots were made with
`DERMSIGHT_SCREENSHOTS=docs/screenshots pytest tests/test_result_card_e2e.py`), else a tmp folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dermsight.data.readers import read_isic_cli
from dermsight.inference.ood import REFUSAL_MESSAGE
from dermsight.models.bundle import DEFAULT_BUNDLE
from dermsight.serving.app import create_app
from live_server import in_thread
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


@pytest.fixture(scope="module")
def photos(shared) -> dict[str, bytes]:
    """Real ISIC archive images (256 x 256): a melanoma and a nevus as they are, the melanoma out of
    focus and the nevus shrunk to 100 x 100 px, and a second melanoma the model is unsure of. The blur (Gaussian, 2.4 px) earns the warning and
    still passes the gate; a blurrier copy (3.2 px) is refused as not dermoscopic."""
    records = read_isic_cli(shared / "isic2017").records
    melanomas = records.loc[records["diagnosis"] == "MEL", "image_ref"]
    melanoma = np.asarray(Image.open(melanomas.iloc[0]).convert("RGB"))
    nevus = np.asarray(Image.open(records.loc[records["diagnosis"] == "NV", "image_ref"].iloc[0]).convert("RGB"))
    return {
        "melanoma": jpeg(melanoma),
        "unsure": Path(melanomas.iloc[1]).read_bytes(),  # a melanoma on which the four networks disagree (spread 0.20)
        "nevus": jpeg(nevus),
        "blurred": jpeg(np.asarray(Image.fromarray(melanoma).filter(ImageFilter.GaussianBlur(2.4)))),
        "tiny": jpeg(np.asarray(Image.fromarray(nevus).resize((100, 100), Image.BICUBIC))),
    }


@pytest.mark.parametrize(
    ("name", "warning"),
    [("melanoma", None), ("nevus", None), ("blurred", "out_of_focus"), ("tiny", "too_small"), ("unsure", None)],
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
    assert any("malignant" in li.inner_text() for li in differential)  # melanoma is always among the three here
    sure = card.query_selector("p.unsure") or card.query_selector("p.muted")
    assert "networks" in sure.inner_text()  # the ensemble's spread in words, sure or unsure
    assert (card.query_selector("p.unsure") is not None) == (name == "unsure")
    if name == "unsure":
        assert sure.inner_text().startswith("The model is unsure")
    warnings = [li.get_attribute("data-warning") for li in card.query_selector_all(".quality li")]
    if warning:
        assert warning in warnings and "About the photo:" in text
    else:
        assert warnings == [] and card.query_selector(".quality") is None
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete)")
    assert images_loaded(page, "#results img")
    card.screenshot(path=shots / f"card-{name}.png")
    assert page.script_errors == []


def test_refused_card_shows_the_refusal_and_its_reason_only(browser, server, clinical_photos, shots):  # noqa: F811
    """A real ordinary photo of a mole (Derm7pt clinical photo, a case no detector saw): the card
    says it was refused and why, and nothing else: no risk, heat map, differential or photo advice."""
    page = open_page(browser, 1100, 1000)
    page.goto(f"{server}/")
    photo = clinical_photos[0]
    page.set_input_files("input[name=files]", [{"name": photo.name, "mimeType": "image/jpeg", "buffer": photo.read_bytes()}])
    submit_upload(page)
    card = page.query_selector("#results .card.ood")
    assert card is not None
    text = card.inner_text()
    assert REFUSAL_MESSAGE in text and "Refused: no risk given." in text
    assert card.query_selector("[data-refusal]").get_attribute("data-refusal") == "not_dermoscopic"
    for absent in ("img", ".risk", "ol.differential", ".quality", ".disclaimer", "p.unsure", "p.muted"):
        assert card.query_selector(absent) is None, absent
    assert "risk " not in text.lower().replace("no risk given", "") and "%" not in text
    card.screenshot(path=shots / "card-refused.png")
    assert page.script_errors == []
