"""Every page as a clinician's browser sees it, in a real headless Chromium against a real server
running the committed bundle: the API documentation works with every request outside loopback
blocked, every page fits a 390 px phone and a 1,366 px laptop without sideways scrolling."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from dermsight.models.bundle import DEFAULT_BUNDLE
from dermsight.serving.app import create_app
from live_server import in_thread
from test_web_e2e import browser, open_page  # noqa: F401

LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app(DEFAULT_BUNDLE, storage_dir=tmp_path_factory.mktemp("pages"), dev=True)
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
