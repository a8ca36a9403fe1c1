"""Who may do what, and what is recorded: key roles (403 naming the role needed), the
audit trail (one row per state-changing request, never a personal value, kept across a
restart, read with `dermsight audit`), the page hiding what a role may not do, failed
authentication limited per client address and per key prefix, forwarded headers trusted
only from named proxies, and no secret in any log line of a real `dermsight serve`.
Real ISIC images; the database-backed tests run on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import Subprocess, _server
from test_security import database_bytes, store_snapshot, upload
from typer.testing import CliRunner

from dermsight.cli import app as cli
from dermsight.serving.app import create_app
from dermsight.serving.logs import redact_secrets
from dermsight.serving.security import KEY_PATTERN, create_api_key
from dermsight.serving.storage.repository import Storage

# Personal values sent with the requests below: none may reach the audit trail.
FILE_NAME, AGE, REFERENCE = "Jane_Doe_7Q4X.jpg", "87", "P-REF-7Q4X"
OBJECTS = re.compile(r"((patient|image|images|predictions|key) [0-9,]+( \((read|clinician|admin)\))?(; |$))*")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def clinic(request, serving_bundle, new_database, tmp_path_factory):
    """The app with keys required, on a fresh database of each backend, and one key of each role."""
    folder = tmp_path_factory.mktemp(f"access-{request.param}")
    url = new_database(request.param, folder)
    app = create_app(serving_bundle, url, storage_dir=folder)
    storage = app.state.storage
    keys = {role: create_api_key(storage, f"dr {role}", role=role) for role in ("read", "clinician", "admin")}
    with TestClient(app) as client:
        yield client, keys, url
    storage.engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_roles_decide_what_a_key_may_do_and_every_change_is_audited(clinic, lesion_images, tmp_path, monkeypatch):
    client, keys, url = clinic
    storage = client.app.state.storage
    read, clinician, admin = (bearer(keys[role]) for role in ("read", "clinician", "admin"))
    lesion = lesion_images[0].read_bytes()

    # read: sees everything, changes nothing (403 naming the role it would need; nothing stored).
    before = store_snapshot(storage)
    assert client.get("/api/patients", headers=read).status_code == 200
    refused = upload(client, [(FILE_NAME, lesion, "image/jpeg")], read, age=AGE)
    assert refused.status_code == 403 and "'clinician' role" in refused.json()["detail"]
    assert "dr read" in refused.json()["detail"] and "'read' role" in refused.json()["detail"]
    assert client.post("/api/patients", json={"reference": REFERENCE}, headers=read).status_code == 403
    assert store_snapshot(storage) == before

    # clinician: creates, uploads, scores; may not delete.
    patient = client.post("/api/patients", json={"reference": REFERENCE}, headers=clinician).json()["id"]
    body = upload(client, [(FILE_NAME, lesion, "image/jpeg")], clinician, age=AGE, sex="female", site="back",
                  patient_id=patient).json()
    image, prediction = body["predictions"][0]["image_id"], body["predictions"][0]["id"]
    rescored = client.post(f"/api/patients/{patient}/rescore", headers=clinician).json()["predictions"][0]["id"]
    for path in (f"/api/images/{image}", f"/api/patients/{patient}"):
        denied = client.delete(path, headers=clinician)
        assert denied.status_code == 403 and "deleting needs the 'admin' role" in denied.json()["detail"]
        assert client.delete(path, headers=read).status_code == 403
    assert client.get(f"/api/images/{image}", headers=read).status_code == 200

    # admin: deletes.
    assert client.delete(f"/api/images/{image}", headers=admin).status_code == 204
    assert client.delete(f"/api/patients/{patient}", headers=admin).status_code == 204
    assert client.get(f"/api/patients/{patient}", headers=read).status_code == 404

    # One row per action, with the key's name and prefix, the ids touched and the outcome.
    prefix = {role: KEY_PATTERN.fullmatch(key).group(1) for role, key in keys.items()}
    rows = [(e.key_name, e.key_prefix, e.action, e.objects, e.outcome, e.status) for e in storage.audit_events()]
    assert rows == [
        ("dr read", prefix["read"], "key.create", "key 1 (read)", "done", None),
        ("dr clinician", prefix["clinician"], "key.create", "key 2 (clinician)", "done", None),
        ("dr admin", prefix["admin"], "key.create", "key 3 (admin)", "done", None),
        ("dr read", prefix["read"], "image.upload", "", "refused", 403),
        ("dr read", prefix["read"], "patient.create", "", "refused", 403),
        ("dr clinician", prefix["clinician"], "patient.create", f"patient {patient}", "done", 201),
        ("dr clinician", prefix["clinician"], "image.upload",
         f"patient {patient}; images {image}; predictions {prediction}", "done", 201),
        ("dr clinician", prefix["clinician"], "patient.rescore", f"patient {patient}; predictions {rescored}", "done",
         200),
        ("dr clinician", prefix["clinician"], "image.delete", f"image {image}", "refused", 403),
        ("dr read", prefix["read"], "image.delete", f"image {image}", "refused", 403),
        ("dr clinician", prefix["clinician"], "patient.delete", f"patient {patient}", "refused", 403),
        ("dr read", prefix["read"], "patient.delete", f"patient {patient}", "refused", 403),
        ("dr admin", prefix["admin"], "image.delete", f"image {image}", "done", 204),
        ("dr admin", prefix["admin"], "patient.delete", f"patient {patient}", "done", 204),
    ]
    events = storage.audit_events()
    assert [e.actor for e in events] == ["cli"] * 3 + ["key"] * 11
    assert all(OBJECTS.fullmatch(e.objects) for e in events)  # ids only: no room for a personal value
    trail = "\n".join(json.dumps([str(v) for v in vars(e).values()]) for e in events)
    for value in (FILE_NAME, "Jane", REFERENCE, "female", "back", *keys.values()):
        assert value not in trail, value
    assert not any(str(e.status) == AGE or AGE in e.objects.split() for e in events)

    # Not editable through the API: no route reaches the trail. The schema names each operation's role.
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if "audit" in path]
    assert "'admin' role" in paths["/api/patients/{patient_id}"]["delete"]["responses"]["403"]["description"]
    assert "'clinician' role" in paths["/api/images"]["post"]["responses"]["403"]["description"]

    # It survives a restart, and `dermsight audit` reads it, filtered by key, action, outcome and time.
    again = Storage(url, tmp_path / "files")
    assert len(again.audit_events()) == len(events)
    again.engine.dispose()
    monkeypatch.setenv("DERMSIGHT_DATABASE_URL", url)

    def audit(*options: str) -> list[dict]:
        result = CliRunner().invoke(cli, ["audit", "--json", "--data-dir", str(tmp_path), *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    mine = audit("--key", "dr admin")
    assert [r["action"] for r in mine] == ["key.create", "image.delete", "patient.delete"]
    assert audit("--key", prefix["admin"]) == mine
    assert [r["key"] for r in audit("--action", "patient.delete", "--outcome", "done")] == ["dr admin"]
    assert len(audit("--action", "patient")) == 6  # patient.* (create x2, rescore, delete x3)
    assert audit("--since", "2100-01-01") == [] and len(audit("--until", "2100-01-01")) == len(events)
    assert len(audit("--limit", "2")) == 2 and audit("--limit", "2")[-1]["action"] == "patient.delete"
    table = CliRunner().invoke(cli, ["audit", "--data-dir", str(tmp_path), "--key", "dr read"])
    assert table.exit_code == 0 and "Audit trail (5 rows)" in table.stdout and "dr read" in table.stdout


def test_sign_in_and_failed_sign_in_are_audited_and_the_page_hides_what_the_role_may_not(clinic):
    client, keys, _ = clinic
    storage = client.app.state.storage
    patient = client.post("/api/patients", json={}, headers=bearer(keys["clinician"])).json()["id"]
    seen = len(storage.audit_events())
    wrong = keys["read"][:-4] + ("AAAA" if not keys["read"].endswith("AAAA") else "BBBB")  # the read key's prefix
    pages = {}
    for role in ("read", "clinician", "admin"):
        browser = TestClient(client.app)
        assert browser.post("/login", data={"key": wrong if role == "read" else "not a key"}).status_code == 401
        assert browser.post("/login", data={"key": keys[role]}, follow_redirects=False).status_code == 303
        pages[role] = (browser.get("/").text, browser.get("/patients").text, browser.get(f"/patients/{patient}").text)
        assert browser.post("/logout", follow_redirects=False).status_code == 303
    index, patients, patient_page = zip(*pages.values())
    assert ['id="upload-form"' in page for page in index] == [False, True, True]
    assert "<strong>read</strong> role" in index[0]
    assert ['id="patient-form"' in page for page in patients] == [False, True, True]
    assert ['id="rescore"' in page for page in patient_page] == [False, True, True]
    assert ['id="delete-patient"' in page for page in patient_page] == [False, False, True]

    prefix = KEY_PATTERN.fullmatch(keys["read"]).group(1)
    rows = [(e.actor, e.key_name, e.key_prefix, e.action, e.outcome) for e in storage.audit_events()[seen:]]
    assert rows == [
        ("anonymous", "dr read", prefix, "sign_in", "refused"),  # a wrong secret for a real prefix: named
        ("key", "dr read", prefix, "sign_in", "done"),
        ("session", "dr read", prefix, "sign_out", "done"),
        ("anonymous", None, None, "sign_in", "refused"),  # not key-shaped: nothing of it is kept
        ("key", "dr clinician", KEY_PATTERN.fullmatch(keys["clinician"]).group(1), "sign_in", "done"),
        ("session", "dr clinician", KEY_PATTERN.fullmatch(keys["clinician"]).group(1), "sign_out", "done"),
        ("anonymous", None, None, "sign_in", "refused"),
        ("key", "dr admin", KEY_PATTERN.fullmatch(keys["admin"]).group(1), "sign_in", "done"),
        ("session", "dr admin", KEY_PATTERN.fullmatch(keys["admin"]).group(1), "sign_out", "done"),
    ]
    assert b"not a key" not in database_bytes(client.app.state.storage.engine.url.render_as_string(False))


def test_failed_authentication_is_limited_per_address_and_never_locks_out_a_valid_key(clinic, monkeypatch):
    client, keys, _ = clinic
    failures = client.app.state.failures
    for bucket in (failures.by_address, failures.by_prefix):
        monkeypatch.setattr(bucket, "rate", 0.01)
        bucket._buckets.clear()
    attacker = TestClient(client.app, client=("203.0.113.7", 40000))
    neighbour = TestClient(client.app, client=("198.51.100.2", 40000))
    guesses = [attacker.get("/api/patients", headers=bearer(f"dsk_{i:012x}_{'x' * 43}")).status_code
               for i in range(int(failures.by_address.burst) + 5)]
    assert guesses[:10] == [401] * 10 and set(guesses[10:]) == {429}
    limited = attacker.post("/login", data={"key": "guess"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # A valid key behind the same address still works (only failures are limited), another address is untouched.
    assert attacker.get("/api/patients", headers=bearer(keys["read"])).status_code == 200
    assert attacker.post("/login", data={"key": keys["read"]}, follow_redirects=False).status_code == 303
    assert neighbour.get("/api/patients", headers=bearer("dsk_guess")).status_code == 401
    assert neighbour.get("/api/patients", headers=bearer(keys["read"])).status_code == 200

    # Wrong secrets for one real key's prefix, each from another address: limited per prefix too.
    failures.by_address._buckets.clear()
    wrong = keys["admin"][:-1] + ("A" if not keys["admin"].endswith("A") else "B")
    spread = [TestClient(client.app, client=(f"192.0.2.{i}", 1)).delete("/api/patients/1", headers=bearer(wrong))
              for i in range(int(failures.by_prefix.burst) + 2)]
    assert [r.status_code for r in spread][-2:] == [429, 429]
    assert client.get("/api/patients", headers=bearer(keys["admin"])).status_code == 200  # the key itself works
    for bucket in (failures.by_address, failures.by_prefix):
        bucket._buckets.clear()


def test_load_refusals_write_no_audit_row(clinic, lesion_images, monkeypatch):
    """A flood answered 429 or 503 (before any work) must not write the trail full or slow shedding down."""
    client, keys, _ = clinic
    storage, admission, limiter = client.app.state.storage, client.app.state.admission, client.app.state.rate_limiter
    seen = len(storage.audit_events())
    monkeypatch.setattr(admission, "in_flight", admission.capacity)  # every scoring slot taken
    files = [("a.jpg", lesion_images[0].read_bytes(), "image/jpeg")]
    assert upload(client, files, bearer(keys["clinician"])).status_code == 503
    monkeypatch.setattr(admission, "in_flight", 0)
    monkeypatch.setattr(limiter, "rate", 0.01)
    monkeypatch.setattr(limiter, "burst", 1.0)
    limiter._buckets.clear()
    answers = [client.post("/api/patients", json={}, headers=bearer(keys["clinician"])).status_code for _ in range(3)]
    assert answers == [201, 429, 429]
    assert [e.action for e in storage.audit_events()[seen:]] == ["patient.create"]
    limiter._buckets.clear()


def test_keys_made_before_roles_keep_their_full_rights(database_url, tmp_path):
    """The migration to roles makes every existing key an admin: what every key could do before."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from dermsight.serving.security import hash_key, new_api_key
    from dermsight.serving.storage.database import MIGRATIONS, make_engine

    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    key, prefix, digest = new_api_key()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.execute(text("INSERT INTO api_keys (name, prefix, key_hash, created_at) VALUES ('old', :p, :h, :t)"),
                           {"p": prefix, "h": digest, "t": "2026-12-01 10:00:00"})
    engine.dispose()
    storage = Storage(database_url, tmp_path)
    assert [(k.name, k.role, k.key_hash) for k in storage.list_api_keys()] == [("old", "admin", hash_key(key))]
    storage.engine.dispose()


def test_log_redaction():
    key = "dsk_0123456789ab_" + "S" * 43
    line = redact_secrets(f'127.0.0.1:5 - "GET /api/x/{key}?api_key={key}&order=risk&flag HTTP/1.1" 401')
    assert "S" * 10 not in line and "dsk_0123456789ab_[redacted]" in line
    assert "?api_key=[redacted]&order=[redacted]&[redacted] HTTP/1.1" in line


# -- a real `dermsight serve`: its logs, and forwarded headers --------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request, serving_bundle, new_database, tmp_path):
    """`dermsight serve` (keys required, default limits, no trusted proxy) on a fresh
    database of each backend, with an admin key made by `dermsight keys create`."""
    data_dir = tmp_path / "data"
    env = {"DERMSIGHT_DATABASE_URL": new_database(request.param, data_dir)}
    data_dir.mkdir(exist_ok=True)
    key = _server.create_api_key(data_dir, "log test", env=env)
    server = Subprocess(["--model", str(serving_bundle), "--data-dir", str(data_dir), "--log-level", "info"],
                        tmp_path / "serve.log", env=env)
    server.wait_ready()
    yield server, key, data_dir, env
    server.stop()


def test_no_secret_in_the_server_log_and_forged_forwarded_for_changes_nothing(served, lesion_images):
    server, key, _, _ = served
    session = httpx.post(f"{server.url}/login", data={"key": key}, follow_redirects=False).cookies["dermsight_session"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        statuses = [
            http.get("/api/patients", headers={"Authorization": f"Bearer {key}"}).status_code,
            http.get("/api/patients", headers={"X-API-Key": key}).status_code,
            http.get("/api/patients", headers={"Cookie": f"dermsight_session={session}"}).status_code,
            http.get("/api/patients", headers={"Cookie": f"dermsight_session={key}"}).status_code,
            http.get(f"/api/patients?api_key={key}").status_code,
            http.get(f"/api/patients?order=risk&key={key}", headers={"X-API-Key": key}).status_code,
            http.get(f"/patients?token={session}", headers={"X-API-Key": key}).status_code,
            http.get(f"/api/{key}").status_code,
            http.post(f"/api/images?api_key={key}", headers={"X-API-Key": key},
                      files=[("files", ("a.jpg", lesion_images[2].read_bytes(), "image/jpeg"))]).status_code,
        ]
        assert statuses == [200, 200, 200, 401, 401, 200, 200, 401, 201]
        # Rotating X-Forwarded-For from an address that is no trusted proxy: still one client, limited.
        forged = [http.get("/api/patients", headers={"X-API-Key": "dsk_guess", "X-Forwarded-For": f"10.9.8.{i}"})
                  .status_code for i in range(14)]
        assert forged[:10] == [401] * 10 and set(forged[10:]) == {429}
        assert http.get("/api/patients", headers={"X-API-Key": key, "X-Forwarded-For": "10.9.8.200"}).status_code == 200
    server.stop()
    log = server.log.read_text()
    assert log.count('"GET /api/patients') >= 16 and "/api/patients?api_key=[redacted]" in log  # the access log ran
    secret = key.split("_", 2)[2]
    for value in (key, secret, secret[:16], session, session[:16]):
        assert value not in log, value
    assert "10.9.8." not in log and "127.0.0.1:" in log  # the peer's address, never the forged one


def test_forwarded_for_is_trusted_from_a_named_proxy(serving_bundle, tmp_path):
    data_dir = tmp_path / "data"
    key = _server.create_api_key(data_dir, "proxy test")
    arguments = ["--model", str(serving_bundle), "--data-dir", str(data_dir), "--forwarded-allow-ips", "127.0.0.1"]
    with Subprocess(arguments, tmp_path / "serve.log") as server:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            def get(address: str, presented: str) -> int:
                headers = {"X-API-Key": presented, "X-Forwarded-For": address}
                return http.get("/api/patients", headers=headers).status_code

            assert [get("10.0.0.1", "dsk_guess") for _ in range(12)][-2:] == [429, 429]
            assert get("10.0.0.2", "dsk_guess") == 401  # another client behind the proxy: its own bucket
            assert get("10.0.0.1", key) == 200
    assert "10.0.0.1:" in Path(server.log).read_text()
