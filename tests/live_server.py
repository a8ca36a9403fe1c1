"""Real servers on 127.0.0.1 for the security, crash and load tests: the app under uvicorn
in a thread, or `dermsight serve` as a subprocess; and raw HTTP over a socket for what
an HTTP client library would not send (slow bodies, lying lengths, un-normalised paths).

The subprocess and the free port come from bench/_server.py, the one copy shared with the
benchmarks (see its docstring for why it lives there); it is loaded by path, as `_server`,
so that bench/load.py imported by a test finds the same module."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn


def _load_server_helper():
    if "_server" in sys.modules:
        return sys.modules["_server"]
    path = Path(__file__).resolve().parents[1] / "bench" / "_server.py"
    spec = importlib.util.spec_from_file_location("_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_server"] = module
    spec.loader.exec_module(module)
    return module


_server = _load_server_helper()
free_port = _server.free_port


@contextlib.contextmanager
def in_thread(app, **options) -> Iterator[str]:
    """`app` under uvicorn in a daemon thread on a free port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Subprocess(_server.ServeProcess):
    """`dermsight serve ARGS` on a free port, its output in a log file (bench/_server.py's
    ServeProcess; `wait_ready`, `stop`, `kill`, `url`, `port`, `process`, `log`)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        super().__init__(args, log, env)

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            super().wait_ready(timeout)
        except RuntimeError as err:
            raise AssertionError(str(err)) from None


def raw_request(url: str, request: bytes, *, then: bytes = b"", pause: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send `request` bytes to the server at `url`, optionally `then` more after `pause`
    seconds; returns everything the server sends until it closes or `timeout` passes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        if then:
            time.sleep(pause)
            with contextlib.suppress(OSError):
                connection.sendall(then)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = connection.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
