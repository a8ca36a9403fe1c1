"""The middleware stack. Added outermost last, so a request meets them in this order:
security headers on every answer, then CORS (only with an allow-list), then the request
size and time limits (``limits``), then the audit trail (``audit``: it records what the
layers inside answer), then keys, sessions, roles, rate limits and the busy check
(``security.AccessControl``). All of them answer a refused request before its body is read."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from dermsight.serving.audit import AuditTrail
from dermsight.serving.limits import Admission, RequestLimits, Settings
from dermsight.serving.security import AccessControl, Authenticator, FailureLimiter, SecurityHeaders, TokenBucket
from dermsight.serving.storage.repository import Storage


def add_middleware(
    app: FastAPI, settings: Settings, auth: Authenticator | None, rate_limiter: TokenBucket | None,
    failures: FailureLimiter, admission: Admission, storage: Storage,
) -> None:
    """Install the stack on `app` (`auth` and `rate_limiter` are None in dev mode)."""
    app.add_middleware(AccessControl, auth=auth, limiter=rate_limiter, failures=failures, admission=admission)
    app.add_middleware(AuditTrail, storage=storage, dev=auth is None)
    app.add_middleware(RequestLimits, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"], allow_credentials=False, max_age=600,
        )
    app.add_middleware(SecurityHeaders)
