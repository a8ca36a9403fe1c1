"""The DermSight web app: a JSON API (OpenAPI docs at /docs) and the pages that use it.

Decision support, never a diagnosis: every prediction carries the bundle's calibrated
melanoma risk, its referral threshold and a plain-words decision.

``create_app`` assembles the parts: the locations and settings, the state the dependency
providers hand to routes (``dependencies``), the routers (``routes``), the error answers
(``errors``) and the middleware stack (``middleware``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import operating_point
from dermsight.models.site_profile import ENVIRONMENT as SITE_ENVIRONMENT
from dermsight.serving.errors import EXCEPTION_HANDLERS
from dermsight.serving.limits import Admission, Settings
from dermsight.serving.middleware import add_middleware
from dermsight.serving.reference import RiskReference
from dermsight.serving.routes import images, pages, patients, service, session
from dermsight.serving.schemas import DISCLAIMER
from dermsight.serving.scoring import Scorer
from dermsight.serving.logs import quiet_libraries
from dermsight.serving.security import Authenticator, FailureLimiter, TokenBucket, required_role
from dermsight.serving.storage.repository import Storage

HERE = Path(__file__).parent
# Swagger UI and ReDoc, served by the app from the pinned fastapi-offline package: the API page
# works on a network that reaches no CDN (routes/pages.py serves /docs and /redoc).
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DEFAULT_DATA_DIR = Path(".dermsight")
ROUTERS = (service.router, patients.router, images.router, session.router, pages.router)  # the schema's order
log = logging.getLogger("dermsight.serving")


def resolve_locations(storage_dir: Path | str | None = None, database_url: str | None = None) -> tuple[Path, str]:
    """(storage directory, database URL): the arguments, else $DERMSIGHT_DATA_DIR (else
    ./.dermsight) and $DERMSIGHT_DATABASE_URL (else SQLite in the storage directory)."""
    storage_dir = Path(storage_dir or os.environ.get("DERMSIGHT_DATA_DIR") or DEFAULT_DATA_DIR)
    database_url = (
        database_url or os.environ.get("DERMSIGHT_DATABASE_URL") or f"sqlite:///{storage_dir / 'dermsight.db'}"
    )
    return storage_dir, database_url


def create_app(
    bundle_path: Path | str | None = None,
    database_url: str | None = None,
    storage_dir: Path | str | None = None,
    *,
    dev: bool = False,
    settings: Settings | None = None,
    site: Path | str | None = None,
) -> FastAPI:
    """The app on `bundle_path` (default: the committed bundle). Files go to `storage_dir`
    ($DERMSIGHT_DATA_DIR, else ./.dermsight); rows to `database_url`
    ($DERMSIGHT_DATABASE_URL, else SQLite in the storage directory). Migrates the
    database to the newest schema, then checks the files against the rows (orphans
    removed, missing files reported in the log).

    Every path but the sign-in page, /learn, /api/health, the API docs and static files
    needs an API key or a signed-in browser session, unless `dev` (or `settings.dev`).

    `site`: a site profile (`dermsight calibrate`; default $DERMSIGHT_SITE) whose threshold and
    recalibrated risk every prediction follows; the API (/api/model) and every page say which
    operating point is active."""
    settings = settings or Settings()
    dev = dev or settings.dev
    storage_dir, database_url = resolve_locations(storage_dir, database_url)
    quiet_libraries()
    predictor = Predictor(bundle_path, site=site or os.environ.get(SITE_ENVIRONMENT) or None)
    storage = Storage(database_url, storage_dir)
    check = storage.check_files(remove=True)
    (log.info if check.clean else log.warning)(check.summary())
    for relative in check.missing:
        log.warning("storage check: stored row refers to missing file %s", relative)
    auth = None if dev else Authenticator(storage)

    app = FastAPI(
        title="DermSight",
        version=predictor.bundle.version,
        description=f"Melanoma decision support from dermoscopic images. {DISCLAIMER}",
        exception_handlers=EXCEPTION_HANDLERS,
        docs_url=None,
        redoc_url=None,
    )
    # What the dependency providers hand to routes (and what tests and the CLI inspect).
    app.state.settings = settings
    app.state.predictor = predictor
    app.state.operating_point = operating_point(predictor.bundle)
    app.state.risk_reference = RiskReference.from_bundle(predictor.bundle)
    app.state.storage = storage
    app.state.storage_check = check
    app.state.scorer = Scorer(predictor, storage)
    app.state.admission = Admission(settings.max_active, settings.max_queue, settings.queue_timeout)
    app.state.auth = auth
    app.state.rate_limiter = None if dev else TokenBucket(settings.rate, settings.burst)
    app.state.failures = FailureLimiter(settings.failure_rate, settings.failure_burst)
    app.state.templates = Jinja2Templates(HERE / "templates")

    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs_assets")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for router in ROUTERS:
        app.include_router(router)
    add_middleware(app, settings, auth, app.state.rate_limiter, app.state.failures, app.state.admission, storage)
    _document_file_uploads(app)
    if auth is not None:
        _document_security(app)
    return app


def _document_file_uploads(app: FastAPI) -> None:
    """Mark uploaded files `format: binary` beside OpenAPI 3.1's `contentMediaType`: Swagger UI
    5 shows a file picker for an array of files only with it (swagger-ui issue 10825), and
    without one its "Try it out" offers an unlabelled text box of random characters."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for body in schema.get("components", {}).get("schemas", {}).values():
            for field in body.get("properties", {}).values():
                for item in (field, field.get("items", {})):
                    if item.get("contentMediaType") == "application/octet-stream":
                        item["format"] = "binary"
        return schema

    app.openapi = openapi


def _document_security(app: FastAPI) -> None:
    """Declare the API-key schemes in the OpenAPI schema (the docs' Authorize button), and
    the role each operation needs (its 403 answer)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "An API key: dermsight keys create NAME --role read|clinician|admin"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in schema.get("paths", {}).items():
            if path != "/api/health":
                for method, operation in operations.items():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
                    role = required_role(method.upper())
                    needs = f"Needs a key of the '{role}' role or above (read < clinician < admin)."
                    operation.setdefault("responses", {})["403"] = {"description": needs}
        return schema

    app.openapi = openapi
