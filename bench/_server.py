"""A real `dermsight serve` on a free loopback port, as a subprocess: start it, wait until
/api/health answers 200, stop it (SIGTERM, then SIGKILL); and an API key for it made the way
an operator makes one (`dermsight keys create`). The one copy of that code, used by
bench/load.py, bench/run.py's api section (bench/sections/api.py) and tests/live_server.py.

Why a file of bench/ and not a module of the package: it is tooling for measuring and
testing the service, not part of it, so it should not ship in the wheel; and the package's
import-linter contract ([tool.importlinter] in pyproject.toml) is an *exhaustive* layers
contract, so a new `dermsight.*` module would need a layer of its own there. This file
imports nothing of DermSight (the server runs in its own process, reached over HTTP), only
the standard library, so it needs no layer. The bench scripts find it on their own folder
(`python bench/X.py` puts bench/ first on sys.path); tests/live_server.py loads it by path.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def dermsight_command() -> list[str]:
    """`dermsight` of this interpreter's environment, else `python -m dermsight.cli`."""
    executable = Path(sys.executable).with_name("dermsight")
    return [str(executable)] if executable.exists() else [sys.executable, "-m", "dermsight.cli"]


def health_status(host: str, port: int, timeout: float = 2.0) -> int | None:
    """The status of GET /api/health, or None when nothing answers."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/api/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def create_api_key(data_dir: Path, name: str = "bench", env: dict | None = None) -> str:
    """A new API key in the database under `data_dir`, from `dermsight keys create NAME
    --data-dir DATA_DIR` (which prints it once on stdout; only its hash is stored)."""
    result = subprocess.run(
        [*dermsight_command(), "keys", "create", name, "--data-dir", str(data_dir)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"dermsight keys create failed ({result.returncode}): {result.stderr[-1500:]}")
    return result.stdout.strip().splitlines()[-1].strip()


class ServeProcess:
    """`dermsight serve --port PORT ARGS` on a free port (unless `port` is given), its stdout
    and stderr appended to `log`, in a session of its own (a Ctrl-C of the caller's terminal
    does not reach it: the caller stops it). Use `wait_ready()`, then `url`; `stop()` at the
    end (also on leaving a `with` block)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, port: int | None = None,
                 host: str = HOST):
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log = Path(log)
        self.command = [*dermsight_command(), "serve", "--port", str(self.port), *args]
        self.started = time.perf_counter()
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.startup_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0, poll: float = 0.05) -> float:
        """Block until /api/health answers 200; the seconds from the start of the process to
        that answer (also kept as `startup_seconds`). Raises RuntimeError, with the log's
        tail, when the server exits first or does not answer within `timeout` (it is killed)."""
        deadline = time.perf_counter() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dermsight serve exited ({self.process.returncode}):\n{self.log_tail()}")
            if health_status(self.host, self.port) == 200:
                self.startup_seconds = time.perf_counter() - self.started
                return self.startup_seconds
            if time.perf_counter() > deadline:
                self.kill()
                raise RuntimeError(
                    f"dermsight serve did not answer /api/health within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(poll)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, no goodbye."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
