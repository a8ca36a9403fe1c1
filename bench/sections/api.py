"""api: a real `dermsight serve` subprocess as a clinic runs it (API keys required: one key
for the bench, made with `dermsight keys create`, its per-key rate limit set by the bench
and reported; `--api-dev` measures the development server instead), a different real image
on every request (HAM10000 images with their age, sex and site, enlarged in memory to
600x450, the size of HAM10000's originals: the shared copy is 200x150; never written to
disk), so every upload is stored, scored and given a heat map like a new one. Start-up time;
p50/p99 latency idle, under 8 concurrent closed-loop clients (each sends its next request as
soon as it has an answer: saturation; with the server's CPU per upload and the p50 floor it
implies), the CPU of each step of an upload (decode, quality, gate, forward, heat map, storage:
upload_steps.py, in the bench's own process, before the server starts) and of scoring 1-8
uploads per call (what micro-batching can save), and 8 paced clients at 8, 32 and 64 requests/s in all (the first is the paced
target figure; open loop: each request's latency runs from the time it was due, so a request
held back by a slow one before it counts its wait); peak RSS (VmHWM) and RSS after the requests.

Every request counts: percentiles are over all answers, failed ones (any status but 201, a
timeout, a connection that gave no answer, at the time it gave up) included, and each phase
reports its failures beside them."""

from __future__ import annotations

import http.client
import io
import itertools
import os
from collections import Counter
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import _server

from .common import (
    DATA, Settings, child_env, now, percentile, process_cpu_seconds, process_tree_memory, rounded,
)
from .upload_steps import batched_scoring_cpu, upload_step_cpu

IMAGE_SIZE = (600, 450)


def api_uploads(count: int, data: Path = DATA) -> list[tuple[bytes, dict[str, str]]]:
    """`count` different HAM10000 images (the first `count` by image id) of the datasets folder
    `data`, each enlarged to 600x450 and encoded as JPEG (quality 90) in memory, with its own
    form fields (age, sex, site; a missing one is left out). Also bench/load.py's uploads."""
    from PIL import Image

    from dermsight.data import readers

    records = readers.read_ham10000(data / "ham10000").records
    records = records[records["image_ref"].notna()].sort_values("image_id").head(count)
    if len(records) < count:
        raise RuntimeError(f"the api section needs {count} images; HAM10000 has {len(records)}")
    uploads = []
    for row in records.itertuples():
        with Image.open(row.image_ref) as image:
            enlarged = image.convert("RGB").resize(IMAGE_SIZE, Image.BICUBIC)
        buffer = io.BytesIO()
        enlarged.save(buffer, format="JPEG", quality=90)
        form = {}
        if row.age == row.age:  # not NaN
            form["age"] = f"{row.age:g}"
        if isinstance(row.sex, str) and row.sex:
            form["sex"] = row.sex
        if isinstance(row.site, str) and row.site:
            form["site"] = row.site
        uploads.append((buffer.getvalue(), form))
    return uploads


def multipart(jpeg: bytes, form: dict[str, str]) -> tuple[bytes, str]:
    boundary = "dermsightbench0123456789"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="lesion.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode() + jpeg + b"\r\n",
        *(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
          for name, value in form.items()),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def requests_needed(settings: Settings) -> int:
    """Requests of the whole section (warm-up, idle, closed loop, paced): one image each."""
    paced = sum(settings.api_clients * max(3, round(settings.api_paced_seconds / (settings.api_clients / rate)))
                for rate in settings.api_paced_rates)
    return 3 + settings.api_idle_requests + settings.api_clients * settings.api_requests_per_client + paced


def start_server(workdir: Path, settings: Settings, model: Path | None, dev: bool) -> tuple[_server.ServeProcess, dict]:
    """`dermsight serve` on a free port (production with one bench key unless `dev`) and the
    headers of the bench's requests."""
    data_dir = workdir / "data"
    headers = {"Connection": "keep-alive"}
    args = ["--data-dir", str(data_dir)]
    if dev:
        args.append("--dev")
    else:
        headers["Authorization"] = f"Bearer {_server.create_api_key(data_dir, 'bench api', child_env())}"
        args += ["--rate-limit", f"{settings.api_rate_limit:g}", "--burst", str(settings.api_burst)]
    if model:
        args += ["--model", str(model)]
    server = _server.ServeProcess(args, workdir / "serve.log", env=child_env())
    server.wait_ready(120, poll=0.02)
    return server, headers


class Client:
    """One keep-alive HTTP connection (stdlib: the client's own overhead stays small)."""

    def __init__(self, port: int, headers: dict, timeout: float = 120.0):
        self.port, self.headers, self.timeout = port, headers, timeout
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int | str, bytes]:
        """(HTTP status, body); the status is "timeout" when no answer came within the timeout,
        "no answer" when the connection failed (also on a fresh connection: a keep-alive one
        the server had closed is reopened once)."""
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        for _ in range(2):
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                return response.status, response.read()
            except TimeoutError:
                self._reopen()
                return "timeout", b""
            except (ConnectionError, http.client.HTTPException):
                self._reopen()
        return "no answer", b""

    def _reopen(self) -> None:
        self.connection.close()
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)


class Answers:
    """Every answer of one phase: its latency (ms) whatever it was, and the statuses of those
    that were not 201 (an HTTP status, "timeout" or "no answer")."""

    def __init__(self):
        self.latencies_ms: list[float] = []
        self.failed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, latency_ms: float, status: int | str) -> None:
        with self._lock:
            self.latencies_ms.append(latency_ms)
            if status != 201:
                self.failed[str(status)] += 1

    @property
    def ok(self) -> int:
        return len(self.latencies_ms) - sum(self.failed.values())

    def summary(self) -> dict:
        """Requests, failures (by status) and p50/p99 over all answers."""
        measured = bool(self.latencies_ms)
        return {
            "requests": len(self.latencies_ms),
            "failures": sum(self.failed.values()),
            "failures_by_status": dict(sorted(self.failed.items())),
            "p50_ms": rounded(percentile(self.latencies_ms, 50), 1) if measured else None,
            "p99_ms": rounded(percentile(self.latencies_ms, 99), 1) if measured else None,
        }


def run(args, settings: Settings, results: dict) -> dict:
    dev = bool(getattr(args, "api_dev", False))
    needed = requests_needed(settings)
    uploads = api_uploads(needed)
    bodies = [multipart(jpeg, form) for jpeg, form in uploads]  # made before any timing
    counter = itertools.count()

    def next_body() -> tuple[bytes, str]:  # a different image for every request (count() is atomic)
        return bodies[next(counter) % len(bodies)]

    steps = upload_step_cpu(args.model, uploads[: settings.api_step_uploads])
    batched = batched_scoring_cpu(args.model, uploads[: settings.api_step_uploads])
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-bench-api-"))
    server = None
    try:
        server, headers = start_server(workdir, settings, args.model, dev)
        process, port, startup, cmd = server.process, server.port, server.startup_seconds, server.command
        client = Client(port, headers)
        for _ in range(3):  # warm-up
            status, payload = client.request("POST", "/api/images", *next_body())
            if status != 201:
                raise RuntimeError(f"POST /api/images answered {status}: {payload[:300]!r}; serve log: "
                                   f"{server.log_tail(1500)}")
        idle = Answers()
        for _ in range(settings.api_idle_requests):
            body, content_type = next_body()
            started = now()
            status, _ = client.request("POST", "/api/images", body, content_type)
            idle.add((now() - started) * 1000, status)

        loaded = Answers()

        def worker() -> None:
            own = Client(port, headers)
            for _ in range(settings.api_requests_per_client):
                body, content_type = next_body()
                started = now()
                status, _ = own.request("POST", "/api/images", body, content_type)
                loaded.add((now() - started) * 1000, status)

        threads = [threading.Thread(target=worker) for _ in range(settings.api_clients)]
        cpu_before = process_cpu_seconds(process.pid)
        started = now()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = now() - started
        server_cpu_ms = (process_cpu_seconds(process.pid) - cpu_before) * 1000 / max(1, len(loaded.latencies_ms))

        # Paced: the same 8 clients, each due to send one request every 8 / rate seconds (random
        # phase): a steady offered load, at each rate in turn. Open loop: a request's latency
        # runs from when it was due, so the wait of one sent late behind a slow answer counts.
        rng = np.random.default_rng(0)
        paced: dict[float, Answers] = {}

        def paced_worker(phase: float, interval: float, count: int, into: Answers) -> None:
            own = Client(port, headers)
            begin = now() + phase
            for k in range(count):
                due = begin + k * interval
                body, content_type = next_body()
                if due > now():
                    time.sleep(due - now())
                status, _ = own.request("POST", "/api/images", body, content_type)
                into.add((now() - due) * 1000, status)

        for rate in settings.api_paced_rates:
            interval = settings.api_clients / rate
            count = max(3, round(settings.api_paced_seconds / interval))  # as requests_needed counts them
            paced[rate] = Answers()
            threads = [
                threading.Thread(target=paced_worker, args=(phase, interval, count, paced[rate]))
                for phase in rng.uniform(0, interval, settings.api_clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        memory = process_tree_memory(process.pid)
        requests_sent = next(counter)
    finally:
        if server is not None:
            server.stop(20)
        shutil.rmtree(workdir, ignore_errors=True)
    service_ms = statistics.median(idle.latencies_ms)
    first_rate = settings.api_paced_rates[0]
    jpeg_bytes = [len(jpeg) for jpeg, _ in uploads[:requests_sent]]
    return {
        "what": "POST /api/images, a different 600x450 JPEG (+ its age, sex, site) per request, real "
                f"`dermsight serve` on 127.0.0.1 ({'--dev: no API key, no rate limit' if dev else 'with an API key'})",
        "command": " ".join(["dermsight", *cmd[cmd.index("serve"):]]),
        "dev": dev,
        "api_key": None if dev else "one key (`dermsight keys create`), sent as Authorization: Bearer",
        "per_key_rate_limit": None if dev else {"requests_per_second": settings.api_rate_limit,
                                                "burst": settings.api_burst},
        "images": f"HAM10000, the first {min(requests_sent, len(uploads))} by image id, each enlarged in memory to "
                  f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} (HAM10000's original size; the shared copy is 200x150), JPEG "
                  "quality 90, with its own metadata",
        "distinct_images": min(requests_sent, len(uploads)),
        "requests_sent": requests_sent,
        "jpeg_bytes_median": int(statistics.median(jpeg_bytes)) if jpeg_bytes else None,
        # From the process start to /api/health 200 (the database was created by `keys create` before).
        "startup_seconds_to_health": rounded(startup, 2),
        "idle": idle.summary(),
        "concurrent": {
            "clients": settings.api_clients,
            **loaded.summary(),
            "requests_per_second": rounded(loaded.ok / wall, 1),  # uploads answered 201
            "closed_loop": True,
            "clients_x_idle_p50_ms": rounded(settings.api_clients * service_ms, 1),
            # Little's law: 8 clients always waiting on the server see p50 ~ 8 / throughput, and
            # throughput cannot pass cores / CPU per request: this is the floor of p50 here.
            "server_cpu_ms_per_request": rounded(server_cpu_ms, 2),
            "p50_floor_ms_clients_x_cpu_per_core": rounded(
                settings.api_clients * server_cpu_ms / (os.cpu_count() or 1), 1),
        },
        # The first rate (1 request per client per second) is the "paced" figure of the targets.
        "paced": {
            "clients": settings.api_clients,
            "offered_requests_per_second": first_rate,
            "latency_from": "the time each request was due (open loop)",
            **paced[first_rate].summary(),
        },
        "paced_by_offered_rate": {str(rate): answers.summary() for rate, answers in paced.items()},
        "failures": sum(phase.summary()["failures"] for phase in (idle, loaded, *paced.values())),
        "serve_memory_after_requests": {k: rounded(v, 1) for k, v in memory.items()},
        "cpu_per_step": steps,
        "scoring_cpu_by_call_size": batched,
    }
