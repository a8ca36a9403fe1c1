"""The service on a clinic network: hostile input, PHI, access control, and the browser
page behind a key. Real ISIC images; DICOM and EXIF built from them. In-process
(TestClient) where that shows the behaviour, a real uvicorn on 127.0.0.1 where only the
wire does (lying lengths, stalled bodies, un-normalised paths), and a real Chromium for
the sign-in page. The tests where the database matters (keys, what a refused upload
leaves, deletes, PHI in the rows) run on SQLite and on PostgreSQL; the rest on SQLite."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import system_deps
from fastapi.testclient import TestClient
from live_server import in_thread, raw_request, status_of
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import create_engine, inspect, make_url, text
from test_dicom_tfrecord import dicom_bytes
from typer.testing import CliRunner

from dermsight.cli import app as cli
from dermsight.imaging.decode import ImageError, decode_image
from dermsight.imaging.sanitize import sanitize_image
from dermsight.serving.app import create_app
from dermsight.serving.limits import Settings
from dermsight.serving.security import KEY_PATTERN, TokenBucket, create_api_key, hash_key
from dermsight.serving.storage.models import NotFound

CLINIC = "https://clinic.example"
MARKERS = ("Doe^Jane", "Jane", "7Q4X", "MRN-7Q4X-11", "19610203", "St Marker Hospital", "Who^Doctor")
# The tests where the backend matters take `secure` on each backend; the others get it on SQLite.
on_both_backends = pytest.mark.parametrize("secure", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="module")
def secure(serving_bundle, new_database, tmp_path_factory, request):
    """The app as `dermsight serve` runs it without --dev (API keys required), with a CORS
    allow-list of one clinic origin, on a fresh database (SQLite unless parametrised)."""
    backend = getattr(request, "param", "sqlite")
    folder = tmp_path_factory.mktemp(f"secure-{backend}")
    app = create_app(serving_bundle, new_database(backend, folder), storage_dir=folder,
                     settings=Settings(cors_origins=(CLINIC,)))
    with TestClient(app) as client:
        yield client
    app.state.storage.engine.dispose()


@pytest.fixture(scope="module")
def storage(secure):
    return secure.app.state.scorer.storage


@pytest.fixture(scope="module")
def key(storage) -> str:
    return create_api_key(storage, "clinic test", role="admin")


@pytest.fixture(scope="module")
def auth(key) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def live(serving_bundle, tmp_path_factory):
    """A real server on 127.0.0.1 with default settings (no --dev, no CORS), and a key."""
    app = create_app(serving_bundle, storage_dir=tmp_path_factory.mktemp("live"))
    key = create_api_key(app.state.scorer.storage, "live test", role="admin")
    with in_thread(app) as url:
        yield url, key, app


@pytest.fixture(scope="module")
def lesion(lesion_images) -> bytes:
    return lesion_images[0].read_bytes()


def upload(client, files, headers, **form):
    parts = [("files", (name, data, mime)) for name, data, mime in files]
    return client.post("/api/images", files=parts, data={k: str(v) for k, v in form.items()}, headers=headers)


def database_bytes(url: str) -> bytes:
    """Everything the database at `url` holds: SQLite's files (with its write-ahead log), or
    every row of every PostgreSQL table as text."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        return b"".join(path.read_bytes() for path in Path(url.database).parent.glob(f"{Path(url.database).name}*"))
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            tables = inspect(connection).get_table_names()
            rows = [row for table in tables for row in connection.execute(text(f'SELECT t::text FROM "{table}" t'))]
    finally:
        engine.dispose()
    assert rows, "no rows in the database"
    return "\n".join(row[0] for row in rows).encode()


def store_snapshot(storage) -> tuple[dict, set[str]]:
    files = {str(p.relative_to(storage.files_dir)) for p in storage.files_dir.rglob("*") if p.is_file()}
    return storage.counts(), {f for f in files if f.startswith(("images/", "heatmaps/"))}


# -- access: keys, sessions, rate limits, CORS, headers ---------------------------------------


def test_api_needs_a_valid_key(secure, key, storage):
    assert KEY_PATTERN.fullmatch(key)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": key[:-1] + ("A" if key[-1] != "A" else "B")},
                    {"Authorization": f"Basic {key}"}):
        response = secure.get("/api/patients", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert "API key required" in secure.get("/api/patients").json()["detail"]
    assert secure.get("/api/patients", headers={"Authorization": "Bearer nope"}).json()["detail"] == (
        "invalid or revoked API key")
    assert secure.get("/api/patients", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert secure.get("/api/patients", headers={"X-API-Key": key}).status_code == 200
    # Public: health (for load balancers), the education page, the docs, static files, sign-in.
    for url in ("/api/health", "/learn", "/docs", "/openapi.json", "/static/app.js", "/login"):
        assert secure.get(url).status_code == 200, url
    schema = secure.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    # Pages with patient data send a browser to sign in; an API client gets 401.
    page = secure.get("/patients", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fpatients"
    assert secure.get("/patients/1").status_code == 401
    # Deny by default: an unknown path is no way around the key.
    assert secure.get("/api/nothing-here").status_code == 401


@on_both_backends
def test_keys_are_stored_hashed_and_revocable(secure, storage, new_database, tmp_path, monkeypatch):
    data_dir = tmp_path / "store"
    database_url = new_database(storage.backend, data_dir)
    monkeypatch.setenv("DERMSIGHT_DATABASE_URL", database_url)  # `dermsight keys` on the same backend
    created = CliRunner().invoke(cli, ["keys", "create", "dr-who", "--data-dir", str(data_dir)])
    assert created.exit_code == 0, created.output
    new_key = created.stdout.strip().splitlines()[0]
    assert KEY_PATTERN.fullmatch(new_key)
    listed = CliRunner().invoke(cli, ["keys", "list", "--data-dir", str(data_dir)])
    prefix = KEY_PATTERN.fullmatch(new_key).group(1)
    assert "dr-who" in listed.stdout and prefix in listed.stdout and new_key not in listed.stdout
    database = database_bytes(database_url)
    assert new_key.encode() not in database and hash_key(new_key).encode() in database

    # Revocation on a running server: within the key cache's few seconds (here: at once).
    monkeypatch.setattr("dermsight.serving.security.KEY_CACHE_SECONDS", 0.0)
    other = create_api_key(storage, "to revoke", role="read")
    assert secure.get("/api/patients", headers={"X-API-Key": other}).status_code == 200
    assert [k.name for k in storage.revoke_api_keys("to revoke")] == ["to revoke"]
    assert secure.get("/api/patients", headers={"X-API-Key": other}).status_code == 401
    revoked = CliRunner().invoke(cli, ["keys", "revoke", "dr-who", "--data-dir", str(data_dir)])
    assert revoked.exit_code == 0 and "revoked key 1" in revoked.stdout
    assert CliRunner().invoke(cli, ["keys", "revoke", "dr-who", "--data-dir", str(data_dir)]).exit_code == 1
    assert "dr-who" in CliRunner().invoke(cli, ["keys", "list", "--data-dir", str(data_dir)]).stdout


def test_browser_session_cookie(secure, key):
    browser = TestClient(secure.app, base_url="http://testserver")
    refused = browser.post("/login", data={"key": "dsk_wrong", "next": "/patients"})
    assert refused.status_code == 401 and "not valid" in refused.text and "set-cookie" not in refused.headers
    signed = browser.post("/login", data={"key": key, "next": "/patients"}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/patients"
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and key not in cookie
    assert browser.get("/patients").status_code == 200 and "Sign out" in browser.get("/patients").text
    assert browser.get("/api/patients").status_code == 200
    # Unsafe requests with the cookie must come from the page's own script (its custom header), never
    # from another origin; a form or fetch of another site cannot add the header without a preflight.
    page_header = {"X-Requested-With": "DermSight"}
    assert browser.post("/api/patients", json={}).status_code == 403
    assert browser.post("/api/patients", json={}, headers={"Origin": "http://testserver"}).status_code == 403
    for origin, status in (("https://evil.example", 403), ("null", 201), ("http://testserver", 201)):
        assert browser.post("/api/patients", json={}, headers={**page_header, "Origin": origin}).status_code == status
    assert browser.post("/login", data={"key": key}, headers={"Origin": "https://evil.example"}).status_code == 403
    # The sign-in page escapes what it echoes.
    echoed = browser.get('/login?next=/"><script>alert(1)</script>').text
    assert "<script>alert(1)" not in echoed and "&lt;script&gt;" in echoed
    # No open redirect after signing in.
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example"):
        again = browser.post("/login", data={"key": key, "next": target}, follow_redirects=False)
        assert again.headers["location"] == "/", target
    token = browser.cookies["dermsight_session"]
    browser.post("/logout")
    assert browser.get("/api/patients").status_code == 401 and "dermsight_session" not in browser.cookies
    replayed = secure.get("/api/patients", headers={"Cookie": f"dermsight_session={token}"})
    assert replayed.status_code == 401 and replayed.json()["detail"].startswith("session expired")


def test_rate_limits_answer_429_with_retry_after(secure, storage, monkeypatch):
    limiter = secure.app.state.rate_limiter
    monkeypatch.setattr(limiter, "rate", 0.2)
    monkeypatch.setattr(limiter, "burst", 3.0)
    first, second = create_api_key(storage, "burst one", role="read"), create_api_key(storage, "burst two", role="read")
    answers = [secure.get("/api/patients", headers={"X-API-Key": first}).status_code for _ in range(4)]
    assert answers == [200, 200, 200, 429]
    limited = secure.get("/api/patients", headers={"X-API-Key": first})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "rate limit exceeded" in limited.json()["detail"]
    assert secure.get("/api/patients", headers={"X-API-Key": second}).status_code == 200  # per key

    login = secure.app.state.failures.by_address
    monkeypatch.setattr(login, "burst", 2.0)
    monkeypatch.setattr(login, "rate", 0.01)
    login._buckets.clear()
    tries = [secure.post("/login", data={"key": "dsk_guess"}).status_code for _ in range(3)]
    assert tries == [401, 401, 429]


def test_a_flood_of_clients_never_resets_a_limited_one(secure, monkeypatch):
    """Filling the table of buckets with many distinct clients (addresses) must not hand a
    limited client a fresh bucket: only refilled buckets are forgotten, and newcomers to a
    table of busy ones wait for the first refill."""
    limiter = TokenBucket(rate=0.1, burst=3.0, max_clients=100)
    start = 1_000.0
    assert [limiter.take("guesser", start) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("guesser", start) == pytest.approx(10.0)
    flood = [limiter.take(f"10.0.{i // 250}.{i % 250}", start + i / 1000) for i in range(1_000)]
    assert flood[:99] == [0.0] * 99  # room for 99 more clients
    assert all(0 < wait <= 10.0 for wait in flood[99:])  # then newcomers wait for the first refill
    assert len(limiter._buckets) == 100 and "guesser" in limiter._buckets
    assert limiter.take("guesser", start + 1.5) == pytest.approx((1 - 0.15) / 0.1)  # still limited
    later = start + 10.2  # the flood's first 99 buckets have refilled; the guesser's has not
    assert limiter.take("newcomer", later) == 0.0
    assert len(limiter._buckets) == 2 and limiter.take("guesser", later) == 0.0  # the one token it earned back
    assert limiter.take("guesser", later) > 0

    login = secure.app.state.failures.by_address
    monkeypatch.setattr(login, "burst", 2.0)
    monkeypatch.setattr(login, "rate", 0.01)
    monkeypatch.setattr(login, "max_clients", 50)
    login._buckets.clear()
    assert [secure.post("/login", data={"key": "dsk_guess"}).status_code for _ in range(3)] == [401, 401, 429]
    for i in range(500):
        login.take(f"192.0.2.{i}")
    assert len(login._buckets) <= 50
    assert secure.post("/login", data={"key": "dsk_guess"}).status_code == 429
    login._buckets.clear()


def test_cors_is_an_allow_list(secure, auth, live):
    allowed = secure.get("/api/patients", headers={**auth, "Origin": CLINIC})
    assert allowed.headers["access-control-allow-origin"] == CLINIC
    preflight = secure.options("/api/images", headers={"Origin": CLINIC, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == CLINIC
    evil = secure.get("/api/patients", headers={**auth, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers
    # Closed by default: the live server has no allow-list.
    url, key, _ = live
    for response in (httpx.get(f"{url}/api/health", headers={"Origin": CLINIC}),
                     httpx.options(f"{url}/api/images", headers={"Origin": CLINIC,
                                                                  "Access-Control-Request-Method": "POST"})):
        assert "access-control-allow-origin" not in response.headers


def test_security_headers_everywhere(secure, auth):
    responses = {
        "page": secure.get("/learn"), "api": secure.get("/api/patients", headers=auth),
        "401": secure.get("/api/patients"), "404": secure.get("/api/images/99999", headers=auth),
        "422": secure.post("/api/images", headers=auth),
        "static": secure.get("/static/app.css"), "docs": secure.get("/docs"),
    }
    for name, response in responses.items():
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["x-frame-options"] == "DENY", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert "camera=()" in headers["permissions-policy"], name
        assert "default-src 'self'" in headers["content-security-policy"], name
        assert "frame-ancestors 'none'" in headers["content-security-policy"], name
        assert (headers.get("cache-control") == "no-store") == (name != "static"), name
    assert "unsafe-inline" not in responses["page"].headers["content-security-policy"]
    docs_csp = responses["docs"].headers["content-security-policy"]
    assert "http" not in docs_csp and "script-src 'self';" in docs_csp  # its own scripts only, no CDN
    assert responses["422"].status_code == 422


# -- input hardening ----------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims another size."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    return jpeg[:2] + bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _zip_bytes() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("index.html", "<html><script>alert(1)</script></html>")
    return out.getvalue()


def _png_of(jpeg: bytes, **options) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="PNG", **options)
    return out.getvalue()


def _png_with_text(jpeg: bytes, text: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    return _png_of(jpeg, pnginfo=info)


def _icc_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _with_icc(jpeg: bytes, *extra: bytes) -> bytes:
    """The JPEG with a real sRGB ICC profile in APP2 segments (one, plus one per `extra` text)."""
    parts = [_icc_profile(), *extra]
    for number, part in reversed(list(enumerate(parts, start=1))):
        jpeg = _with_segment(jpeg, 0xE2, b"ICC_PROFILE\x00" + bytes((number, len(parts))) + part)
    return jpeg


def _png_with_iccp(jpeg: bytes, name: bytes, profile: bytes, compressed: bytes | None = None) -> bytes:
    """A PNG of the JPEG with an iCCP chunk of this name and profile, right after IHDR."""
    body = name + b"\x00\x00" + (compressed if compressed is not None else zlib.compress(profile))
    chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
    png = _png_of(jpeg)
    return png[:33] + chunk + png[33:]


HOSTILE = {
    # name: (bytes from the real lesion JPEG, words the 422 detail must contain)
    "empty": (lambda j: b"", "file is empty"),
    "truncated": (lambda j: j[: len(j) // 2], "truncated JPEG"),
    "html named .jpg": (lambda j: b"<!doctype html><script>alert(1)</script>", "not an image"),
    "png 30000x30000": (lambda j: _png_header_only(30000, 30000), "over the 50 megapixel limit"),
    "png 8000x8000": (lambda j: _png_header_only(8000, 8000), "over the 50 megapixel limit"),
    "jpeg declaring 65000x65000": (lambda j: _jpeg_declaring(j, 65000, 65000), "over the 50 megapixel limit"),
    "jpeg declaring 9000x6000": (lambda j: _jpeg_declaring(j, 9000, 6000), "over the 50 megapixel limit"),
    "jpeg + zip": (lambda j: j + _zip_bytes(), "embedded HTML, script or archive"),
    "jpeg + html": (lambda j: j + b"<html><body>hi</body></html>", "embedded HTML, script or archive"),
    "jpeg + 1 KB of data": (lambda j: j + bytes(range(256)) * 4, "bytes of other data after the end"),
    "script in a jpeg comment": (lambda j: _with_segment(j, 0xFE, b"<script>alert(1)</script>"),
                                 "embedded HTML, script or archive"),
    "png + html": (lambda j: _png_of(j) + b"<html></html>", "embedded HTML, script or archive"),
    "script in a png text chunk": (lambda j: _png_with_text(j, "<script>x</script>"), "embedded HTML, script"),
    # Chunks and segments that are kept are scanned too: the ICC profile of a JPEG (APP2), the name
    # and the profile of a PNG's iCCP chunk; "<img" and "<svg/" are tags.
    "<img onerror> in a jpeg icc profile": (
        lambda j: _with_icc(j, b"<img src=x onerror=alert(document.domain)>"), "embedded HTML, script or archive"),
    "<svg/onload> in a jpeg icc profile": (lambda j: _with_icc(j, b"<svg/onload=alert(1)>"), "embedded HTML"),
    "<IMG/SRC> in a jpeg icc profile": (lambda j: _with_icc(j, b"\x00\x01<IMG/SRC=x ONERROR=alert(1)>"),
                                        "embedded HTML"),
    "<svg tab onload> in a jpeg icc profile": (lambda j: _with_icc(j, b"<svg\tonload=alert(1)>"), "embedded HTML"),
    "png icc profile named <script>": (
        lambda j: _png_with_iccp(j, b"<script>alert(1)</script>", _icc_profile()), "embedded HTML, script or archive"),
    "png icc profile named <img>": (lambda j: _png_with_iccp(j, b"<img src=x onerror=alert(1)>", _icc_profile()),
                                    "embedded HTML"),
    "<svg/onload> inside a compressed png icc profile": (
        lambda j: _png_with_iccp(j, b"sRGB", _icc_profile() + b"<svg/onload=alert(1)>"), "embedded HTML"),
    "script in a jpeg JPG0 segment": (lambda j: _with_segment(j, 0xF0, b"<script>alert(1)</script>"),
                                      "embedded HTML, script or archive"),
    "tiff that is no tiff": (lambda j: b"II*\x00" + bytes(300), "corrupt or truncated TIFF"),
}


@on_both_backends
@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_files_are_refused_and_store_nothing(case, secure, auth, storage, lesion):
    build, words = HOSTILE[case]
    before = store_snapshot(storage)
    response = upload(secure, [("lesion.jpg", build(lesion), "image/jpeg")], auth)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"] and response.json()["detail"].startswith("lesion.jpg: ")
    assert not re.search(r"0x[0-9a-f]{6}|object at|<_io", response.json()["detail"])  # no repr, no address
    assert store_snapshot(storage) == before


def test_kept_icc_profiles_are_scanned_not_lost(secure, auth, lesion):
    """A clean ICC profile (JPEG APP2, PNG iCCP) is kept byte for byte; an iCCP chunk whose
    profile does not inflate is dropped (nothing vouches for it) and the picture kept."""
    profile = _icc_profile()
    for data in (_with_icc(lesion), _png_with_iccp(lesion, b"sRGB IEC61966-2.1", profile)):
        kept = sanitize_image(data)
        assert Image.open(io.BytesIO(kept.data)).info["icc_profile"] == profile
    broken = sanitize_image(_png_with_iccp(lesion, b"sRGB", profile, compressed=b"not zlib <at all>"))
    assert b"iCCP" not in broken.data and np.array_equal(decode_image(broken.data), decode_image(lesion))
    response = upload(secure, [("icc.jpg", _with_icc(lesion), "image/jpeg")], auth)
    assert response.status_code == 201, response.text


def test_content_is_sniffed_never_named(secure, auth, storage, lesion):
    """A PNG called .jpg and sent as image/jpeg is a PNG; the name is never a path."""
    png = _png_of(lesion)
    response = upload(secure, [("../../../../tmp/evil.jpg", png, "image/jpeg")], auth)
    assert response.status_code == 201, response.text
    image = secure.get(f"/api/images/{response.json()['predictions'][0]['image_id']}", headers=auth).json()
    assert image["format"] == "png" and image["sha256"] == hashlib.sha256(png).hexdigest()
    served = secure.get(image["file_url"], headers=auth)
    assert served.headers["content-type"] == "image/png" and served.content == png
    assert not Path("/tmp/evil.jpg").exists()
    stored = {p.name for p in (storage.files_dir / "images").iterdir()}
    assert all(re.fullmatch(r"[0-9a-f]{64}", name) for name in stored)  # content hashes only
    heatmaps = {p.name for p in (storage.files_dir / "heatmaps").iterdir()}
    assert all(re.fullmatch(r"[0-9a-f]{64}\.jpg", name) for name in heatmaps)


def test_metadata_is_validated(secure, auth, lesion):
    bad = {"age": ["-1", "121", "abc", "1e3"], "sex": ["robot", "x"], "site": ["moon", "../etc"]}
    for field, values in bad.items():
        for value in values:
            response = upload(secure, [("l.jpg", lesion, "image/jpeg")], auth, **{field: value})
            assert response.status_code == 422, (field, value)
    fine = upload(secure, [("l.jpg", lesion, "image/jpeg")], auth, age="", sex="", site="")
    assert fine.status_code == 201
    assert upload(secure, [("l.jpg", lesion, "image/jpeg")], auth, age="120", sex="F", site="back").status_code == 201


def test_request_size_cap_answers_before_the_body(live):
    url, key, _ = live
    head = (f"POST /api/images HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 104857600\r\n\r\n").encode()
    started = time.monotonic()
    response = raw_request(url, head, timeout=10)  # the 100 MB body is never sent
    assert status_of(response) == 413 and time.monotonic() - started < 5
    assert b"over the 32 MB limit" in response and b"x-content-type-options: nosniff" in response.lower()


def test_chunked_body_over_the_cap_is_cut_off(live, monkeypatch):
    url, key, app = live
    monkeypatch.setattr(app.state.settings, "max_request_bytes", 64 * 1024)
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n" + b"\xff" * 200_000
    parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    request = (f"POST /api/images HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n"
               "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    response = raw_request(url, request)
    assert status_of(response) == 413 and b"request body is over the 64 KB limit" in response


def test_stalled_upload_times_out(live, monkeypatch):
    url, key, app = live
    monkeypatch.setattr(app.state.settings, "body_idle_timeout", 1.0)
    head = (f"POST /api/images HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n").encode()
    started = time.monotonic()
    response = raw_request(url, head + b"--b\r\n", timeout=10)  # then nothing more
    assert status_of(response) == 408 and b"stalled for 1 s" in response
    assert time.monotonic() - started < 5
    monkeypatch.setattr(app.state.settings, "body_idle_timeout", 30.0)
    monkeypatch.setattr(app.state.settings, "body_deadline", 1.0)
    response = raw_request(url, head + b"--b\r\n", then=b"x" * 10, pause=0.5, timeout=10)
    assert status_of(response) == 408 and b"not complete within 1 s" in response


def test_no_path_traversal(live):
    url, key, app = live
    storage = app.state.scorer.storage
    secret = Path(storage.files_dir).parent / "secret.txt"
    secret.write_text("root:x:0:0 secret")
    attempts = [
        "/static/../../../../../../etc/passwd", "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/app.js/../../app.py", "/static/..%5c..%5capp.py",
        "/api/images/..%2F..%2Fetc%2Fpasswd/file", "/api/images/1%2F..%2F..%2Fsecret.txt/file",
        "/api/predictions/../../etc/passwd/heatmap", "/patients/..%2F..%2Fetc%2Fpasswd",
        f"/static/{'..%2f' * 8}{str(secret).lstrip('/')}",
    ]
    for path in attempts:
        response = raw_request(url, f"GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n".encode())
        assert status_of(response) in (400, 404, 422), (path, response[:200])
        assert b"root:" not in response and b"import" not in response, path
    for relative in ("../secret.txt", "images/../../secret.txt", "/etc/passwd", ""):
        with pytest.raises(NotFound):
            storage.file(relative)


@on_both_backends
def test_deleting_a_patient_removes_its_files(secure, auth, storage, lesion_images):
    patient = secure.post("/api/patients", json={"reference": "P-del"}, headers=auth).json()["id"]
    files = [(name, lesion_images[i].read_bytes(), "image/jpeg") for name, i in (("a.jpg", 4), ("b.jpg", 5))]
    body = upload(secure, files, auth, patient_id=patient).json()
    paths = []
    for prediction in body["predictions"]:
        assert secure.get(prediction["heatmap_url"], headers=auth).status_code == 200  # drawn and stored
        image = storage.get_image(prediction["image_id"])
        paths += [storage.file(image.path), storage.file(storage.get_prediction(prediction["id"]).heatmap_path)]
    assert all(p.exists() for p in paths)
    assert secure.delete(f"/api/patients/{patient}", headers=auth).status_code == 204
    assert not any(p.exists() for p in paths)
    assert secure.get(f"/api/patients/{patient}", headers=auth).status_code == 404


# -- PHI ------------------------------------------------------------------------------------------


def phi_dicom(jpeg: bytes, **extra) -> bytes:
    """A DICOM of the real JPEG with identifying data of every kind: names, ids, dates, free text, private tags."""
    tags = {
        "PatientName": "Doe^Jane", "PatientID": "MRN-7Q4X-11", "PatientBirthDate": "19610203", "PatientSex": "F",
        "PatientAge": "063Y", "InstitutionName": "St Marker Hospital", "ReferringPhysicianName": "Who^Doctor",
        "StudyDate": "20240102", "StudyTime": "101010", "AccessionNumber": "ACC7Q4X", "StudyID": "S7Q4X",
        "OperatorsName": "Op^7Q4X", "DeviceSerialNumber": "SN7Q4X", "ImageComments": "Jane's mole, 7Q4X",
        "InstitutionAddress": "1 Marker Street 7Q4X", "BodyPartExamined": "TORSO", **extra,
    }
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(jpeg, compressed=True, tags=tags)))
    block = dataset.private_block(0x0011, "CLINIC 7Q4X", create=True)
    block.add_new(0x01, "LO", "Doe^Jane private 7Q4X")
    item = Dataset()
    item.PerformingPhysicianName = "Who^Doctor"
    item.CodeValue = "T-D0050"
    dataset.AnatomicRegionSequence = Sequence([item])
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Capture(logging.Handler):
    """Every log record of the loggers it is added to, formatted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_only_the_pixels_of_a_dicom_are_kept(lesion):
    """No DICOM header is stored, so none is de-identified: what is kept of a DICOM full
    of patient data is a PNG of its pixels and nothing else (no text chunk, no value of
    the header, the original UIDs and private tags included)."""
    data = phi_dicom(lesion)
    original = pydicom.dcmread(io.BytesIO(data))
    header = list(MARKERS) + ["ACC7Q4X", "SN7Q4X", "S7Q4X", "Op^7Q4X", "CLINIC", "Marker Street", "063Y", "20240102",
                              "101010", "TORSO", "T-D0050"]
    header += [str(original[uid].value) for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    assert all(value.encode() in data for value in header)  # the upload carries them all
    kept = sanitize_image(data, name="Jane_Doe_7Q4X.dcm")
    assert (kept.format, kept.original_format) == ("png", "dicom")
    for value in header:
        assert value.encode() not in kept.data, value
    assert b"DICM" not in kept.data
    png = Image.open(io.BytesIO(kept.data))
    assert not png.info and not png.getexif() and not getattr(png, "text", {})
    chunks, pos = [], 8
    while pos < len(kept.data):
        length, kind = struct.unpack(">I4s", kept.data[pos : pos + 8])
        chunks.append(kind)
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    assert np.array_equal(decode_image(kept.data), original.pixel_array)
    with pytest.raises(ImageError, match="burned-in annotation"):
        sanitize_image(phi_dicom(lesion, BurnedInAnnotation="YES"))
    assert sanitize_image(phi_dicom(lesion, BurnedInAnnotation="NO")).data == kept.data


@on_both_backends
def test_dicom_phi_never_reaches_logs_database_or_storage(secure, auth, storage, lesion, capfd):
    data = phi_dicom(lesion)
    assert all(marker.encode() in data for marker in MARKERS)
    capture = Capture()
    loggers = [logging.getLogger(name) for name in ("", "dermsight", "uvicorn", "uvicorn.error", "uvicorn.access",
                                                     "pydicom", "python_multipart", "PIL", "fastapi")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            response = upload(secure, [("Jane_Doe_7Q4X.dcm", data, "application/dicom")], auth, age="63")
            refused = upload(secure, [("Jane_Doe_7Q4X.dcm", phi_dicom(lesion, BurnedInAnnotation="YES"),
                                       "application/dicom")], auth)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(capture)
            logger.setLevel(level)
    assert response.status_code == 201, response.text
    assert refused.status_code == 422 and "burned-in annotation" in refused.json()["detail"]
    (prediction,) = response.json()["predictions"]
    image = secure.get(f"/api/images/{prediction['image_id']}", headers=auth).json()
    assert image["format"] == "png"  # only the pixels are kept
    served = secure.get(image["file_url"], headers=auth)
    assert served.headers["content-type"] == "image/png"
    assert np.array_equal(decode_image(served.content), decode_image(data))
    assert any("upload scored" in line for line in capture.lines)  # the capture did see the app's logs

    output = capfd.readouterr()
    logs = "\n".join(capture.lines + [str(w.message) for w in caught] + [output.out, output.err])
    database = database_bytes(storage.engine.url.render_as_string(hide_password=False))
    stored = b"".join(p.read_bytes() for f in ("images", "heatmaps") for p in (storage.files_dir / f).iterdir())
    for marker in MARKERS:
        assert marker not in logs, f"{marker!r} in the logs"
        assert marker.encode() not in database, f"{marker!r} in the database"
        assert marker.encode() not in stored, f"{marker!r} in the stored files"
        assert marker not in response.text
    assert "Jane_Doe" not in logs


def test_exif_gps_is_stripped_losslessly(secure, auth, lesion):
    """A real JPEG with EXIF (GPS position, camera, orientation) injected via Pillow: the
    stored file is the same JPEG with an EXIF holding only the orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: must survive, or the stored image would lie on its side
    exif[0x010F], exif[0x0110], exif[0x9003] = "SecretCam", "Model 7Q4X", "2024:01:02 10:10:10"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)})
    payload = exif.tobytes()
    tagged = lesion[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + lesion[2:]
    assert Image.open(io.BytesIO(tagged)).getexif().get_ifd(0x8825)[2] == (52.0, 22.0, 1.5)

    response = upload(secure, [("gps.jpg", tagged, "image/jpeg")], auth)
    assert response.status_code == 201, response.text
    image = secure.get(f"/api/images/{response.json()['predictions'][0]['image_id']}", headers=auth).json()
    stored = secure.get(image["file_url"], headers=auth).content
    expected = hashlib.sha256(sanitize_image(tagged).data).hexdigest()
    assert hashlib.sha256(stored).hexdigest() == image["sha256"] == expected
    kept = Image.open(io.BytesIO(stored)).getexif()
    assert dict(kept) == {0x0112: 6} and not kept.get_ifd(0x8825)
    for secret in (b"SecretCam", b"7Q4X", b"2024:01:02"):
        assert secret not in stored
    assert np.array_equal(decode_image(stored), decode_image(tagged))  # upright, pixel for pixel
    assert (image["width"], image["height"]) == (150, 200)
    # The image data itself is untouched: removing the orientation block gives back the original JPEG.
    app1 = stored.index(b"\xff\xe1")
    length = struct.unpack(">H", stored[app1 + 2 : app1 + 4])[0]
    assert stored[:app1] + stored[app1 + 2 + length :] == lesion


# -- the page behind a key, in a real browser ---------------------------------------------------


def test_sign_in_page_in_a_browser(live, lesion_images):
    chromium = system_deps.chromium()  # skips without it, fails in CI
    sync_api = system_deps.playwright_sync_api()
    from test_web_e2e import CHROMIUM_ARGS, wait_until

    url, key, _ = live
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            problems = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.set_default_timeout(20_000)
            page.goto(f"{url}/patients")
            assert page.url == f"{url}/login?next=%2Fpatients"
            page.fill("input[name=key]", "dsk_wrong")
            page.click("#login-form button[type=submit]")
            assert "not valid" in page.inner_text("#error")
            page.fill("input[name=key]", key)
            page.click("#login-form button[type=submit]")
            page.wait_for_url(f"{url}/patients")
            assert "Sign out" in page.inner_text("header")
            assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read the session
            assert page.evaluate("JSON.stringify(sessionStorage) + JSON.stringify(localStorage)") == "{}{}"
            patient = httpx.post(f"{url}/api/patients", json={}, headers={"Authorization": f"Bearer {key}"}).json()
            page.goto(f"{url}/?patient={patient['id']}")
            page.set_input_files("input[name=files]", [str(lesion_images[1])])
            with page.expect_response(lambda r: r.url.endswith("/api/images")) as answer:
                page.click("#upload-form button[type=submit]")
            assert answer.value.status == 201
            page.wait_for_selector("#results .card")
            wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")
            # The patient's file names live in this tab only (README: file names stay in the browser), until sign-out.
            kept = "JSON.stringify(sessionStorage) + JSON.stringify(localStorage)"
            assert lesion_images[1].name in page.evaluate(kept)
            page.click("header button:has-text('Sign out')")
            page.wait_for_url(re.compile(r".*/login$"))
            assert page.evaluate(kept) == "{}{}"
            page.goto(f"{url}/")
            assert "/login" in page.url
            ignorable = [p for p in problems if "401" not in p and "Failed to load resource" not in p]
            assert ignorable == [], ignorable
        finally:
            browser.close()
