"""Load benchmark of the web API on loopback: a real `dermsight serve --dev` subprocess on
127.0.0.1 and an asyncio httpx client uploading real SIIM-ISIC 2020 test_128 images (with
their age, sex and site) at 8, 16 and 32 concurrent clients, then one burst over capacity.
Prints one JSON object: per level the status counts, server errors (5xx other than the
designed 503 load shedding: must be 0), p50/p90/p99 latency and throughput; for the burst,
how many were shed with 503 and how fast.

    .venv/bin/python bench/load.py [--model BUNDLE] [--clients 8,16,32] [--requests 10] [--burst 64]

Clients behave as the API asks: after a 503 they wait Retry-After (at most --retry-cap s)
and try again, up to --retries times. Every loop is bounded in count and in time
(--max-seconds per level); only 127.0.0.1 is ever contacted. Run it on an otherwise idle
machine: every number is wall-clock time, and the client shares the machine's cores with
the server.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_images(data: Path, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(file name, JPEG bytes, form fields) of the first `count` test_128 images."""
    folder = data / "isic2020" / "test_128"
    with open(data / "isic2020" / "test_128.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]
    return [
        (f"{row['image_name']}.jpg", (folder / f"{row['image_name']}.jpg").read_bytes(),
         {"age": row["age_approx"], "sex": row["sex"], "site": row["anatom_site_general_challenge"]})
        for row in rows
    ]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values) * 1000
    return {name: round(float(np.percentile(array, q)), 1) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(float(array.max()), 1)}


async def _post(http: httpx.AsyncClient, image: tuple[str, bytes, dict[str, str]]) -> tuple[int | str, float, float]:
    """(status or exception name, seconds, Retry-After seconds) of one upload."""
    name, data, form = image
    started = time.perf_counter()
    try:
        response = await http.post("/api/images", files=[("files", (name, data, "image/jpeg"))], data=form)
    except httpx.HTTPError as err:
        return type(err).__name__, time.perf_counter() - started, 0.0
    retry = float(response.headers.get("retry-after", 0) or 0)
    return response.status_code, time.perf_counter() - started, retry


def _summary(results: list[tuple[int | str, float]], wall: float, **extra) -> dict:
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = [seconds for status, seconds in results if isinstance(status, int) and 200 <= status < 300]
    shed = [seconds for status, seconds in results if status == 503]
    return {
        **extra,
        "requests": len(results),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(1 for s, _ in results if isinstance(s, int) and s >= 500 and s != 503),
        "client_errors": sum(1 for s, _ in results if not isinstance(s, int)),
        "shed_503": len(shed),
        "latency_ms": percentiles(ok),
        "latency_503_ms": percentiles(shed),
        "throughput_uploads_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "seconds": round(wall, 2),
    }


async def run_clients(url: str, images, clients: int, requests: int, *, retries: int = 5, retry_cap: float = 2.0,
                      timeout: float = 60.0, max_seconds: float = 300.0) -> dict:
    """`clients` concurrent clients each making `requests` uploads (retrying 503s as told)."""
    results: list[tuple[int | str, float]] = []
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(number: int, http: httpx.AsyncClient) -> None:
        for request in range(requests):
            image = images[(number * requests + request) % len(images)]
            for _ in range(retries + 1):
                if time.perf_counter() > deadline:
                    return
                status, seconds, retry = await _post(http, image)
                results.append((status, seconds))
                if status != 503:
                    break
                await asyncio.sleep(min(max(retry, 0.1), retry_cap))

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        wall = time.perf_counter() - started
    return _summary(results, wall, clients=clients, uploads_per_client=requests)


async def burst(url: str, images, count: int, *, timeout: float = 60.0) -> dict:
    """`count` uploads at the same moment, no retries: what is over capacity must be shed fast."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        started = time.perf_counter()
        answers = await asyncio.gather(*(_post(http, images[i % len(images)]) for i in range(count)))
        wall = time.perf_counter() - started
    return _summary([(status, seconds) for status, seconds, _ in answers], wall, concurrent=count) | {
        "retry_after_s": sorted({retry for status, _, retry in answers if status == 503})}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    model: Path | None, data_dir: Path, max_queue: int, max_active: int, log: Path
) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [str(Path(sys.executable).with_name("dermsight")), "serve", "--dev", "--host", "127.0.0.1",
               "--port", str(port), "--data-dir", str(data_dir), "--max-queue", str(max_queue),
               "--max-active", str(max_active), "--log-level", "warning"]
    if model:
        command += ["--model", str(model)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: the server's default bundle).")
    default_data = Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets"))
    parser.add_argument("--data", type=Path, default=default_data, help="The shared datasets folder.")
    parser.add_argument("--clients", default="8,16,32", help="Concurrency levels, comma-separated.")
    parser.add_argument("--requests", type=int, default=10, help="Uploads per client at each level.")
    parser.add_argument("--burst", type=int, default=64, help="Simultaneous uploads over capacity (0: no burst).")
    parser.add_argument("--images", type=int, default=200, help="Distinct test_128 images to cycle through.")
    parser.add_argument("--max-queue", type=int, default=16, help="The server's --max-queue.")
    parser.add_argument("--max-active", type=int, default=2, help="The server's --max-active.")
    parser.add_argument("--retries", type=int, default=5, help="Retries of a 503 per upload.")
    parser.add_argument("--retry-cap", type=float, default=2.0, help="Longest wait before a retry (s).")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="Time limit of each level (s).")
    args = parser.parse_args()

    images = load_images(args.data, args.images)
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-load-"))
    process, url = start_server(args.model, workdir / "store", args.max_queue, args.max_active, workdir / "server.log")
    try:
        levels = [
            asyncio.run(run_clients(url, images, int(n), args.requests, retries=args.retries,
                                    retry_cap=args.retry_cap, max_seconds=args.max_seconds))
            for n in args.clients.split(",") if n.strip()
        ]
        shed = asyncio.run(burst(url, images, args.burst)) if args.burst else None
        model = httpx.get(f"{url}/api/model", timeout=10).json()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({
        "server": {"url": url, "max_active": args.max_active, "max_queue": args.max_queue, "dev": True},
        "model": {"name": model["name"], "version": model["version"]},
        "images": len(images), "image_source": "isic2020/test_128 (128x128 JPEG)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": round(os.getloadavg()[0], 2)},
        "levels": levels,
        "burst": shed,
        "server_errors_total": sum(level["server_errors"] for level in levels) + (shed["server_errors"] if shed else 0),
    }, indent=1))


if __name__ == "__main__":
    main()
