"""Bounds on what one request may cost the service.

- **Request size**: a request whose Content-Length is over the cap is answered 413
  before any of its body is read; a body without a length is counted as it arrives
  and cut off at the cap (413). Each uploaded file has its own, smaller cap
  (`routes.images.MAX_FILE_BYTES`, 20 MB; 413).
- **Slow uploads**: the body must keep coming (at most `body_idle_timeout` seconds
  between chunks) and be complete within `body_deadline`; else 408 and the
  connection closes. (uvicorn bounds header size and keep-alive idling; a reverse
  proxy in front bounds slow headers: see the README's Security section.)
- **Scoring capacity**: at most `max_active` uploads or re-scorings run at once (off
  the event loop, in threads) and at most `max_queue` more wait for a slot; beyond
  that, or after waiting `queue_timeout` seconds, the answer is 503 with Retry-After
  straight away, instead of a queue that grows without bound.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermsight.serving.security import send_json

MB = 2**20


def size_text(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= MB else f"{n / 1024:.0f} KB"


@dataclass
class Settings:
    """How the service protects itself; `dermsight serve` options set the main ones."""

    dev: bool = False  # no API keys (and so no rate limits): for one person on 127.0.0.1
    max_request_bytes: int = 32 * MB
    body_idle_timeout: float = 30.0
    body_deadline: float = 300.0
    rate: float = 20.0  # requests a second per API key ...
    burst: float = 120.0  # ... with bursts this large (a patient page loads two images per lesion)
    failure_rate: float = 0.2  # failed sign-ins or invalid keys a second, per client address and per key prefix ...
    failure_burst: float = 10.0
    max_active: int = 2  # scoring requests running at once
    max_queue: int = 16  # and waiting for a slot
    queue_timeout: float = 30.0
    cors_origins: tuple[str, ...] = field(default_factory=tuple)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the {size_text(limit)} limit", {"Connection": "close"})


class BodyTimeout(HTTPException):
    def __init__(self, what: str):
        super().__init__(408, f"request body {what}; the upload was cancelled", {"Connection": "close"})


class RequestLimits:
    """The request size cap and the slow-body timeouts (see the module docstring), read
    from `settings` at each request."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.settings.max_request_bytes
        idle_timeout, deadline = self.settings.body_idle_timeout, self.settings.body_deadline
        length = None
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await send_json(send, 400, "invalid Content-Length header", {"Connection": "close"})
        if length is not None and length > max_bytes:
            detail = f"request is {length / MB:.1f} MB, over the {size_text(max_bytes)} limit"
            return await send_json(send, 413, detail, {"Connection": "close"})

        started = time.monotonic()
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # afterwards the app only listens for a disconnect: no timeout then
                return await receive()
            remaining = deadline - (time.monotonic() - started)
            if remaining <= 0:
                raise BodyTimeout(f"not complete within {deadline:g} s")
            try:
                message = await asyncio.wait_for(receive(), min(idle_timeout, remaining))
            except TimeoutError:
                idle = remaining > idle_timeout
                raise BodyTimeout(
                    f"stalled for {idle_timeout:g} s" if idle else f"not complete within {deadline:g} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge(max_bytes)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, limited_receive, send)


class Overloaded(Exception):
    """Every scoring slot and queue place is taken: answer 503 with Retry-After."""

    def __init__(self, retry_after: int, message: str):
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    """At most `max_active` scoring runs at once and `max_queue` waiting (see above)."""

    def __init__(self, max_active: int = 2, max_queue: int = 16, queue_timeout: float = 30.0):
        self.max_active = max(1, max_active)
        self.capacity = self.max_active + max(0, max_queue)
        self.queue_timeout = queue_timeout
        self._slots = threading.BoundedSemaphore(self.max_active)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.seconds_per_run = 1.0  # moving average, for Retry-After

    def full(self) -> bool:
        return self.in_flight >= self.capacity

    def retry_after(self) -> int:
        return max(1, math.ceil(self.seconds_per_run * (self.in_flight + 1) / self.max_active))

    def busy_message(self, retry: int) -> str:
        return (f"DermSight is busy: {self.in_flight} scoring requests are running or waiting "
                f"(at most {self.capacity}); retry in {retry} s")

    async def run(self, function, *args):
        """`function(*args)` in a worker thread once a slot is free; Overloaded when the
        wait queue is full or the wait takes longer than `queue_timeout`."""
        with self._lock:
            if self.in_flight >= self.capacity:
                retry = self.retry_after()
                raise Overloaded(retry, self.busy_message(retry))
            self.in_flight += 1
        try:
            return await run_in_threadpool(self._in_slot, function, *args)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _in_slot(self, function, *args):
        if not self._slots.acquire(timeout=self.queue_timeout):
            retry = self.retry_after()
            raise Overloaded(retry, f"DermSight is busy: no scoring slot within {self.queue_timeout:g} s; "
                                    f"retry in {retry} s")
        started = time.monotonic()
        try:
            return function(*args)
        finally:
            self._slots.release()
            self.seconds_per_run = 0.8 * self.seconds_per_run + 0.2 * (time.monotonic() - started)
