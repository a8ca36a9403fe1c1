"""The DermSight web app: a JSON API (OpenAPI docs at /docs) and the pages that use it.

Decision support, never a diagnosis: every prediction carries the bundle's calibrated
melanoma risk, its referral threshold and a plain-words decision.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from dermsight.data.schema import CLASS_NAMES, SEXES, SITES
from dermsight.inference.predictor import Predictor
from dermsight.serving.limits import MB, Admission, Overloaded, RequestLimits, Settings
from dermsight.serving.scoring import MAX_FILES, InputError, Scorer, Upload, parse_metadata
from dermsight.serving.security import (
    SESSION_COOKIE,
    AccessControl,
    Authenticator,
    SecurityHeaders,
    TokenBucket,
    foreign_origin,
    quiet_libraries,
    safe_next,
    session_token,
)
from dermsight.serving.storage import Image, NotFound, Patient, Prediction, RankedLesion, Storage, ranked_lesions

HERE = Path(__file__).parent
DEFAULT_DATA_DIR = Path(".dermsight")
MAX_FILE_BYTES = 20 * MB  # per uploaded file (the whole request: Settings.max_request_bytes)
log = logging.getLogger("dermsight.serving")
ID_MAX = 2**31 - 1  # ids are INTEGER (32 bits on PostgreSQL); 2**63 overflowed SQLite: a 500 found by fuzzing
RowId = Annotated[int, PathParam(ge=1, le=ID_MAX, description="A row id.")]
DISCLAIMER = "Decision support, not a diagnosis."
MEDIA_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tiff": "image/tiff",
    "webp": "image/webp", "dicom": "application/dicom",
}
PRIVATE = {"Cache-Control": "private, no-store"}  # health data: never left in a shared browser's cache


# -- response and request models ------------------------------------------------------


class PatientIn(BaseModel):
    reference: str | None = Field(None, max_length=200, description="A pseudonymous clinic code; never a name.")


class PatientOut(BaseModel):
    id: int
    reference: str | None
    created_at: datetime
    lesion_count: int
    url: str


MALIGNANT: frozenset[str] = frozenset({"MEL", "BCC", "SCC", "AK"})  # AK: a precancer, treated
NON_MELANOMA_CANCER_LEVEL = 0.5  # P(BCC) + P(SCC) at or above this: "more likely than not"


class Diagnosis(BaseModel):
    code: str
    name: str
    probability: float = Field(description="Calibrated probability, 0-1.")
    malignant: bool = Field(description="Melanoma, basal or squamous cell carcinoma, or actinic keratosis (precancerous).")


def differential(probabilities: dict[str, float], top: int = 3) -> list[Diagnosis]:
    """The `top` most probable classes, most probable first ("benign, other" included)."""
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])[:top]
    return [Diagnosis(code=c, name=CLASS_NAMES.get(c, c), probability=p, malignant=c in MALIGNANT) for c, p in ranked]


class PredictionOut(BaseModel):
    id: int
    image_id: int
    lesion_id: int
    patient_id: int | None
    model_version: str
    probabilities: dict[str, float] = Field(description="Calibrated probability of each class.")
    predicted_class: str
    predicted_class_name: str
    melanoma_risk: float = Field(description="Calibrated probability of melanoma, 0-1.")
    risk_spread: float | None = Field(
        None, description="Standard deviation of the melanoma risks of the ensemble's member networks (how much they "
        "disagree); None for a single-network model."
    )
    threshold: float = Field(description="The model's referral threshold on melanoma_risk.")
    above_threshold: bool
    looks_dermoscopic: bool = Field(description="False: not a dermoscopic image; the risk is meaningless.")
    decision: str = Field(description="The outcome in plain words.")
    differential: list[Diagnosis] = Field(description="The three most probable classes, most probable first.")
    non_melanoma_cancer_likely: bool = Field(
        description=f"P(BCC) + P(SCC) >= {NON_MELANOMA_CANCER_LEVEL}: a basal or squamous cell carcinoma is likely; refer."
    )
    context: dict[str, float | None] | None = Field(description="Patient context (ugly duckling); None for one-offs.")
    created_at: datetime
    image_url: str
    heatmap_url: str
    disclaimer: str = DISCLAIMER


class ImageOut(BaseModel):
    id: int
    lesion_id: int
    patient_id: int | None
    sha256: str
    format: str
    width: int
    height: int
    age: float | None
    sex: str | None
    site: str | None
    uploaded_at: datetime
    file_url: str
    predictions: list[PredictionOut] = Field(description="Oldest first; the last is current.")


class LesionOut(BaseModel):
    lesion_id: int
    site: str | None
    rank: int = Field(description="1 = first in the requested order.")
    ugly_duckling_score: float | None
    prediction: PredictionOut


class PatientDetail(PatientOut):
    order: Literal["risk", "ugly_duckling"]
    lesions: list[LesionOut]


class ScoringOut(BaseModel):
    patient_id: int | None
    patient_url: str | None
    model_version: str
    predictions: list[PredictionOut]
    disclaimer: str = DISCLAIMER


class ModelOut(BaseModel):
    name: str
    version: str
    classes: list[str]
    class_names: dict[str, str]
    melanoma_threshold: float
    threshold: dict = Field(description="The operating point and how it was chosen.")
    metrics: dict = Field(description="Out-of-fold validation metrics of the bundle.")
    training: dict


class HealthOut(BaseModel):
    status: Literal["ok"]
    model_version: str
    database: str


# -- converters -----------------------------------------------------------------------


def decision(prediction: Prediction) -> str:
    if not prediction.looks_dermoscopic:
        return "This does not look like a dermoscopic image, so DermSight gives no risk for it."
    if prediction.above_threshold:
        return "Above the referral threshold: have a dermatologist examine this lesion."
    return (
        "Below the threshold: DermSight does not flag this lesion. "
        "See a dermatologist anyway if it changes or worries you."
    )


def prediction_out(prediction: Prediction) -> PredictionOut:
    image = prediction.image
    return PredictionOut(
        id=prediction.id,
        image_id=image.id,
        lesion_id=image.lesion_id,
        patient_id=image.lesion.patient_id,
        model_version=prediction.model_version,
        probabilities=prediction.probabilities,
        predicted_class=prediction.predicted_class,
        predicted_class_name=CLASS_NAMES.get(prediction.predicted_class, prediction.predicted_class),
        melanoma_risk=prediction.melanoma_risk,
        risk_spread=prediction.risk_spread,
        threshold=prediction.threshold,
        above_threshold=prediction.above_threshold,
        looks_dermoscopic=prediction.looks_dermoscopic,
        decision=decision(prediction),
        differential=differential(prediction.probabilities),
        non_melanoma_cancer_likely=prediction.looks_dermoscopic
        and prediction.probabilities.get("BCC", 0.0) + prediction.probabilities.get("SCC", 0.0) >= NON_MELANOMA_CANCER_LEVEL,
        context=prediction.context,
        created_at=prediction.created_at,
        image_url=f"/api/images/{image.id}/file",
        heatmap_url=f"/api/predictions/{prediction.id}/heatmap",
    )


def image_out(image: Image) -> ImageOut:
    return ImageOut(
        id=image.id, lesion_id=image.lesion_id, patient_id=image.lesion.patient_id, sha256=image.sha256,
        format=image.format, width=image.width, height=image.height, age=image.age, sex=image.sex,
        site=image.lesion.site, uploaded_at=image.uploaded_at, file_url=f"/api/images/{image.id}/file",
        predictions=[prediction_out(p) for p in image.predictions],
    )


def patient_out(patient: Patient, lesion_count: int) -> PatientOut:
    return PatientOut(
        id=patient.id, reference=patient.reference, created_at=patient.created_at,
        lesion_count=lesion_count, url=f"/patients/{patient.id}",
    )


def lesion_out(item: RankedLesion, rank: int) -> LesionOut:
    return LesionOut(
        lesion_id=item.lesion.id, site=item.lesion.site, rank=rank,
        ugly_duckling_score=item.ugly_duckling_score, prediction=prediction_out(item.prediction),
    )


def accuracy(metrics: dict) -> dict[str, object]:
    """The bundle's held-out numbers as display text (None where not recorded): per source left
    out of training whole ("never_seen"), then pooled out-of-fold."""
    pooled = metrics.get("pooled", {})
    melanoma, multiclass = pooled.get("melanoma", {}), pooled.get("multiclass", {})

    def with_interval(entry: dict | None, percent: bool) -> str | None:
        if not entry or entry.get("value") is None:
            return None
        show = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.2f}")
        text = show(entry["value"])
        if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
            text += f" (95% interval {show(entry['ci_low'])} to {show(entry['ci_high'])})"
        return text

    balanced = multiclass.get("balanced_accuracy")
    sensitivity, specificity = melanoma.get("sensitivity", {}), melanoma.get("specificity", {})
    never_seen = [
        {
            "name": row["name"], "images": f"{row['images']:,}", "melanomas": f"{row['melanomas']:,}",
            "auc": with_interval(row.get("auc"), percent=False),
            "sensitivity": with_interval(row.get("sensitivity"), percent=True),
            "specificity": with_interval(row.get("specificity"), percent=True),
        }
        for row in metrics.get("per_source") or []
        if row["held_out"] in ("left_out_source", "external_source") and row.get("auc")
    ]
    return {
        "never_seen": never_seen,
        "validation": metrics.get("validation"),
        "images": f"{melanoma['n']:,}" if "n" in melanoma else None,
        "melanomas": f"{melanoma['positives']:,}" if "positives" in melanoma else None,
        "auc": with_interval(melanoma.get("auc"), percent=False),
        "sensitivity": with_interval(sensitivity, percent=True),
        "specificity": with_interval(specificity, percent=True),
        "balanced_accuracy": f"{100 * balanced:.0f}%" if balanced is not None else None,
        "classes": str(len(multiclass["classes"])) if "classes" in multiclass else None,
        "melanomas_flagged": round(100 * sensitivity["value"]) if sensitivity.get("value") is not None else None,
        "benign_cleared": round(100 * specificity["value"]) if specificity.get("value") is not None else None,
    }


# -- the app --------------------------------------------------------------------------


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
) -> FastAPI:
    """The app on `bundle_path` (default: the committed bundle). Files go to `storage_dir`
    ($DERMSIGHT_DATA_DIR, else ./.dermsight); rows to `database_url`
    ($DERMSIGHT_DATABASE_URL, else SQLite in the storage directory). Migrates the
    database to the newest schema, then checks the files against the rows (orphans
    removed, missing files reported in the log).

    Every path but the sign-in page, /learn, /api/health, the API docs and static files
    needs an API key or a signed-in browser session, unless `dev` (or `settings.dev`)."""
    settings = settings or Settings()
    dev = dev or settings.dev
    storage_dir, database_url = resolve_locations(storage_dir, database_url)
    quiet_libraries()
    predictor = Predictor(bundle_path)
    storage = Storage(database_url, storage_dir)
    check = storage.check_files(remove=True)
    (log.info if check.clean else log.warning)(check.summary())
    for relative in check.missing:
        log.warning("storage check: stored row refers to missing file %s", relative)
    scorer = Scorer(predictor, storage)
    admission = Admission(settings.max_active, settings.max_queue, settings.queue_timeout)
    auth = None if dev else Authenticator(storage)
    login_limiter = TokenBucket(settings.login_rate, settings.login_burst)
    templates = Jinja2Templates(HERE / "templates")

    app = FastAPI(
        title="DermSight",
        version=predictor.bundle.version,
        description=f"Melanoma decision support from dermoscopic images. {DISCLAIMER}",
    )
    app.state.scorer = scorer
    app.state.admission = admission
    app.state.auth = auth
    app.state.settings = settings
    app.state.storage_check = check
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # Outermost last: headers on every answer, then CORS (only with an allow-list), then
    # size and time limits, then keys, sessions, rate limits and the busy check.
    app.state.rate_limiter = None if dev else TokenBucket(settings.rate, settings.burst)
    app.state.login_limiter = login_limiter
    app.add_middleware(AccessControl, auth=auth, limiter=app.state.rate_limiter, admission=admission)
    app.add_middleware(RequestLimits, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"], allow_credentials=False, max_age=600,
        )
    app.add_middleware(SecurityHeaders)
    if auth is not None:
        _document_security(app)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        """One readable sentence instead of FastAPI's list of error objects."""
        parts = []
        for error in err.errors():
            field = ".".join(str(p) for p in error["loc"] if p not in ("body", "query", "path"))
            parts.append(f"{field}: {error['msg']}" if field else error["msg"])
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, err: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(InputError)
    async def bad_input(_request: Request, err: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(Overloaded)
    async def overloaded(_request: Request, err: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})

    # -- API ------------------------------------------------------------------------

    @app.get("/api/health", response_model=HealthOut, tags=["service"])
    def health() -> HealthOut:
        storage.ping()
        return HealthOut(status="ok", model_version=predictor.bundle.version, database=storage.backend)

    @app.get("/api/model", response_model=ModelOut, tags=["service"])
    def model() -> ModelOut:
        bundle = predictor.bundle
        return ModelOut(
            name=bundle.name, version=bundle.version, classes=bundle.classes,
            class_names={c: CLASS_NAMES[c] for c in bundle.classes}, melanoma_threshold=bundle.melanoma_threshold,
            threshold=bundle.threshold, metrics=bundle.metrics, training=bundle.training,
        )

    @app.post("/api/patients", response_model=PatientOut, status_code=201, tags=["patients"])
    def create_patient(body: PatientIn) -> PatientOut:
        reference = (body.reference or "").strip() or None
        return patient_out(storage.create_patient(reference), 0)

    @app.get("/api/patients", response_model=list[PatientOut], tags=["patients"])
    def list_patients() -> list[PatientOut]:
        return [patient_out(patient, n) for patient, n in storage.list_patients()]

    @app.get("/api/patients/{patient_id}", response_model=PatientDetail, tags=["patients"])
    def get_patient(
        patient_id: RowId,
        order: Annotated[Literal["risk", "ugly_duckling"], Query(description="Rank lesions by this.")] = "risk",
    ) -> PatientDetail:
        patient = storage.get_patient(patient_id)
        return PatientDetail(
            **patient_out(patient, len(patient.lesions)).model_dump(),
            order=order,
            lesions=[lesion_out(item, rank) for rank, item in enumerate(ranked_lesions(patient, order), start=1)],
        )

    @app.delete("/api/patients/{patient_id}", status_code=204, tags=["patients"])
    def delete_patient(patient_id: RowId) -> Response:
        storage.delete_patient(patient_id)
        return Response(status_code=204)

    @app.post("/api/patients/{patient_id}/rescore", response_model=ScoringOut, tags=["patients"])
    async def rescore_patient(patient_id: RowId) -> ScoringOut:
        """Score the newest image of each lesion again with the model now loaded; older
        predictions stay as history."""
        predictions = await admission.run(scorer.rescore, patient_id)
        return scoring_out(patient_id, predictions)

    @app.post("/api/images", response_model=ScoringOut, status_code=201, tags=["images"])
    async def upload_images(
        files: Annotated[list[UploadFile], File(description=f"1-{MAX_FILES} lesion images (JPEG, PNG, ...).")],
        age: Annotated[str | None, Form(description="Years, 0-120; empty if unknown.")] = None,
        sex: Annotated[str | None, Form(description=f"{' or '.join(SEXES)}; empty if unknown.")] = None,
        site: Annotated[str | None, Form(description=f"One of: {', '.join(SITES)}; empty if unknown.")] = None,
        patient_id: Annotated[
            int | None, Form(ge=1, le=ID_MAX, description="Add the lesions to this patient; empty: one-off.")
        ] = None,
    ) -> ScoringOut:
        """Score one or more lesion images of one body site and store them with their
        predictions and heat maps; with a patient, all their lesions are scored again
        together so the ugly-duckling context covers them."""
        started = time.monotonic()
        metadata = parse_metadata(age, sex, site)
        if len(files) > MAX_FILES:
            raise InputError(f"{len(files)} images in one upload; at most {MAX_FILES}")
        uploads = []
        for number, upload in enumerate(files, start=1):
            name = _display_name(upload.filename, number)
            if upload.size is not None and upload.size > MAX_FILE_BYTES:
                raise HTTPException(413, f"{name}: file is over the {MAX_FILE_BYTES // MB} MB limit")
            uploads.append(Upload(name, await upload.read()))
        predictions = await admission.run(scorer.upload, uploads, metadata, patient_id)
        # Counts, sizes and ids only: never names, bytes or metadata values.
        log.info(
            "upload scored: %d image(s), %d bytes, %s, images %s, %.2f s", len(uploads),
            sum(len(u.data) for u in uploads), "patient" if patient_id is not None else "one-off",
            ",".join(str(p.image.id) for p in predictions), time.monotonic() - started,
        )
        return scoring_out(patient_id, predictions)

    def scoring_out(patient_id: int | None, predictions: list[Prediction]) -> ScoringOut:
        return ScoringOut(
            patient_id=patient_id,
            patient_url=f"/patients/{patient_id}" if patient_id is not None else None,
            model_version=predictor.bundle.version,
            predictions=[prediction_out(p) for p in predictions],
        )

    @app.get("/api/images/{image_id}", response_model=ImageOut, tags=["images"])
    def get_image(image_id: RowId) -> ImageOut:
        return image_out(storage.get_image(image_id))

    @app.get("/api/images/{image_id}/file", tags=["images"], response_class=FileResponse)
    def image_file(image_id: RowId) -> FileResponse:
        image = storage.get_image(image_id)
        return FileResponse(storage.file(image.path), media_type=MEDIA_TYPES[image.format], headers=PRIVATE)

    @app.delete("/api/images/{image_id}", status_code=204, tags=["images"])
    def delete_image(image_id: RowId) -> Response:
        """Remove an image with its predictions (and its lesion when nothing else is left)."""
        storage.delete_image(image_id)
        return Response(status_code=204)

    @app.get("/api/predictions/{prediction_id}", response_model=PredictionOut, tags=["predictions"])
    def get_prediction(prediction_id: RowId) -> PredictionOut:
        return prediction_out(storage.get_prediction(prediction_id))

    @app.get("/api/predictions/{prediction_id}/heatmap", tags=["predictions"], response_class=FileResponse)
    def heatmap(prediction_id: RowId) -> FileResponse:
        """The melanoma heat map over the model's input square (JPEG; PNG for rows stored before 2026-11-28)."""
        path = storage.get_prediction(prediction_id).heatmap_path
        media_type = "image/png" if path.endswith(".png") else "image/jpeg"
        return FileResponse(storage.file(path), media_type=media_type, headers=PRIVATE)

    # -- pages ----------------------------------------------------------------------

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        principal = request.state.principal if hasattr(request.state, "principal") else None
        context = {"disclaimer": DISCLAIMER, "signed_in": principal is not None and principal.via == "session",
                   "auth": auth is not None, **context}
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        if auth is None:
            return RedirectResponse(safe_next(next), status_code=303)
        return page(request, "login.html", next=safe_next(next), error=None)

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    def login(request: Request, key: Annotated[str, Form(max_length=200)] = "",
              next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
        if auth is None:
            return RedirectResponse(safe_next(next), status_code=303)
        if foreign_origin({k.lower(): v for k, v in request.headers.items()}):
            return page(request, "login.html", status_code=403, next="/", error="Sign in from this page itself.")
        client = request.client.host if request.client else "unknown"
        wait = login_limiter.take(client)
        if wait > 0:
            retry = max(1, int(wait + 0.999))
            response = page(request, "login.html", status_code=429, next=safe_next(next),
                            error=f"Too many attempts: wait {retry} s and try again.")
            response.headers["Retry-After"] = str(retry)
            return response
        principal = auth.verify(key)
        if principal is None:
            log.warning("sign-in refused (unknown or revoked key)")
            return page(request, "login.html", status_code=401, next=safe_next(next),
                        error="That key is not valid (or it was revoked).")
        response = RedirectResponse(safe_next(next), status_code=303)
        response.set_cookie(
            SESSION_COOKIE, auth.start_session(principal), httponly=True, samesite="lax", path="/",
            secure=request.url.scheme == "https",
        )
        log.info("signed in with key %s (%s)", principal.prefix, principal.name)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        token = session_token({k.lower(): v for k, v in request.headers.items()})
        if auth is not None and token:
            auth.end_session(token)
        response = RedirectResponse("/login" if auth is not None else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        patients = [patient_out(p, n) for p, n in storage.list_patients()]
        return page(request, "index.html", patients=patients, sites=SITES, sexes=SEXES, max_files=MAX_FILES)

    @app.get("/patients", response_class=HTMLResponse, include_in_schema=False)
    def patients_page(request: Request) -> HTMLResponse:
        return page(request, "patients.html", patients=[patient_out(p, n) for p, n in storage.list_patients()])

    @app.get("/patients/{patient_id}", response_class=HTMLResponse, include_in_schema=False)
    def patient_page(request: Request, patient_id: RowId) -> HTMLResponse:
        try:
            patient = patient_out(storage.get_patient(patient_id), 0)
        except NotFound as err:
            return page(request, "missing.html", status_code=404, message=str(err))
        return page(request, "patient.html", patient=patient)

    @app.get("/learn", response_class=HTMLResponse, include_in_schema=False)
    def learn(request: Request) -> HTMLResponse:
        bundle = predictor.bundle
        return page(
            request, "learn.html", bundle=bundle, numbers=accuracy(bundle.metrics),
            threshold=bundle.threshold, class_names=[CLASS_NAMES[c] for c in bundle.classes],
        )

    return app


def _display_name(filename: str | None, number: int) -> str:
    """The file's name for messages back to the uploader (never logged or stored): its
    last path component, printable, at most 100 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:100].strip()
    return name or f"file {number}"


def _document_security(app: FastAPI) -> None:
    """Declare the API-key schemes in the OpenAPI schema (the docs' Authorize button)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key: dermsight keys create NAME"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in schema.get("paths", {}).items():
            if path != "/api/health":
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
        return schema

    app.openapi = openapi
