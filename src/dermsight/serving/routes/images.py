"""Uploads (scored and stored), stored images and their files, predictions and their heat
maps. Files are served with ``Cache-Control: private, no-store``: health data never stays
in a shared browser's cache."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import FileResponse

from dermsight.data.schema import SEXES, SITES
from dermsight.serving.audit import note_objects
from dermsight.serving.dependencies import AdmissionDep, PredictorDep, ReferenceDep, ScorerDep, StorageDep
from dermsight.serving.limits import MB
from dermsight.serving.schemas import (
    ID_MAX,
    ImageOut,
    PredictionOut,
    RejectedFile,
    RowId,
    ScoringOut,
    image_out,
    prediction_out,
    scoring_out,
)
from dermsight.serving.scoring import MAX_FILES, InputError, Upload, parse_metadata

MAX_FILE_BYTES = 20 * MB  # per uploaded file (the whole request: Settings.max_request_bytes)
MEDIA_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tiff": "image/tiff",
    "webp": "image/webp", "dicom": "application/dicom",
}
PRIVATE = {"Cache-Control": "private, no-store"}
log = logging.getLogger("dermsight.serving")

router = APIRouter(prefix="/api")


@router.post(
    "/images", response_model=ScoringOut, status_code=201, tags=["images"],
    responses={
        207: {"model": ScoringOut, "description": "Some files stored and scored (`predictions`), others left out with "
              "their reasons (`rejected`); nothing of a left-out file is stored."},
        422: {"description": "Bad metadata, too many files, or no usable file (each file's reason in `detail`)."},
    },
)
async def upload_images(
    response: Response,
    scorer: ScorerDep,
    admission: AdmissionDep,
    predictor: PredictorDep,
    request: Request,
    reference: ReferenceDep,
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
    together so the ugly-duckling context covers them. A file that is not a readable image
    is left out and reported (status 207), the others are stored (201 when all are)."""
    started = time.monotonic()
    if patient_id is not None:
        note_objects(request, f"patient {patient_id}")
    metadata = parse_metadata(age, sex, site)
    if len(files) > MAX_FILES:
        raise InputError(f"{len(files)} images in one upload; at most {MAX_FILES}")
    uploads = []
    for number, upload in enumerate(files, start=1):
        name = display_name(upload.filename, number)
        if upload.size is not None and upload.size > MAX_FILE_BYTES:
            raise HTTPException(413, f"{name}: file is over the {MAX_FILE_BYTES // MB} MB limit")
        uploads.append(Upload(name, await upload.read()))
    result = await admission.run(scorer.upload, uploads, metadata, patient_id)
    note_objects(request, "images " + ",".join(str(p.image.id) for p in result.predictions),
                 "predictions " + ",".join(str(p.id) for p in result.predictions))
    # Counts, sizes and ids only: never names, bytes or metadata values.
    log.info(
        "upload scored: %d image(s), %d left out, %d bytes, %s, images %s, %.2f s", len(result.predictions),
        len(result.rejected), sum(len(u.data) for u in uploads), "patient" if patient_id is not None else "one-off",
        ",".join(str(p.image.id) for p in result.predictions), time.monotonic() - started,
    )
    if result.rejected:
        response.status_code = 207
    rejected = [RejectedFile(number=r.number, filename=r.filename, reason=r.reason) for r in result.rejected]
    return scoring_out(patient_id, predictor.bundle.version, result.predictions, reference, rejected)


@router.get("/images/{image_id}", response_model=ImageOut, tags=["images"])
def get_image(image_id: RowId, storage: StorageDep, reference: ReferenceDep) -> ImageOut:
    return image_out(storage.get_image(image_id), reference)


@router.get("/images/{image_id}/file", tags=["images"], response_class=FileResponse)
def image_file(image_id: RowId, storage: StorageDep) -> FileResponse:
    image = storage.get_image(image_id)
    return FileResponse(storage.file(image.path), media_type=MEDIA_TYPES[image.format], headers=PRIVATE)


@router.delete("/images/{image_id}", status_code=204, tags=["images"])
def delete_image(image_id: RowId, storage: StorageDep) -> Response:
    """Remove an image with its predictions (and its lesion when nothing else is left)."""
    storage.delete_image(image_id)
    return Response(status_code=204)


@router.get("/predictions/{prediction_id}", response_model=PredictionOut, tags=["predictions"])
def get_prediction(prediction_id: RowId, storage: StorageDep, reference: ReferenceDep) -> PredictionOut:
    return prediction_out(storage.get_prediction(prediction_id), reference)


@router.get("/predictions/{prediction_id}/heatmap", tags=["predictions"], response_class=FileResponse)
def heatmap(prediction_id: RowId, scorer: ScorerDep) -> FileResponse:
    """The melanoma heat map over the model's input square (JPEG; PNG for rows stored before 2026-11-28),
    drawn on its first request and kept; 404 for a refused (not dermoscopic) image, which has none."""
    path = scorer.heatmap(prediction_id)
    media_type = "image/png" if path.suffix == ".png" else "image/jpeg"
    return FileResponse(path, media_type=media_type, headers=PRIVATE)


def display_name(filename: str | None, number: int) -> str:
    """The file's name for messages back to the uploader (never logged or stored): its
    last path component, printable, at most 100 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:100].strip()
    return name or f"file {number}"
