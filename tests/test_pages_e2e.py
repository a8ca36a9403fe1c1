"""Every page as a clinician's browser sees it, in a real headless Chromium against a real server
running the committed bundle: the API documentation works with every request outside loopback
blocked, every page fits a 390 px phone and a 1,366 px laptop without sideways scrolling."""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from dermsight.models.bundle import DEFAULT_BUNDLE
from dermsight.serving.app import create_app
import system_deps
from live_server import in_thread
from test_security import Capture, database_bytes
from test_web_e2e import browser, open_page, submit_upload, wait_until  # noqa: F401

LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(DEFAULT_BUNDLE, storage_dir=tmp_path_factory.mktemp("pages"), dev=True)


@pytest.fixture(scope="module")
def server(app):
    with in_thread(app) as url:
        yield url


def offline(page) -> list[str]:
    """Abort every request of `page` to a host outside loopback (as on a hospital network that
    reaches no CDN); returns the list the aborted URLs are added to."""
    blocked: list[str] = []

    def route(request_route):
        url = request_route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname in LOOPBACK:
            request_route.continue_()
        else:
            blocked.append(url)
            request_route.abort()

    page.route("**/*", route)
    return blocked


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_render_offline(browser, server, path):  # noqa: F811
    page = open_page(browser, 1366, 900)
    blocked = offline(page)
    page.goto(f"{server}{path}")
    if path == "/docs":  # Swagger UI: one block per operation, e.g. POST /api/images
        page.wait_for_selector(".opblock-summary-path[data-path='/api/images']")
        operations = page.locator(".opblock").count()
    else:  # ReDoc: a section per operation
        page.wait_for_selector("h2:has-text('Upload Images')")
        operations = page.locator("[data-section-id*='/operation/']").count()
    assert operations >= 10
    # Nothing left loopback. ReDoc's footer always asks for Redocly's logo from its CDN: the
    # Content-Security-Policy refuses that before any request (the footer drops the image).
    refused = [e for e in page.script_errors if "violates the following Content Security Policy" in e]
    assert blocked == [] and len(refused) == len(page.script_errors)
    assert all("cdn.redoc.ly/redoc/logo-mini.svg" in e for e in refused) and (path == "/redoc" or not refused)


# Elements that stick out past the window's right edge, other than inside a box that scrolls or clips them.
OVERFLOWING = """() => {
  const clipped = (e) => { for (let a = e.parentElement; a && a !== document.body; a = a.parentElement)
    if (getComputedStyle(a).overflowX !== 'visible') return true; return false; };
  return [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1 && !clipped(e))
    .slice(0, 5).map(e => e.tagName + '.' + e.className + ': ' + (e.textContent || '').slice(0, 60));
}"""


@pytest.fixture(scope="module")
def patient_url(server, lesion_images) -> str:
    """A patient with three real lesions, stored through the API."""
    with httpx.Client(base_url=server, timeout=120) as client:
        patient = client.post("/api/patients", json={"reference": "P-LAYOUT-0042"}).json()
        files = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in lesion_images[:3]]
        answer = client.post("/api/images", files=files, data={"patient_id": str(patient["id"]), "age": "61"})
        assert answer.status_code == 201, answer.text
    return patient["url"]


# Pages README shows ($DERMSIGHT_SCREENSHOTS=docs/screenshots), by (path, width).
SCREENSHOTS = {("patient", 390): "phone-patient.png", ("/learn", 390): "phone-learn.png", ("/docs", 1366): "docs.png"}


@pytest.mark.parametrize("width", [390, 1366])
def test_every_page_fits_the_screen(browser, server, patient_url, width):  # noqa: F811
    """No page scrolls sideways: wide tables scroll inside their own box (.scroll-x)."""
    page = open_page(browser, width, 844 if width == 390 else 900)
    for path, ready in [
        ("/", "form#upload-form"), ("/patients", "ul.patients"), (patient_url, "#lesions .card >> nth=2"),
        ("/learn", "#accuracy"), ("/docs", ".opblock"), ("/redoc", "h2:has-text('Upload Images')"),
    ]:
        page.goto(f"{server}{path}")
        page.wait_for_selector(ready)
        wide = page.evaluate(OVERFLOWING)
        width_seen = page.evaluate("document.documentElement.scrollWidth")
        assert width_seen <= width and wide == [], f"{path} at {width} px: {width_seen} px wide; {wide}"
        if path == patient_url:  # an upload time is one unbroken token ("2026-/12-07" split it on a phone)
            lines_per_time = page.eval_on_selector_all(
                "#lesions .context .nowrap", "spans => spans.map(s => new Set([...s.getClientRects()].map(r => r.top)).size)")
            assert len(lines_per_time) >= 3 and set(lines_per_time) == {1}, lines_per_time
        shot = SCREENSHOTS.get((path if path != patient_url else "patient", width))
        if shot and os.environ.get("DERMSIGHT_SCREENSHOTS"):
            page.wait_for_timeout(500)  # the cards' images
            page.screenshot(path=Path(os.environ["DERMSIGHT_SCREENSHOTS"]) / shot, full_page=shot != "docs.png")


AXE = Path(__file__).parent / "js" / "node_modules" / "axe-core" / "axe.min.js"  # npm ci --prefix tests/js


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.exists():
        system_deps.unavailable(f"axe-core is not installed at {AXE} (scripts/test.sh runs npm ci --prefix tests/js)")
    return AXE.read_text()


def serious_violations(page, axe_source: str) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now."""
    page.add_script_tag(content=axe_source)
    result = page.evaluate("async () => (await axe.run(document)).violations"
                           ".filter(v => ['serious', 'critical'].includes(v.impact))"
                           ".map(v => v.id + ': ' + v.help + ' @ ' + v.nodes.slice(0, 3).map(n => n.target).join(' | '))")
    return result


def test_every_page_passes_axe_and_works_from_the_keyboard(browser, server, patient_url, lesion_images, axe_source):  # noqa: F811
    # The app's Content-Security-Policy refuses inline scripts; this context lets the test add axe-core's.
    context = browser.new_context(bypass_csp=True, viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    found = {}
    for path, ready in [
        (patient_url, "#lesions .card >> nth=2"), ("/patients", "ul.patients"), ("/learn", "#accuracy"),
        ("/redoc", "h2:has-text('Upload Images')"), ("/docs", ".opblock"), ("/", "form#upload-form"),
    ]:
        page.goto(f"{server}{path}")
        page.wait_for_selector(ready)
        if path == "/docs":  # the upload's form, ready to try, beside the open schemas (static/docs.js, docs.css)
            page.click(".opblock-summary-path[data-path='/api/images']")
            page.click(".opblock.is-open .try-out__btn")
            page.wait_for_selector(".opblock.is-open input[type=file]")
            page.wait_for_selector(".models .json-schema-2020-12-expand-deep-button")
        found[path] = serious_violations(page, axe_source)
    # The upload page with its results: a stored lesion's card and a left-out file's card.
    lesion = lesion_images[0].read_bytes()
    page.set_input_files("input[name=files]", [
        {"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": lesion[: len(lesion) // 2]},
        {"name": lesion_images[0].name, "mimeType": "image/jpeg", "buffer": lesion},
    ])
    page.focus("button[type=submit]")
    with page.expect_response(lambda r: r.url.endswith("/api/images")) as answer:
        page.keyboard.press("Enter")  # the form is sent from the keyboard
    assert answer.value.status == 207
    page.wait_for_selector("#results .card .meaning")
    found["/ with results"] = serious_violations(page, axe_source)
    assert {path: v for path, v in found.items() if v} == {}
    # Keyboard: Tab reaches "Which images" on the card, and Enter opens it.
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent === 'Which images'"):
            break
    else:
        pytest.fail("Tab never reached the card's 'Which images'")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.parentElement.open")
    context.close()


def test_mixed_upload_shows_a_card_per_file_and_stores_only_the_good_one(browser, server, app, lesion_images):  # noqa: F811
    storage = app.state.storage
    before = storage.counts()
    lesion = lesion_images[1].read_bytes()
    page = open_page(browser, 390, 844)
    page.goto(f"{server}/")
    page.set_input_files("input[name=files]", [
        {"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": lesion[: len(lesion) // 2]},
        {"name": lesion_images[1].name, "mimeType": "image/jpeg", "buffer": lesion},
    ])
    submit_upload(page, 207)
    bad, good = page.query_selector_all("#results .card")
    assert "rejected" in bad.get_attribute("class") and "cut.jpg" in bad.inner_text()
    assert "Not scored, not stored" in bad.inner_text() and "corrupt or truncated JPEG" in bad.inner_text()
    assert lesion_images[1].name in good.inner_text() and good.get_attribute("data-prediction-id")
    assert page.is_hidden("#error")
    after = storage.counts()
    assert (after["images"] - before["images"], after["predictions"] - before["predictions"]) == (1, 1)
    assert page.script_errors == []


def test_patient_view_names_each_lesion_and_explains_its_score(browser, server, patient_url, lesion_images):  # noqa: F811
    page = open_page(browser, 1366, 900)
    page.goto(f"{server}{patient_url}")
    page.wait_for_selector("#lesions .card >> nth=2")
    # Stored through the API: no browser tab here uploaded them, so no file name (the next test).
    assert all(re.fullmatch(r"Lesion \d+", h.inner_text()) for h in page.query_selector_all("#lesions .card h3"))
    assert all("File name not known here" in p.inner_text() for p in page.query_selector_all("#lesions .file-name"))
    lines = [p.inner_text() for p in page.query_selector_all("#lesions .card .context")]
    assert all(re.search(r"uploaded \d{4}-\d\d-\d\d \d\d:\d\d", line) for line in lines), lines
    scored = [(float(m.group(1)), line) for line in lines if (m := re.search(r"ugly-duckling score (-?[\d.]+)", line))]
    assert len(scored) >= 2 and min(score for score, _ in scored) < 0  # z-scores around the patient's average
    for score, line in scored:
        assert ("(typical for this patient)" in line) == (score <= 0)
    assert "a negative score means more typical than the average lesion" in page.inner_text("main")
    # HAM10000's photos are 4:3: the heat map (over the squashed square the network read) is shown in the photo's
    # own frame, beside the whole photo, so the two line up.
    wait_until(page, "[...document.querySelectorAll('#lesions img')].every(i => i.complete)")
    for card in page.query_selector_all("#lesions .card:not(.ood)"):
        photo, heat = (card.query_selector(f".pictures img[alt*='{alt}']").bounding_box() for alt in ("lesion", "heat map"))
        natural = card.eval_on_selector(".pictures img", "i => i.naturalWidth / i.naturalHeight")
        assert abs(natural - 4 / 3) < 0.01
        assert abs(photo["width"] / photo["height"] - natural) < 0.02 and abs(heat["width"] / heat["height"] - natural) < 0.02


# Uploaded with names that carry a patient's name, record number and birth date.
PHI_NAMES = ("Jane_Doe_MRN7Q4X_back.jpg", "Doe-J 1961-02-03 left arm.jpg")


def test_patient_view_shows_file_names_the_server_never_keeps(browser, server, app, lesion_images):  # noqa: F811
    """Real images uploaded to a patient from the page: the patient view of that browser tab shows each lesion's
    file name (kept in the tab's sessionStorage) and the server's upload time; another browser shows the time and
    no name; the database, stored files and logs hold no file name; an image id reused after a delete (SQLite)
    never shows the deleted file's name."""
    capture = Capture()
    loggers = [logging.getLogger(name) for name in ("", "dermsight", "uvicorn", "uvicorn.error", "uvicorn.access",
                                                     "fastapi", "python_multipart", "PIL")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
    try:
        client = httpx.Client(base_url=server, timeout=120)
        patient = client.post("/api/patients", json={"reference": "P-FILES-0007"}).json()
        page = open_page(browser, 1366, 900)
        page.goto(f"{server}/?patient={patient['id']}")
        page.set_input_files("input[name=files]", [
            {"name": name, "mimeType": "image/jpeg", "buffer": path.read_bytes()}
            for name, path in zip(PHI_NAMES, lesion_images[3:5])
        ])
        before = datetime.now(UTC)
        with page.expect_response(lambda r: r.url.endswith("/api/images") and r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        assert answer.value.status == 201
        named = {p["id"]: name for p, name in zip(answer.value.json()["predictions"], PHI_NAMES)}
        page.click("#patient-link a")
        page.wait_for_selector("#lesions .card >> nth=1")
        lesions = client.get(f"/api/patients/{patient['id']}").json()["lesions"]
        assert {lesion["prediction"]["id"] for lesion in lesions} == set(named)
        local = timezone(timedelta(minutes=-page.evaluate("new Date().getTimezoneOffset()")))
        for lesion in lesions:
            card = page.query_selector(f"#lesions .card[data-prediction-id='{lesion['prediction']['id']}']")
            assert card.query_selector(".file-name").inner_text() == f"File {named[lesion['prediction']['id']]}"
            uploaded = datetime.fromisoformat(lesion["uploaded_at"])  # the server's clock
            assert timedelta(0) <= uploaded - before < timedelta(minutes=2)
            shown = card.query_selector(".context").inner_text()
            assert f"uploaded {uploaded.astimezone(local):%Y-%m-%d %H:%M}" in shown

        # Another browser (another clinician, or this one after the tab closed): the times, never the names.
        other = browser.new_context(viewport={"width": 1366, "height": 900})
        elsewhere = other.new_page()
        elsewhere.goto(f"{server}/patients/{patient['id']}")
        elsewhere.wait_for_selector("#lesions .card >> nth=1")
        text = elsewhere.inner_text("main")
        assert text.count("File name not known here") == 2 and len(re.findall(r"uploaded \d{4}-\d\d-\d\d", text)) == 2
        assert not any(name in text for name in PHI_NAMES)
        other.close()

        # SQLite hands a deleted last row's id to the next image: the tab's entry for it must not name the new one.
        reused = max(named)
        image_id = client.get(f"/api/predictions/{reused}").json()["image_id"]
        assert client.delete(f"/api/images/{image_id}").status_code == 204
        again = client.post("/api/images", data={"patient_id": str(patient["id"])},
                            files=[("files", ("x.jpg", lesion_images[5].read_bytes(), "image/jpeg"))])
        assert again.status_code == 201 and again.json()["predictions"][0]["image_id"] == image_id
        page.reload()
        page.wait_for_selector("#lesions .card >> nth=1")
        lines = sorted(p.inner_text() for p in page.query_selector_all("#lesions .file-name"))
        assert lines[0] == f"File {named[min(named)]}" and lines[1].startswith("File name not known here")
        assert page.script_errors == []
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(capture)
            logger.setLevel(level)
    assert any("upload scored" in line for line in capture.lines)  # the capture saw the app's own logs
    storage = app.state.storage
    database = database_bytes(storage.engine.url.render_as_string(hide_password=False))
    stored = b"".join(p.read_bytes() for p in storage.files_dir.rglob("*") if p.is_file())
    logs = "\n".join(capture.lines)
    for name in PHI_NAMES:
        for part in (name, name.split(".")[0], "MRN7Q4X", "1961-02-03"):
            assert part.encode() not in database, f"{part!r} in the database"
            assert part.encode() not in stored, f"{part!r} in the stored files"
            assert part not in logs, f"{part!r} in the logs"
