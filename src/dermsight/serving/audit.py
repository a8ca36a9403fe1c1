"""The audit trail: one database row for every state-changing request (POST, DELETE, ...)
that a key made or tried to make, sign-in attempts included: when, which key (id, name,
public prefix; ``session`` or ``key`` for how it came), the action, the ids of what it
touched and how it ended. The row is written before the answer leaves, so an answered
delete always has its row. Never recorded: file names, ages, sexes, sites, patient
references, keys or any other value a request carried. Not recorded: answers 429 and 503
(refused for load before any work: a flood would otherwise write the table full, and
shedding must stay fast), and requests that presented no key at all.

Routes add the ids of what they created with :func:`note_objects`; the trail is read with
``dermsight audit`` (``Storage.audit_events``) and no API route changes it."""

from __future__ import annotations

import logging
import re

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermsight.serving.security import SAFE_METHODS
from dermsight.serving.storage.models import AuditEvent
from dermsight.serving.storage.repository import Storage

# (method, path, action, what the path's number is)
ACTIONS = (
    ("POST", re.compile(r"/api/patients"), "patient.create", None),
    ("DELETE", re.compile(r"/api/patients/(\d{1,18})"), "patient.delete", "patient"),
    ("POST", re.compile(r"/api/patients/(\d{1,18})/rescore"), "patient.rescore", "patient"),
    ("POST", re.compile(r"/api/images"), "image.upload", None),
    ("DELETE", re.compile(r"/api/images/(\d{1,18})"), "image.delete", "image"),
    ("POST", re.compile(r"/login"), "sign_in", None),
    ("POST", re.compile(r"/logout"), "sign_out", None),
)
log = logging.getLogger("dermsight.audit")


def action_of(method: str, path: str) -> tuple[str, list[str]]:
    """The action a request stands for and the object it names in its path ("other" for
    paths outside the API's actions: their text is never recorded)."""
    for action_method, pattern, action, kind in ACTIONS:
        match = pattern.fullmatch(path) if method == action_method else None
        if match:
            return action, [f"{kind} {match.group(1)}"] if kind else []
    return "other", []


def event_record(event: AuditEvent) -> dict[str, object]:
    """An audit row as `dermsight audit` shows it."""
    return {"at": event.at.isoformat(timespec="seconds"), "actor": event.actor, "key": event.key_name,
            "prefix": event.key_prefix, "action": event.action, "objects": event.objects, "outcome": event.outcome,
            "status": event.status}


def outcome_of(status: int) -> str:
    return "done" if status < 400 else "refused" if status in (401, 403) else "failed"


def note_objects(request: Request, *objects: str) -> None:
    """Add ids to the request's audit row, e.g. ``note_objects(request, "patient 3")``."""
    request.scope.setdefault("state", {}).setdefault("audit_objects", []).extend(objects)


class AuditTrail:
    """Writes the audit row of each unsafe request when its answer starts (see the module
    docstring). Sits outside ``security.AccessControl``, whose refusals it records."""

    def __init__(self, app: ASGIApp, storage: Storage, dev: bool):
        self.app = app
        self.storage = storage
        self.dev = dev

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method", "GET") in SAFE_METHODS:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                await self._record(scope, state, message["status"])
            await send(message)

        await self.app(scope, receive, audited)

    async def _record(self, scope: Scope, state: dict, status: int) -> None:
        if status in (429, 503):
            return
        action, objects = action_of(scope["method"], scope.get("path", ""))
        principal = state.get("principal")
        if principal is not None:
            actor, key = principal.via, (principal.key_id, principal.name, principal.prefix)
        elif state.get("audit_key") is not None:  # a wrong or revoked key (what is known of it)
            actor, key = "anonymous", state["audit_key"]
        elif self.dev or action == "sign_in":
            actor, key = ("dev" if self.dev else "anonymous"), None
        else:  # no key presented at all: nothing to attribute
            return
        objects += state.get("audit_objects", [])
        try:
            await run_in_threadpool(self.storage.add_audit_event, actor, action, outcome_of(status), key=key,
                                    objects="; ".join(objects), status=status)
        except Exception:  # noqa: BLE001 - the request itself is done: say so loudly, answer anyway
            log.exception("audit row not written: %s %s (status %d)", action, "; ".join(objects), status)
