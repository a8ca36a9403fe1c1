"""Patients: create, list, get with their lesions ranked, delete, and score again."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from dermsight.serving.audit import note_objects
from dermsight.serving.dependencies import AdmissionDep, PredictorDep, ReferenceDep, ScorerDep, StorageDep
from dermsight.serving.schemas import (
    PatientDetail,
    PatientIn,
    PatientOut,
    RowId,
    ScoringOut,
    lesion_out,
    patient_out,
    scoring_out,
)
from dermsight.serving.storage.models import ranked_lesions

router = APIRouter(prefix="/api/patients", tags=["patients"])


@router.post("", response_model=PatientOut, status_code=201)
def create_patient(body: PatientIn, storage: StorageDep, request: Request) -> PatientOut:
    reference = (body.reference or "").strip() or None
    patient = storage.create_patient(reference)
    note_objects(request, f"patient {patient.id}")
    return patient_out(patient, 0)


@router.get("", response_model=list[PatientOut])
def list_patients(storage: StorageDep) -> list[PatientOut]:
    return [patient_out(patient, n) for patient, n in storage.list_patients()]


@router.get("/{patient_id}", response_model=PatientDetail)
def get_patient(
    patient_id: RowId,
    storage: StorageDep,
    reference: ReferenceDep,
    order: Annotated[Literal["risk", "ugly_duckling"], Query(description="Rank lesions by this.")] = "risk",
) -> PatientDetail:
    patient = storage.get_patient(patient_id)
    return PatientDetail(
        **patient_out(patient, len(patient.lesions)).model_dump(),
        order=order,
        lesions=[
            lesion_out(item, rank, reference) for rank, item in enumerate(ranked_lesions(patient, order), start=1)
        ],
    )


@router.delete("/{patient_id}", status_code=204)
def delete_patient(patient_id: RowId, storage: StorageDep) -> Response:
    storage.delete_patient(patient_id)
    return Response(status_code=204)


@router.post("/{patient_id}/rescore", response_model=ScoringOut)
async def rescore_patient(
    patient_id: RowId,
    scorer: ScorerDep,
    admission: AdmissionDep,
    predictor: PredictorDep,
    request: Request,
    reference: ReferenceDep,
) -> ScoringOut:
    """Score the newest image of each lesion again with the model now loaded; older
    predictions stay as history."""
    predictions = await admission.run(scorer.rescore, patient_id)
    note_objects(request, "predictions " + ",".join(str(p.id) for p in predictions))
    return scoring_out(patient_id, predictor.bundle.version, predictions, reference)
