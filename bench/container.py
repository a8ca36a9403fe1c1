"""Container benchmark: DermSight's OCI image (the Dockerfile) with podman, against the same
server on the host. Prints one JSON object:

- image: its size, and the build time from the local base image (scripts/container.sh build;
  cold: `--no-cache`, every layer made again, wheels downloaded; warm: podman's layer cache
  after a source change, which is what the test suite pays);
- start to ready: from `podman run -d` (and from starting `dermsight serve` on the host) to
  /api/health answering 200, the median of --starts;
- the API's single-client latency (p50, p90): one keep-alive client uploading real HAM10000
  images (enlarged to 600x450 in memory, with their age, sex and site: bench/sections/api.py's
  uploads), a different image per request, in production mode (API key, rate limits on, set
  high enough not to throttle one client) to the container (published port, -p) and to the
  host's server, alternately request by request, so both see the same machine load;
- the load average at the start and the end (the machine is shared: every number is
  wall-clock time).

    .venv/bin/python bench/container.py [--requests 60] [--starts 3] [--no-cold] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _server
from sections.api import Client, api_uploads, multipart

REPO = Path(__file__).resolve().parents[1]
CONTAINER_SCRIPT = REPO / "scripts" / "container.sh"
IMAGE = "localhost/dermsight:bench"
RATE, BURST = "1000", "1000"  # the key's rate limit: on, as in production, but above one client's pace
TARGETS = {"image_mb": 800, "start_to_ready_s": 10, "p50_container_over_host": 1.10}


def podman_env() -> dict[str, str]:
    """scripts/containers.conf unless CONTAINERS_CONF names another (as scripts/container.sh does)."""
    default = REPO / "scripts" / "containers.conf"
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(default))}


def podman(*args: str) -> str:
    result = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def build(*extra: str) -> float:
    """Seconds of `scripts/container.sh build EXTRA` (the base image already made)."""
    started = time.perf_counter()
    result = subprocess.run(["bash", str(CONTAINER_SCRIPT), "build", *extra], env={**podman_env(), "IMAGE": IMAGE},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/container.sh build failed ({result.returncode}): {result.stderr[-3000:]}")
    return time.perf_counter() - started


def warm_rebuild() -> float:
    """A rebuild after a change to a source file (a comment appended, then removed)."""
    source = REPO / "src" / "dermsight" / "__init__.py"
    original = source.read_bytes()
    try:
        source.write_bytes(original + f"# container bench {uuid.uuid4().hex}\n".encode())
        return build()
    finally:
        source.write_bytes(original)


def wait_ready(port: int, container: str | None = None, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    while _server.health_status("127.0.0.1", port, timeout=1.0) != 200:
        if time.perf_counter() > deadline:
            logs = podman("logs", container)[-2000:] if container else ""
            raise RuntimeError(f"not ready within {timeout:g} s {logs}")
        time.sleep(0.02)


def start_container(volume: str, port: int) -> tuple[str, float]:
    """A detached container on `volume`, published on 127.0.0.1:`port`; (its name, seconds to ready)."""
    name = f"dermsight-bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{volume}:/data", IMAGE,
           "serve", "--host", "0.0.0.0", "--port", "8000", "--rate-limit", RATE, "--burst", BURST)
    wait_ready(port, name)
    return name, time.perf_counter() - started


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 1), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
            "n": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="Timed uploads to each server.")
    parser.add_argument("--starts", type=int, default=3, help="Container (and host) starts timed.")
    parser.add_argument("--no-cold", action="store_true", help="Skip the cold (--no-cache) build.")
    parser.add_argument("--output", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    load_start = os.getloadavg()
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "targets": TARGETS}

    build()  # the base image and the current layers, not timed
    result["build_seconds"] = {
        "cold_no_cache": None if args.no_cold else round(build("--no-cache"), 1),
        "warm_after_source_change": round(warm_rebuild(), 1),
    }
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).strip())
    result["image_mb"] = round(size / 1e6, 1)

    uploads = [multipart(jpeg, form) for jpeg, form in api_uploads(2 * args.requests + 6)]
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-bench-container-"))
    volume = f"dermsight-bench-{uuid.uuid4().hex[:8]}"
    containers: list[str] = []
    host = None
    try:
        podman("volume", "create", volume)
        container_key = podman("run", "--rm", "-v", f"{volume}:/data", IMAGE, "keys", "create", "bench").split()[-1]
        container_starts, host_starts = [], []
        for _ in range(args.starts):
            name, seconds = start_container(volume, _server.free_port())
            container_starts.append(seconds)
            podman("rm", "-f", "-t0", name)
        data_dir = workdir / "host-data"
        host_key = _server.create_api_key(data_dir, "bench")
        for _ in range(args.starts):
            with _server.ServeProcess(["--data-dir", str(data_dir), "--rate-limit", RATE, "--burst", BURST],
                                      workdir / "host.log") as server:
                host_starts.append(server.wait_ready(120, poll=0.02))
        result["start_to_ready_s"] = {"container_median": round(statistics.median(container_starts), 2),
                                      "container_all": [round(s, 2) for s in container_starts],
                                      "host_median": round(statistics.median(host_starts), 2)}

        port = _server.free_port()
        name, _ = start_container(volume, port)
        containers.append(name)
        host = _server.ServeProcess(["--data-dir", str(data_dir), "--rate-limit", RATE, "--burst", BURST],
                                    workdir / "host.log")
        host.wait_ready(120, poll=0.02)
        clients = {"container": Client(port, {"Connection": "keep-alive", "Authorization": f"Bearer {container_key}"}),
                   "host": Client(host.port, {"Connection": "keep-alive", "Authorization": f"Bearer {host_key}"})}
        latencies: dict[str, list[float]] = {"container": [], "host": []}
        bodies = iter(uploads)
        for where in ("container", "host", "container", "host", "container", "host"):  # warm-up
            status, payload = clients[where].request("POST", "/api/images", *next(bodies))
            if status != 201:
                raise RuntimeError(f"{where}: POST /api/images answered {status}: {payload[:300]!r}")
        for index in range(2 * args.requests):
            where = ("container", "host")[index % 2]
            body, content_type = next(bodies)
            started = time.perf_counter()
            status, payload = clients[where].request("POST", "/api/images", body, content_type)
            elapsed = (time.perf_counter() - started) * 1000
            if status != 201:
                raise RuntimeError(f"{where}: POST /api/images answered {status}: {payload[:300]!r}")
            latencies[where].append(elapsed)
        api = {where: percentiles(values) for where, values in latencies.items()}
        api["p50_container_over_host"] = round(api["container"]["p50"] / api["host"]["p50"], 3)
        result["api_single_client_ms"] = api
    finally:
        if host is not None:
            host.stop()
        for name in containers:
            subprocess.run(["podman", "rm", "-f", "-t0", name], env=podman_env(), capture_output=True)
        subprocess.run(["podman", "volume", "rm", "-f", volume], env=podman_env(), capture_output=True)
    result["load_average"] = {"start": [round(x, 2) for x in load_start],
                              "end": [round(x, 2) for x in os.getloadavg()]}
    result["meets_targets"] = {
        "image_mb": result["image_mb"] <= TARGETS["image_mb"],
        "start_to_ready_s": result["start_to_ready_s"]["container_median"] <= TARGETS["start_to_ready_s"],
        "p50_container_over_host": api["p50_container_over_host"] <= TARGETS["p50_container_over_host"],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
