"""Who may use the service, how often, and what every response tells the browser.

- **API keys** (``dsk_<prefix>_<secret>``, 256 random bits): stored as SHA-256 only (a
  slow hash adds nothing to a random 256-bit secret), found by their public prefix and
  compared in constant time. Sent as ``Authorization: Bearer <key>`` or ``X-API-Key``.
- **Browser sessions**: the sign-in page takes a key once and sets an HttpOnly,
  SameSite=Lax cookie (Secure over HTTPS) holding a random session token; the key never
  reaches the page's scripts or storage. Sessions live in the server's memory (signed
  out by a restart), end after 12 hours, and end with their key. Unsafe requests made
  with the cookie must carry the app script's X-Requested-With header and no foreign
  Origin (cross-site request forgery).
- **Rate limits**: a token bucket per key (in memory) answers 429 with Retry-After; a
  bucket per client address guards the sign-in form. A full table of buckets forgets
  only refilled ones, never a client being limited.
- **Headers** on every response: a Content-Security-Policy (``default-src 'self'``),
  nosniff, DENY framing, no referrer, a Permissions-Policy, no caching of anything but
  static files, and HSTS over HTTPS.
- **Logging** that never carries request bodies, image bytes, file names or DICOM
  values: the app logs counts, sizes and ids, libraries that could echo file content
  are kept quiet, and a filter on every handler turns bytes into their length.

Everything here is pure ASGI middleware, so a refused request is answered before its
body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import quote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermsight.serving.storage.repository import Storage

KEY_PATTERN = re.compile(r"dsk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
SESSION_COOKIE = "dermsight_session"
CSRF_HEADER, CSRF_VALUE = "x-requested-with", "DermSight"  # sent by static/app.js with every API call
SESSION_SECONDS = 12 * 3600
KEY_CACHE_SECONDS = 5.0  # a revoked key stops working within this time
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()

# Paths anyone may fetch; everything else needs a key or a session (deny by default).
PUBLIC_PATHS = frozenset({"/learn", "/login", "/logout", "/api/health", "/docs", "/redoc",
                          "/openapi.json"})
PUBLIC_PREFIXES = ("/static/",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
# The documentation pages (/docs, /redoc) run the app's own Swagger UI and ReDoc scripts; both set
# inline styles, and ReDoc searches in a blob: worker. Nothing comes from another origin.
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}

log = logging.getLogger("dermsight.security")


# -- API keys -----------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def new_api_key() -> tuple[str, str, str]:
    """A new key: (the key, shown once; its public prefix; its SHA-256)."""
    prefix = secrets.token_hex(6)
    key = f"dsk_{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, hash_key(key)


def create_api_key(storage: Storage, name: str) -> str:
    """Store a new key named `name`; returns the key itself (the only time it exists)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("a key needs a name of 1-100 characters")
    key, prefix, digest = new_api_key()
    storage.add_api_key(name, prefix, digest)
    return key


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: an API key (through a header or a browser session)."""

    key_id: int
    name: str
    prefix: str
    via: str  # "key" or "session"


@dataclass
class _Session:
    key_id: int
    prefix: str
    name: str
    expires: float


class Authenticator:
    """Checks presented keys against the stored hashes, and holds browser sessions."""

    def __init__(self, storage: Storage, session_seconds: float = SESSION_SECONDS, max_sessions: int = 10_000):
        self.storage = storage
        self.session_seconds = session_seconds
        self.max_sessions = max_sessions
        self._keys: dict[str, tuple[float, tuple[int, str, str, bool] | None]] = {}
        self._sessions: dict[str, _Session] = {}

    def _key_row(self, prefix: str) -> tuple[int, str, str, bool] | None:
        """(id, name, hash, active) of the key with `prefix`, cached a few seconds."""
        now = time.monotonic()
        cached = self._keys.get(prefix)
        if cached and now - cached[0] < KEY_CACHE_SECONDS:
            return cached[1]
        row = self.storage.api_key(prefix)
        value = None if row is None else (row.id, row.name, row.key_hash, row.revoked_at is None)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[prefix] = (now, value)
        return value

    def verify(self, key: str) -> Principal | None:
        """The principal of a presented key; None for an unknown, malformed or revoked key."""
        match = KEY_PATTERN.fullmatch(key.strip())
        row = self._key_row(match.group(1)) if match else None
        matches = hmac.compare_digest(hash_key(key.strip()), row[2] if row else _DUMMY_HASH)
        if not (matches and row and row[3]):
            return None
        return Principal(row[0], row[1], match.group(1), "key")

    def start_session(self, principal: Principal) -> str:
        """A new session for a verified key; returns the cookie's token."""
        now = time.monotonic()
        if len(self._sessions) >= self.max_sessions:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            while len(self._sessions) >= self.max_sessions:
                self._sessions.pop(next(iter(self._sessions)))
        token = secrets.token_urlsafe(32)
        self._sessions[hash_key(token)] = _Session(
            principal.key_id, principal.prefix, principal.name, now + self.session_seconds
        )
        return token

    def session(self, token: str) -> Principal | None:
        digest = hash_key(token)
        session = self._sessions.get(digest)
        if session is None:
            return None
        row = self._key_row(session.prefix)
        if session.expires <= time.monotonic() or row is None or not row[3]:
            self._sessions.pop(digest, None)
            return None
        return Principal(session.key_id, session.name, session.prefix, "session")

    def end_session(self, token: str) -> None:
        self._sessions.pop(hash_key(token), None)


# -- rate limits ----------------------------------------------------------------------------


class TokenBucket:
    """Per-client token buckets: `rate` tokens a second, at most `burst` saved up.

    At most `max_clients` buckets are kept. A newcomer to a full table evicts the buckets
    that have refilled (forgetting a full bucket changes nothing); when none has, newcomers
    wait until one has, so flooding the table never resets a limited client."""

    def __init__(self, rate: float, burst: float, max_clients: int = 50_000):
        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self._buckets: dict[object, tuple[float, float]] = {}
        self._next_refill = -math.inf  # while the table is full, no bucket refills before this time

    def take(self, client: object, now: float | None = None) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        if client not in self._buckets and len(self._buckets) >= self.max_clients:
            wait = self._evict_refilled(now)
            if wait > 0:
                return wait
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _evict_refilled(self, now: float) -> float:
        """Forget the buckets that are full again: 0.0 when that made room, else the
        seconds until the first one is (the table is not scanned again before then)."""
        if now < self._next_refill:
            return self._next_refill - now
        full_at = {c: last + (self.burst - tokens) / self.rate for c, (tokens, last) in self._buckets.items()}
        self._buckets = {c: self._buckets[c] for c, at in full_at.items() if at > now}
        if len(self._buckets) < self.max_clients:
            return 0.0
        self._next_refill = min(full_at[c] for c in self._buckets)
        return self._next_refill - now


# -- middleware ---------------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Adds the security headers (and no-store caching) to every HTTP response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        csp = DOCS_CSP if path in ("/docs", "/redoc") else CSP
        https = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = {"content-security-policy": csp, **SECURITY_HEADERS}
                if not path.startswith("/static/"):
                    extra["cache-control"] = "no-store"
                if https:
                    extra["strict-transport-security"] = "max-age=31536000"
                headers += [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def foreign_origin(headers: dict[str, str]) -> bool:
    """True when the request names an Origin that is not this host. (Browsers send
    "Origin: null" for same-origin POSTs of a page with Referrer-Policy no-referrer.)"""
    origin = headers.get("origin")
    if not origin or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


def csrf_safe(headers: dict[str, str]) -> bool:
    """An unsafe request made with the session cookie must carry the header the app's own
    script adds (a custom header: another site cannot send it without a CORS preflight,
    which is never granted with credentials) and must not name a foreign Origin."""
    return headers.get(CSRF_HEADER) == CSRF_VALUE and not foreign_origin(headers)


class AccessControl:
    """Deny by default: public paths pass; the rest need an API key header or a browser
    session (pages without one are sent to the sign-in page), within the key's rate
    limit. Busy scoring endpoints are refused here, before their body is read. In dev
    mode (no `auth`) only the busy check applies."""

    def __init__(self, app: ASGIApp, auth: Authenticator | None, limiter: TokenBucket | None, admission=None):
        self.app = app
        self.auth = auth
        self.limiter = limiter
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        state = scope.setdefault("state", {})
        state["principal"] = None
        headers = _headers(scope)
        if self.auth is not None and not (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            principal, cookie_token = self._principal(headers)
            if principal is None:
                return await self._refuse(scope, send, path, method, headers, bool(cookie_token))
            if principal.via == "session" and method not in SAFE_METHODS and not csrf_safe(headers):
                detail = "cross-site request refused: use the DermSight page itself, or an API key"
                return await send_json(send, 403, detail)
            wait = self.limiter.take(principal.key_id) if self.limiter else 0.0
            if wait > 0:
                retry = max(1, math.ceil(wait))
                detail = (f"rate limit exceeded for API key '{principal.name}': at most {self.limiter.rate:g} requests "
                          f"a second (bursts of {self.limiter.burst:g}); retry in {retry} s")
                return await send_json(send, 429, detail, {"Retry-After": str(retry)})
            state["principal"] = principal
        if self.admission is not None and method == "POST" and _is_scoring(path) and self.admission.full():
            retry = self.admission.retry_after()
            return await send_json(send, 503, self.admission.busy_message(retry), {"Retry-After": str(retry)})
        await self.app(scope, receive, send)

    def _principal(self, headers: dict[str, str]) -> tuple[Principal | None, str | None]:
        authorization = headers.get("authorization", "")
        key = headers.get("x-api-key") or (authorization[7:] if authorization[:7].lower() == "bearer " else None)
        if key:
            return self.auth.verify(key), None
        token = session_token(headers)
        return (self.auth.session(token) if token else None), token

    async def _refuse(self, scope, send, path, method, headers, had_cookie) -> None:
        wants_page = method == "GET" and not path.startswith("/api/") and "text/html" in headers.get("accept", "")
        if wants_page:
            target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
            location = f"/login?next={quote(target, safe='')}"
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")]})
            return await send({"type": "http.response.body", "body": b""})
        has_key = "authorization" in headers or "x-api-key" in headers
        detail = (
            "invalid or revoked API key" if has_key else
            "session expired: sign in again at /login" if had_cookie else
            "API key required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (create one with "
            "`dermsight keys create NAME`), or sign in at /login"
        )
        await send_json(send, 401, detail, {"WWW-Authenticate": 'Bearer realm="dermsight"'})


def _is_scoring(path: str) -> bool:
    return path == "/api/images" or (path.startswith("/api/patients/") and path.endswith("/rescore"))


def session_token(headers: dict[str, str]) -> str | None:
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed Cookie header is no session
        return None
    morsel = cookie.get(SESSION_COOKIE)
    return morsel.value if morsel and morsel.value else None


def safe_next(target: str | None) -> str:
    """A same-site path to go to after signing in (never another site)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or "\\" in target:
        return "/"
    return target


# -- logging ------------------------------------------------------------------------------


class RedactFilter(logging.Filter):
    """Never let bytes (image or DICOM content) or very long values reach a log line."""

    MAX_ARGUMENT = 300
    MAX_MESSAGE = 2000

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, (bytes, bytearray, memoryview)):
            record.msg, record.args = f"<{len(record.msg)} bytes>", None
        if isinstance(record.args, dict):
            record.args = {k: self._safe(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(self._safe(a) for a in record.args)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is no reason to lose the line
            return True
        if len(message) > self.MAX_MESSAGE:
            record.msg, record.args = message[: self.MAX_MESSAGE] + " [truncated]", None
        return True

    def _safe(self, value: object) -> object:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{len(value)} bytes>"
        if isinstance(value, str) and len(value) > self.MAX_ARGUMENT:
            return value[: self.MAX_ARGUMENT] + "..."
        return value


# Libraries that could put file content or header values into a log line.
QUIET_LOGGERS = {"python_multipart": logging.WARNING, "multipart": logging.WARNING, "pydicom": logging.CRITICAL,
                 "PIL": logging.WARNING}


def quiet_libraries() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class StderrHandler(logging.StreamHandler):
    """A stream handler on whatever sys.stderr is when a record comes (not when the
    handler was made: a replaced or closed stream never breaks logging)."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr


class StdoutHandler(StderrHandler):
    @property
    def stream(self):
        return sys.stdout


def log_config(level: str = "info") -> dict:
    """uvicorn's logging configuration plus DermSight's loggers, every handler filtered."""
    from uvicorn.config import LOGGING_CONFIG

    config = deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": RedactFilter}}
    for handler in config["handlers"].values():
        stream = handler.pop("stream", "ext://sys.stderr")
        handler["class"] = f"{__name__}.{'StdoutHandler' if stream.endswith('stdout') else 'StderrHandler'}"
        handler["filters"] = ["redact"]
    config["formatters"]["dermsight"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["dermsight"] = {"class": f"{__name__}.StderrHandler", "formatter": "dermsight",
                                      "filters": ["redact"]}
    config["loggers"]["dermsight"] = {"handlers": ["dermsight"], "level": level.upper(), "propagate": False}
    for name, value in QUIET_LOGGERS.items():
        config["loggers"][name] = {"level": logging.getLevelName(value)}
    return config


def configure_logging(level: str = "info") -> None:
    import logging.config

    logging.config.dictConfig(log_config(level))

