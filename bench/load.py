"""Load benchmark of the web API on loopback: a real `dermsight serve` subprocess on
127.0.0.1 as a clinic runs it (API keys required, one key for the bench, its rate limit
set by --rate-limit/--burst and reported), and an asyncio httpx client uploading real
HAM10000 images at a clinic's size (enlarged in memory to 600x450, the size of HAM10000's
originals, JPEG quality 90, with their age, sex and site: bench/sections/api.py's uploads; a
different image for every upload of the run, so every upload is stored and scored like a new
one) at 8, 16 and 32 concurrent clients, then one burst over capacity. Prints one JSON
object: per level the final status of each upload, server errors (5xx other than the designed
503 load shedding: must be 0), failed uploads (no 2xx in the end), timeouts and uploads the
level's time limit cut off, the per-upload latency over every upload that ended (p50/p90/p99:
from its first attempt to its final answer or failure, Retry-After waits and retried attempts
included) and over those that ended 2xx, the per-attempt latency beside it, and throughput;
for the burst, how many were shed with 503 and how fast.

    .venv/bin/python bench/load.py [--model BUNDLE] [--clients 8,16,32] [--requests 10] [--burst 64]
    .venv/bin/python bench/load.py --dev        # the development server instead (no key, no rate limit)

Clients behave as the API asks: after a 503 (or a 429) they wait Retry-After (at most
--retry-cap s) and try again, up to --retries times. Every loop is bounded in count and in
time (--max-seconds per level); only 127.0.0.1 is ever contacted. Run it on an otherwise idle
machine: every number is wall-clock time, and the client shares the machine's cores with the
server; the machine's load average at the start and the end is in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:  # bench/_server.py (already imported when tests/live_server.py came first)
    sys.path.insert(0, str(BENCH))
import _server  # noqa: E402

RETRIED = (429, 503)  # answers that ask the client to come back after Retry-After
CUT_OFF = "cut off"  # the final status of an upload the level's time limit stopped


def load_images(data: Path, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(file name, JPEG bytes, form fields) of `count` different HAM10000 images at 600x450."""
    from sections.api import api_uploads

    return [(f"lesion-{i}.jpg", jpeg, form) for i, (jpeg, form) in enumerate(api_uploads(count, data))]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values) * 1000
    return {name: round(float(np.percentile(array, q)), 1) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(float(array.max()), 1)}


async def _post(http: httpx.AsyncClient, image: tuple[str, bytes, dict[str, str]]) -> tuple[int | str, float, float]:
    """(status or exception name, seconds, Retry-After seconds) of one attempt."""
    name, data, form = image
    started = time.perf_counter()
    try:
        response = await http.post("/api/images", files=[("files", (name, data, "image/jpeg"))], data=form)
    except httpx.HTTPError as err:
        return type(err).__name__, time.perf_counter() - started, 0.0
    retry = float(response.headers.get("retry-after", 0) or 0)
    return response.status_code, time.perf_counter() - started, retry


def _ok(status: int | str) -> bool:
    return isinstance(status, int) and 200 <= status < 300


def _counts(statuses) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return dict(sorted(counts.items()))


def _summary(uploads: list[dict], wall: float, **extra) -> dict:
    """`uploads`: one dict per upload, {"status": final status, "seconds": first attempt to
    final answer, "attempts": [(status, seconds), ...]}."""
    attempts = [attempt for upload in uploads for attempt in upload["attempts"]]
    ended = [upload for upload in uploads if upload["attempts"]]  # a cut-off upload may never have been sent
    shed = [seconds for status, seconds in attempts if status == 503]
    return {
        **extra,
        "uploads": len(uploads),
        "attempts": len(attempts),
        "statuses": _counts(upload["status"] for upload in uploads),  # the final answer of each upload
        "attempt_statuses": _counts(status for status, _ in attempts),
        "retried_uploads": sum(1 for upload in uploads if len(upload["attempts"]) > 1),
        "failed_uploads": sum(1 for upload in uploads if not _ok(upload["status"])),  # every one, whatever ended it
        "server_errors": sum(1 for s, _ in attempts if isinstance(s, int) and s >= 500 and s != 503),
        "client_errors": sum(1 for s, _ in attempts if not isinstance(s, int)),
        "timeouts": sum(1 for s, _ in attempts if isinstance(s, str) and "Timeout" in s),
        "cut_off": sum(1 for upload in uploads if upload["status"] == CUT_OFF),
        "shed_503": len(shed),
        "rate_limited_429": sum(1 for s, _ in attempts if s == 429),
        # Per upload that ended (any final answer, an error or a timeout), from its first attempt
        # to that end (Retry-After waits included): no upload is left out of the percentiles.
        "latency_ms": percentiles([upload["seconds"] for upload in ended]),
        # The same over the uploads that ended 2xx.
        "latency_2xx_ms": percentiles([upload["seconds"] for upload in ended if _ok(upload["status"])]),
        # Per attempt that was answered 2xx (what the server took for the attempt that got through).
        "attempt_latency_ms": percentiles([seconds for status, seconds in attempts if _ok(status)]),
        "latency_503_ms": percentiles(shed),
        "throughput_uploads_per_s": round(sum(_ok(u["status"]) for u in uploads) / wall, 2) if wall > 0 else None,
        "seconds": round(wall, 2),
    }


def _picker(images, start: int = 0):
    """The next image, a different one each call (cycling only when the run needs more than there are)."""
    counter = itertools.count(start)
    return lambda: images[next(counter) % len(images)]


async def run_clients(url: str, images, clients: int, requests: int, *, retries: int = 5, retry_cap: float = 2.0,
                      timeout: float = 60.0, max_seconds: float = 300.0, headers: dict | None = None,
                      first_image: int = 0) -> dict:
    """`clients` concurrent clients each making `requests` uploads (retrying 503s and 429s as
    told); upload k of the level sends images[first_image + k] (a retry resends its image)."""
    uploads: list[dict] = []
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pick = _picker(images, first_image)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(requests):
            image, attempts = pick(), []
            started = time.perf_counter()
            ended = started
            status: int | str = CUT_OFF
            for attempt in range(retries + 1):
                if time.perf_counter() > deadline:
                    status = CUT_OFF
                    break
                status, seconds, retry = await _post(http, image)
                attempts.append((status, seconds))
                ended = time.perf_counter()  # the wait after a last refused attempt is not part of it
                if status not in RETRIED or attempt == retries:
                    break
                await asyncio.sleep(min(max(retry, 0.1), retry_cap))
            uploads.append({"status": status, "attempts": attempts, "seconds": ended - started})

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    return _summary(uploads, wall, clients=clients, uploads_per_client=requests)


async def burst(url: str, images, count: int, *, timeout: float = 60.0, headers: dict | None = None,
                first_image: int = 0) -> dict:
    """`count` uploads at the same moment, no retries: what is over capacity must be shed fast."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    pick = _picker(images, first_image)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as http:
        started = time.perf_counter()
        answers = await asyncio.gather(*(_post(http, pick()) for _ in range(count)))
        wall = time.perf_counter() - started
    uploads = [{"status": status, "seconds": seconds, "attempts": [(status, seconds)]}
               for status, seconds, _ in answers]
    return _summary(uploads, wall, concurrent=count) | {
        "retry_after_s": sorted({retry for status, _, retry in answers if status == 503})}


def start_server(model: Path | None, workdir: Path, *, dev: bool, max_queue: int, max_active: int,
                 rate_limit: float, burst_size: int) -> tuple[_server.ServeProcess, dict]:
    """The server (production unless `dev`: one API key made with `dermsight keys create`)
    and the request headers that authenticate with it."""
    data_dir = workdir / "store"
    args = ["--host", "127.0.0.1", "--data-dir", str(data_dir), "--max-queue", str(max_queue),
            "--max-active", str(max_active), "--log-level", "warning"]
    headers = {}
    if dev:
        args.append("--dev")
    else:
        headers["Authorization"] = f"Bearer {_server.create_api_key(data_dir, 'load bench')}"
        args += ["--rate-limit", f"{rate_limit:g}", "--burst", str(burst_size)]
    if model:
        args += ["--model", str(model)]
    server = _server.ServeProcess(args, workdir / "server.log")
    try:
        server.wait_ready(120)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    return server, headers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: the server's default bundle).")
    default_data = Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets"))
    parser.add_argument("--data", type=Path, default=default_data, help="The shared datasets folder.")
    parser.add_argument("--clients", default="8,16,32", help="Concurrency levels, comma-separated.")
    parser.add_argument("--requests", type=int, default=10, help="Uploads per client at each level.")
    parser.add_argument("--burst", type=int, default=64, help="Simultaneous uploads over capacity (0: no burst).")
    parser.add_argument("--images", type=int, default=None,
                        help="Distinct HAM10000 images (default: one per upload of the run).")
    parser.add_argument("--max-queue", type=int, default=16, help="The server's --max-queue.")
    parser.add_argument("--max-active", type=int, default=2, help="The server's --max-active.")
    parser.add_argument("--rate-limit", type=float, default=1000.0,
                        help="The server's --rate-limit: requests a second for the bench's API key (default 20 in "
                             "`dermsight serve`: too few for 8+ clients uploading back to back).")
    parser.add_argument("--burst-limit", type=int, default=1000, help="The server's --burst for the key.")
    parser.add_argument("--dev", action="store_true", help="Measure `dermsight serve --dev` (no key, no rate limit).")
    parser.add_argument("--retries", type=int, default=5, help="Retries of a 503 or 429 per upload.")
    parser.add_argument("--retry-cap", type=float, default=2.0, help="Longest wait before a retry (s).")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="Time limit of each level (s).")
    parser.add_argument("--output", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()

    levels_wanted = [int(n) for n in args.clients.split(",") if n.strip()]
    needed = sum(n * args.requests for n in levels_wanted) + args.burst
    images = load_images(args.data, args.images or needed)
    load_at_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-load-"))
    server, headers = start_server(args.model, workdir, dev=args.dev, max_queue=args.max_queue,
                                   max_active=args.max_active, rate_limit=args.rate_limit,
                                   burst_size=args.burst_limit)
    try:
        levels, first = [], 0
        for clients in levels_wanted:
            levels.append(asyncio.run(run_clients(
                server.url, images, clients, args.requests, retries=args.retries, retry_cap=args.retry_cap,
                max_seconds=args.max_seconds, headers=headers, first_image=first)))
            first += clients * args.requests
        shed = None
        if args.burst:
            shed = asyncio.run(burst(server.url, images, args.burst, headers=headers, first_image=first))
        model = httpx.get(f"{server.url}/api/model", headers=headers, timeout=10).json()
        startup = server.startup_seconds
    finally:
        server.stop(20)
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "server": {
            "command": "dermsight " + " ".join(server.command[server.command.index("serve"):]),
            "max_active": args.max_active, "max_queue": args.max_queue, "dev": args.dev,
            "api_key": None if args.dev else "one key (`dermsight keys create`), sent as Authorization: Bearer",
            "per_key_rate_limit": None if args.dev else {"requests_per_second": args.rate_limit,
                                                         "burst": args.burst_limit},
            "startup_seconds_to_health": round(startup, 2) if startup else None,
        },
        "model": {"name": model["name"], "version": model["version"]},
        "images": len(images), "uploads_in_run": needed,
        "image_source": "HAM10000, the first by image id, each enlarged in memory to 600x450 (HAM10000's original "
                        "size), JPEG quality 90, with its age, sex and site; a different image for each upload"
        + ("" if len(images) >= needed else f" until the {len(images)} run out, then cycling"),
        "latency": "latency_ms: per upload that ended, first attempt to its final answer, error or timeout "
                   "(Retry-After waits included), failed ones counted in failed_uploads; latency_2xx_ms: the "
                   "uploads that ended 2xx; attempt_latency_ms: per 2xx attempt",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": [round(x, 2) for x in load_at_start],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "load averages are 1/5/15-minute figures of the whole machine (others' work included)"},
        "levels": levels,
        "burst": shed,
        "server_errors_total": sum(level["server_errors"] for level in levels) + (shed["server_errors"] if shed else 0),
        "failed_uploads_total": sum(level["failed_uploads"] for level in levels),  # the burst's are meant to be shed
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
