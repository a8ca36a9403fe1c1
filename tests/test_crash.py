"""No lost data: every upload the server acknowledged (2xx) survives a SIGKILL of the
server in the middle of a batch of uploads, intact; and the startup check leaves no
file without a row (rows without their file are reported, never silently kept). On SQLite
and on PostgreSQL, each on a fresh database."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import threading
import time

import httpx
from live_server import Subprocess
from PIL import Image
from sqlalchemy import select

from dermsight.imaging.sanitize import sanitize_image
from dermsight.serving.storage.models import Image as ImageRow
from dermsight.serving.storage.models import Prediction
from dermsight.serving.storage.repository import NewImage, NewPrediction, Storage


def _prediction(risk: float) -> NewPrediction:
    return NewPrediction(
        model_version="test@1", probabilities={"MEL": risk, "NV": 1 - risk}, predicted_class="NV", melanoma_risk=risk,
        threshold=0.3, above_threshold=risk >= 0.3, looks_dermoscopic=True, context=None,
        heatmap_jpeg=f"heat map {risk}".encode(),
    )


def test_startup_check_removes_orphans_and_reports_missing_files(shared, database_url, tmp_path):
    storage = Storage(database_url, tmp_path / "files")
    jpegs = [p.read_bytes() for p in sorted((shared / "ham10000" / "images").glob("*.jpg"))[:3]]
    rows = storage.save_scoring(None, [(NewImage(j, "jpeg", 200, 150, None, None, None), _prediction(0.1 * i))
                                       for i, j in enumerate(jpegs[:2])])
    assert storage.check_files().clean
    # What a crash between a file's write and its row's commit leaves behind ...
    orphan = hashlib.sha256(jpegs[2]).hexdigest()
    (storage.files_dir / "images" / orphan).write_bytes(jpegs[2])
    (storage.files_dir / "heatmaps" / ".incoming-x1y2").write_bytes(b"half a heat map")
    # ... and what no crash of ours leaves, but a disk or an operator can: a row without its file.
    lost = rows[1].heatmap_path
    storage.file(lost).unlink()

    check = storage.check_files(remove=True)
    assert check.orphans == [f"images/{orphan}"] and check.temporary == ["heatmaps/.incoming-x1y2"]
    assert check.missing == [lost]
    assert "1 orphan file(s) removed, 1 temporary file(s) removed, 1 file(s) missing" in check.summary()
    assert not (storage.files_dir / "images" / orphan).exists()
    assert not (storage.files_dir / "heatmaps" / ".incoming-x1y2").exists()
    again = storage.check_files(remove=False)
    assert (again.orphans, again.temporary, again.missing) == ([], [], [lost])
    assert storage.file(rows[0].image.path).read_bytes() == jpegs[0]  # referenced files are never touched
    storage.engine.dispose()


def _with_gps(jpeg: bytes) -> bytes:
    """The JPEG with an EXIF block holding a GPS position (what a phone camera writes)."""
    exif = Image.Exif()
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)})
    payload = exif.tobytes()
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_sigkill_during_uploads_loses_no_acknowledged_upload(serving_bundle, shared, database_url, tmp_path):
    data_dir = tmp_path / "store"
    database = {"DERMSIGHT_DATABASE_URL": database_url}  # how `dermsight serve` is told where its rows go
    arguments = ["--dev", "--model", str(serving_bundle), "--data-dir", str(data_dir), "--log-level", "info"]
    paths = sorted((shared / "isic2020" / "test_128").glob("*.jpg"))[:60]
    uploads = [(p.name, _with_gps(p.read_bytes()) if i % 3 == 0 else p.read_bytes()) for i, p in enumerate(paths)]
    log = tmp_path / "server.log"

    server = Subprocess(arguments, log, env=database)
    server.wait_ready()
    acknowledged: dict[int, str] = {}  # image id -> SHA-256 of what must be stored
    failed_in_flight = []
    refused = []  # (file, status, detail): before the kill, every upload must be accepted
    lock = threading.Lock()

    def client(part: list[tuple[str, bytes]]) -> None:
        with httpx.Client(base_url=server.url, timeout=20) as http:
            for name, data in part:
                try:
                    response = http.post("/api/images", files=[("files", (name, data, "image/jpeg"))],
                                         data={"age": "50", "site": "torso"})
                except httpx.HTTPError:
                    failed_in_flight.append(name)  # the kill: no answer, so no promise was made
                    return
                if response.status_code != 201:
                    refused.append((name, response.status_code, response.text[:200]))
                    continue
                with lock:
                    for prediction in response.json()["predictions"]:
                        acknowledged[prediction["image_id"]] = hashlib.sha256(sanitize_image(data).data).hexdigest()

    threads = [threading.Thread(target=client, args=(uploads[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 40
    while len(acknowledged) < 10 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.02)
    server.kill()  # SIGKILL, with both clients in the middle of a request
    for thread in threads:
        thread.join(30)
    print(f"killed after {len(acknowledged)} acknowledged uploads; {len(failed_in_flight)} in flight got no answer")
    assert refused == [], log.read_text()[-2000:]
    assert len(acknowledged) >= 10, log.read_text()[-2000:]
    assert len(acknowledged) < len(uploads), "the server was killed after the batch ended"

    # What a kill between a file's write and its row's commit leaves (the kill above may or
    # may not have hit that window): an orphan file and a temporary file of an unfinished write.
    unanswered = uploads[-1][1]
    (data_dir / "images" / hashlib.sha256(unanswered).hexdigest()).write_bytes(unanswered)
    (data_dir / "heatmaps" / ".incoming-k1ll3d").write_bytes(b"half written")

    # Restart on the same store: the startup check runs, and every acknowledged upload is there.
    restarted = Subprocess(arguments, log, env=database)
    try:
        restarted.wait_ready()
        text = log.read_text()
        print("\n".join(line for line in text.splitlines() if "storage check" in line))
        assert text.count("storage check:") == 2, text[-3000:]
        checks = re.findall(r"storage check: (\d+) orphan file\(s\) removed, (\d+) temporary file\(s\) removed, "
                            r"(\d+) file\(s\) missing", text)
        orphans, temporary, missing = map(int, checks[-1])  # the restart's check
        assert orphans >= 1 and temporary >= 1 and missing == 0, checks
        with httpx.Client(base_url=restarted.url, timeout=20) as http:
            heatmaps = 0
            for image_id, digest in acknowledged.items():
                image = http.get(f"/api/images/{image_id}")
                assert image.status_code == 200, (image_id, image.text)
                assert image.json()["sha256"] == digest
                stored = http.get(f"/api/images/{image_id}/file").content
                assert hashlib.sha256(stored).hexdigest() == digest
                assert not Image.open(io.BytesIO(stored)).getexif().get_ifd(0x8825)  # GPS stripped
                prediction = image.json()["predictions"][-1]
                if prediction["looks_dermoscopic"]:
                    heatmaps += http.get(prediction["heatmap_url"]).status_code == 200
                else:  # the tiny serving bundle's photo gate may refuse a 128 px image: no risk, no heat map
                    assert prediction["heatmap_url"] is None and prediction["melanoma_risk"] is None
            assert heatmaps >= len(acknowledged) // 2, heatmaps  # every accepted one has its heat map
    finally:
        restarted.stop()

    # Nothing dangling: every file has a row, every row its file, no temporary file is left.
    storage = Storage(database_url, data_dir)
    check = storage.check_files(remove=False)
    assert check.clean, check
    with storage.sessions() as session:
        rows = len(session.scalars(select(ImageRow)).all())
        assert rows >= len(acknowledged)  # an upload can commit just before the kill, unanswered
        assert session.scalars(select(Prediction)).all()
    storage.engine.dispose()
