"""Signing in and out in a browser: the sign-in page takes an API key once and sets the
session cookie (see ``security``); without keys (dev mode) both just send the browser on.
A wrong key counts against the failure limits (``security.FailureLimiter``); a valid key
always signs in. Both land in the audit trail (``audit``) with what is known of the key."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dermsight.serving.dependencies import AuthDep, FailuresDep, PageDep
from dermsight.serving.security import (
    SESSION_COOKIE,
    client_address,
    foreign_origin,
    retry_after,
    safe_next,
    session_token,
)

log = logging.getLogger("dermsight.serving")
router = APIRouter(include_in_schema=False)


@router.get("/login", response_class=HTMLResponse)
def login_page(page: PageDep, auth: AuthDep, next: str = "/") -> Response:
    if auth is None:
        return RedirectResponse(safe_next(next), status_code=303)
    return page("login.html", next=safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request, page: PageDep, auth: AuthDep, failures: FailuresDep,
    key: Annotated[str, Form(max_length=200)] = "", next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    if auth is None:
        return RedirectResponse(safe_next(next), status_code=303)
    if foreign_origin({k.lower(): v for k, v in request.headers.items()}):
        return page("login.html", status_code=403, next="/", error="Sign in from this page itself.")
    principal = auth.verify(key)
    if principal is None:
        request.state.audit_key = auth.identify(key)
        wait = failures.failed(client_address(request.scope), request.state.audit_key[2])
        if wait > 0:
            retry = retry_after(wait)
            response = page("login.html", status_code=429, next=safe_next(next),
                            error=f"Too many failed attempts: wait {retry['Retry-After']} s and try again.")
            response.headers.update(retry)
            return response
        log.warning("sign-in refused (unknown or revoked key)")
        return page("login.html", status_code=401, next=safe_next(next),
                    error="That key is not valid (or it was revoked).")
    request.state.principal = principal
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE, auth.start_session(principal), httponly=True, samesite="lax", path="/",
        secure=request.url.scheme == "https",
    )
    log.info("signed in with key %s (%s)", principal.prefix, principal.name)
    return response


@router.post("/logout")
def logout(request: Request, auth: AuthDep) -> Response:
    token = session_token({k.lower(): v for k, v in request.headers.items()})
    if auth is not None and token:
        request.state.principal = auth.session(token)  # for the audit trail
        auth.end_session(token)
    response = RedirectResponse("/login" if auth is not None else "/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response
