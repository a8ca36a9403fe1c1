"""Who may use the service, how often, and what every response tells the browser (what the logs may hold: serving.logs).

- **API keys** (``dsk_<prefix>_<secret>``, 256 random bits): stored as SHA-256 only (a
  slow hash adds nothing to a random 256-bit secret), found by their public prefix and
  compared in constant time. Sent as ``Authorization: Bearer <key>`` or ``X-API-Key``.
- **Roles**: a key is ``read``, ``clinician`` or ``admin`` (each may do what the one
  before it may); the request's method decides the role it needs (``required_role``), and
  a key without it gets 403 naming the role.
- **Browser sessions**: the sign-in page takes a key once and sets an HttpOnly,
  SameSite=Lax cookie (Secure over HTTPS) holding a random session token; the key never
  reaches the page's scripts or storage. Sessions live in the server's memory (signed
  out by a restart), end after 12 hours, and end with their key. Unsafe requests made
  with the cookie must carry the app script's X-Requested-With header and no foreign
  Origin (cross-site request forgery).
- **Rate limits**: a token bucket per key (in memory) answers 429 with Retry-After.
  Failed authentication (a wrong key in a header or the sign-in form) is limited per
  client address and per key prefix, each in its own bucket: once either is spent, a
  failure is answered 429 instead of 401. A valid key is never refused for another's
  failures behind the same address (keys are 256-bit: the limit slows floods down, it is
  not what stops guessing). The client address is the TCP peer's unless the server was
  told to trust a proxy's forwarded headers (``dermsight serve --forwarded-allow-ips``).
  A full table of buckets forgets only refilled ones, never a client being limited.
- **Headers** on every response: a Content-Security-Policy (``default-src 'self'``),
  nosniff, DENY framing, no referrer, a Permissions-Policy, no caching of anything but
  static files, and HSTS over HTTPS.
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
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import quote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermsight.serving.storage.models import ROLES, ApiKey
from dermsight.serving.storage.repository import Storage

KEY_PATTERN = re.compile(r"dsk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
ROLE_NEEDS = {"read": "viewing", "clinician": "uploading, scoring and creating patients", "admin": "deleting"}
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


def create_api_key(storage: Storage, name: str, *, role: str) -> str:
    """Store a new key named `name` with `role` (one of ROLES) and record it in the audit
    trail; returns the key itself (the only time it exists)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("a key needs a name of 1-100 characters")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    key, prefix, digest = new_api_key()
    row = storage.add_api_key(name, prefix, digest, role)
    storage.add_audit_event("cli", "key.create", "done", key=(row.id, name, prefix), objects=f"key {row.id} ({role})")
    return key


def revoke_api_keys(storage: Storage, which: str) -> list[ApiKey]:
    """Revoke the active keys whose id, name or prefix is `which`, each recorded in the
    audit trail; returns them."""
    revoked = storage.revoke_api_keys(which)
    for key in revoked:
        storage.add_audit_event("cli", "key.revoke", "done", key=(key.id, key.name, key.prefix),
                                objects=f"key {key.id}")
    return revoked


def allows(role: str, needed: str) -> bool:
    """Whether a key of `role` may do what needs `needed` (each role includes the ones before it)."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def required_role(method: str) -> str:
    """The role a request needs: reading for safe methods, deleting is admin's, every
    other change (uploads, scoring, new patients) clinician's."""
    return "read" if method in SAFE_METHODS else "admin" if method == "DELETE" else "clinician"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: an API key (through a header or a browser session)."""

    key_id: int
    name: str
    prefix: str
    via: str  # "key" or "session"
    role: str  # one of ROLES


@dataclass(frozen=True)
class _KeyRow:
    id: int
    name: str
    key_hash: str
    active: bool
    role: str


@dataclass
class _Session:
    key_id: int
    prefix: str
    expires: float


class Authenticator:
    """Checks presented keys against the stored hashes, and holds browser sessions."""

    def __init__(self, storage: Storage, session_seconds: float = SESSION_SECONDS, max_sessions: int = 10_000):
        self.storage = storage
        self.session_seconds = session_seconds
        self.max_sessions = max_sessions
        self._keys: dict[str, tuple[float, _KeyRow | None]] = {}
        self._sessions: dict[str, _Session] = {}

    def _key_row(self, prefix: str) -> _KeyRow | None:
        """The key with `prefix`, cached a few seconds."""
        now = time.monotonic()
        cached = self._keys.get(prefix)
        if cached and now - cached[0] < KEY_CACHE_SECONDS:
            return cached[1]
        key = self.storage.api_key(prefix)
        row = None if key is None else _KeyRow(key.id, key.name, key.key_hash, key.revoked_at is None, key.role)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[prefix] = (now, row)
        return row

    def verify(self, key: str) -> Principal | None:
        """The principal of a presented key; None for an unknown, malformed or revoked key."""
        match = KEY_PATTERN.fullmatch(key.strip())
        row = self._key_row(match.group(1)) if match else None
        matches = hmac.compare_digest(hash_key(key.strip()), row.key_hash if row else _DUMMY_HASH)
        if not (matches and row and row.active):
            return None
        return Principal(row.id, row.name, match.group(1), "key", row.role)

    def identify(self, key: str) -> tuple[int | None, str | None, str | None]:
        """(id, name, prefix) of the key a failed attempt named, as far as known: the prefix
        when the text is shaped like a key, id and name when a key has that prefix. Never
        any of the secret (nor text that is not key-shaped: it could be a password)."""
        match = KEY_PATTERN.fullmatch(key.strip())
        if not match:
            return None, None, None
        row = self._key_row(match.group(1))
        return (row.id, row.name, match.group(1)) if row else (None, None, match.group(1))

    def start_session(self, principal: Principal) -> str:
        """A new session for a verified key; returns the cookie's token."""
        now = time.monotonic()
        if len(self._sessions) >= self.max_sessions:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            while len(self._sessions) >= self.max_sessions:
                self._sessions.pop(next(iter(self._sessions)))
        token = secrets.token_urlsafe(32)
        self._sessions[hash_key(token)] = _Session(principal.key_id, principal.prefix, now + self.session_seconds)
        return token

    def session(self, token: str) -> Principal | None:
        digest = hash_key(token)
        session = self._sessions.get(digest)
        if session is None:
            return None
        row = self._key_row(session.prefix)
        if session.expires <= time.monotonic() or row is None or not row.active:
            self._sessions.pop(digest, None)
            return None
        return Principal(session.key_id, row.name, session.prefix, "session", row.role)

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


class FailureLimiter:
    """Failed authentication, limited in two buckets of `rate` a second and `burst` each:
    per client address, and per key prefix (a wrong secret for a real key's prefix, from
    wherever). Only failures take tokens, so a valid key is never refused for them."""

    def __init__(self, rate: float, burst: float):
        self.by_address = TokenBucket(rate, burst)
        self.by_prefix = TokenBucket(rate, burst)

    def failed(self, address: str, prefix: str | None) -> float:
        """Count one failure: 0.0 while both buckets allow it, else the seconds to wait."""
        wait = self.by_address.take(address)
        return max(wait, self.by_prefix.take(prefix)) if prefix else wait

    @staticmethod
    def message(wait: float) -> str:
        return f"too many failed sign-ins or invalid API keys; retry in {max(1, math.ceil(wait))} s"


def client_address(scope: Scope) -> str:
    """The client's address: the TCP peer's, or a trusted proxy's forwarded one (uvicorn
    rewrites it only for `--forwarded-allow-ips`)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait)))}


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
    limit and role. A wrong key counts against the failure limits (429 once spent).
    Busy scoring endpoints are refused here, before their body is read. In dev mode (no
    `auth`) only the busy check applies. Sets ``state["principal"]`` (and, for a wrong
    key, ``state["audit_key"]``) for the audit trail."""

    def __init__(self, app: ASGIApp, auth: Authenticator | None, limiter: TokenBucket | None,
                 failures: FailureLimiter | None = None, admission=None):
        self.app = app
        self.auth = auth
        self.limiter = limiter
        self.failures = failures
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        state = scope.setdefault("state", {})
        state["principal"] = None
        headers = _headers(scope)
        if self.auth is not None and not (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            principal, key, cookie_token = self._principal(headers)
            if principal is None:
                if key is not None:
                    state["audit_key"] = self.auth.identify(key)
                    wait = self.failures.failed(client_address(scope), state["audit_key"][2]) if self.failures else 0
                    if wait > 0:
                        return await send_json(send, 429, FailureLimiter.message(wait), retry_after(wait))
                return await self._refuse(scope, send, path, method, headers, bool(cookie_token))
            state["principal"] = principal
            if principal.via == "session" and method not in SAFE_METHODS and not csrf_safe(headers):
                detail = "cross-site request refused: use the DermSight page itself, or an API key"
                return await send_json(send, 403, detail)
            wait = self.limiter.take(principal.key_id) if self.limiter else 0.0
            if wait > 0:
                detail = (f"rate limit exceeded for API key '{principal.name}': at most {self.limiter.rate:g} requests "
                          f"a second (bursts of {self.limiter.burst:g}); retry in {max(1, math.ceil(wait))} s")
                return await send_json(send, 429, detail, retry_after(wait))
            needed = required_role(method)
            if not allows(principal.role, needed):
                detail = (f"API key '{principal.name}' has the '{principal.role}' role; {ROLE_NEEDS[needed]} needs the "
                          f"'{needed}' role (ask an administrator for such a key)")
                return await send_json(send, 403, detail)
        if self.admission is not None and method == "POST" and _is_scoring(path) and self.admission.full():
            retry = self.admission.retry_after()
            return await send_json(send, 503, self.admission.busy_message(retry), {"Retry-After": str(retry)})
        await self.app(scope, receive, send)

    def _principal(self, headers: dict[str, str]) -> tuple[Principal | None, str | None, str | None]:
        """(principal, the presented key, the session cookie's token)."""
        authorization = headers.get("authorization", "")
        key = headers.get("x-api-key") or (authorization[7:] if authorization[:7].lower() == "bearer " else None)
        if key:
            return self.auth.verify(key), key, None
        token = session_token(headers)
        return (self.auth.session(token) if token else None), None, token

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
            "`dermsight keys create NAME --role ROLE`), or sign in at /login"
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
