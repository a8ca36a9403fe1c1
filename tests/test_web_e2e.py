"""The real page in a real headless Chromium against a real server on 127.0.0.1: upload
real ISIC images, read the result cards and heat maps, open the patient view and the
education page, on a desktop and a phone-sized screen. Screenshots go to a tmp folder."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from dermsight.inference.predictor import Predictor
from dermsight.serving.app import create_app
from dermsight.serving.schemas import DECISIONS
import system_deps
from live_server import in_thread

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DISCLAIMER = "Decision support, not a diagnosis."


@pytest.fixture(scope="module")
def server(serving_bundle, tmp_path_factory):
    """The app under uvicorn in a background thread on a free port; yields its base URL."""
    app = create_app(serving_bundle, storage_dir=tmp_path_factory.mktemp("web"), dev=True)
    with in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Chromium under Playwright; without either its tests skip, or fail in CI (system_deps)."""
    chromium = system_deps.chromium()
    sync_api = system_deps.playwright_sync_api()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def open_page(browser, width: int, height: int):
    """A new page that records uncaught script errors (4xx answers are expected and fine)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
            and page.script_errors.append(m.text))
    page.on("response", lambda r: r.status >= 500 and page.script_errors.append(f"{r.status} {r.url}"))
    page.set_default_timeout(20_000)
    return page


def submit_upload(page, status: int = 201) -> None:
    """Click Check and wait for the API's answer (and the page to render it)."""
    with page.expect_response(lambda r: r.url.endswith("/api/images") and r.request.method == "POST") as answer:
        page.click("button[type=submit]")
    assert answer.value.status == status
    page.wait_for_selector("#busy", state="hidden")


def wait_until(page, expression: str, timeout: float = 20.0) -> None:
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function
    polls with eval inside the page, which the app's Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def images_loaded(page, selector: str) -> bool:
    script = "imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"
    return page.eval_on_selector_all(selector, script)


def fits_width(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_desktop_upload_patient_view_and_education(
    browser, server, lesion_images, document_png, serving_bundle, screenshots
):
    page = open_page(browser, 1280, 900)
    page.goto(f"{server}/")
    assert DISCLAIMER in page.inner_text(".banner")

    # A new patient from the upload form (the button asks for a pseudonymous reference).
    page.once("dialog", lambda dialog: dialog.accept("E2E-desktop"))
    page.click("#new-patient")
    wait_until(page, "document.querySelector('select[name=patient_id]').value !== ''")
    patient_id = page.input_value("select[name=patient_id]")

    # Three real lesions with metadata.
    page.set_input_files("input[name=files]", [str(p) for p in lesion_images[:3]])
    page.fill("input[name=age]", "63")
    page.select_option("select[name=sex]", "female")
    page.select_option("select[name=site]", "torso")
    submit_upload(page)
    cards = page.query_selector_all("#results .card")
    assert len(cards) == 3
    for card, path in zip(cards, lesion_images[:3]):
        text = card.inner_text()
        assert path.name in text and DISCLAIMER in text
        assert re.search(r"\d+(\.\d)?%\s+melanoma risk", text), text
        assert sum(DECISIONS[grade] in text for grade in ("urgent", "routine", "not_prompted")) == 1
        assert "Most similar to:" in text
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete)")
    assert images_loaded(page, "#results img") and len(page.query_selector_all("#results img[alt*='heat map']")) == 3
    page.screenshot(path=screenshots / "desktop-results.png", full_page=True)

    # A document page is not a dermoscopic image: no risk, the other card.
    page.set_input_files("input[name=files]", [{"name": "page.png", "mimeType": "image/png", "buffer": document_png}])
    submit_upload(page)
    ood = page.inner_text("#results .card.ood")
    assert "ordinary photo, not a dermoscopic image" in ood and "melanoma risk" not in ood

    # An API error is shown on the page, and nothing is added.
    page.set_input_files("input[name=files]", [str(lesion_images[3])])
    page.fill("input[name=age]", "abc")
    submit_upload(page, 422)
    assert "age 'abc' is not a number" in page.inner_text("#error")
    page.screenshot(path=screenshots / "desktop-error.png", full_page=True)

    # The patient view: every lesion side by side, ranked.
    page.fill("input[name=age]", "63")
    submit_upload(page)
    assert page.is_hidden("#error")
    page.click("#patient-link a")
    page.wait_for_url(f"{server}/patients/{patient_id}")
    page.wait_for_selector("#lesions .card >> nth=4")
    lesions = page.query_selector_all("#lesions .card")
    assert len(lesions) == 5
    assert [re.search(r"Rank (\d+)", card.inner_text()).group(1) for card in lesions] == ["1", "2", "3", "4", "5"]
    assert "ood" in lesions[-1].get_attribute("class")  # no meaningful risk: ranked last
    # This tab uploaded them all: each card names its file (kept in the tab, never on the server).
    names = sorted(card.query_selector(".file-name").inner_text() for card in lesions)
    assert names == sorted(f"File {name}" for name in [p.name for p in lesion_images[:4]] + ["page.png"])
    assert all("ugly-duckling score " in card.inner_text() for card in lesions[:-1])
    risks = [float(re.search(r"([\d.]+)%\s+melanoma risk", card.inner_text()).group(1)) for card in lesions[:-1]]
    assert risks == sorted(risks, reverse=True)
    wait_until(page, "[...document.querySelectorAll('#lesions img')].every(i => i.complete)")
    assert images_loaded(page, "#lesions img")
    page.screenshot(path=screenshots / "desktop-patient.png", full_page=True)
    page.click("button[data-order=ugly_duckling]")
    page.wait_for_selector("#status:has-text('ugly-duckling score')")
    page.click("#rescore")
    page.wait_for_selector("#status:has-text('Re-scored 5 lesions')")

    # The education page, with the bundle's own numbers.
    page.click("nav >> text=Learn")
    page.wait_for_selector("#accuracy")
    auc = Predictor(serving_bundle).bundle.metrics["pooled"]["melanoma"]["auc"]["value"]
    learn = page.inner_text("main")
    assert f"{auc:.2f}" in learn and "ABCDE" in learn and "When to see a dermatologist" in learn
    page.screenshot(path=screenshots / "desktop-learn.png", full_page=True)

    # Deleting the patient from its page.
    page.goto(f"{server}/patients/{patient_id}")
    page.wait_for_selector("#lesions .card")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-patient")
    page.wait_for_url(f"{server}/patients")
    assert "E2E-desktop" not in page.inner_text("main")
    assert page.script_errors == []


def test_phone_sized_screen(browser, server, lesion_images, screenshots):
    page = open_page(browser, 390, 844)
    page.goto(f"{server}/patients")
    page.fill("input[name=reference]", "E2E-phone")
    page.click("#patient-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/patients/\d+$"))
    patient_id = page.url.rsplit("/", 1)[1]

    page.goto(f"{server}/?patient={patient_id}")
    assert page.input_value("select[name=patient_id]") == patient_id
    page.set_input_files("input[name=files]", [str(p) for p in lesion_images[4:6]])
    page.fill("input[name=age]", "35")
    page.select_option("select[name=site]", "lower extremity")
    submit_upload(page)
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete)")
    assert images_loaded(page, "#results img") and DISCLAIMER in page.inner_text("#results .card")
    assert fits_width(page)
    page.screenshot(path=screenshots / "phone-results.png", full_page=True)

    page.click("#patient-link a")
    page.wait_for_selector("#lesions .card >> nth=1")
    wait_until(page, "[...document.querySelectorAll('#lesions img')].every(i => i.complete)")
    assert fits_width(page)
    page.screenshot(path=screenshots / "phone-patient.png", full_page=True)

    page.goto(f"{server}/learn")
    assert fits_width(page)
    page.screenshot(path=screenshots / "phone-learn.png", full_page=True)
    assert page.script_errors == []
