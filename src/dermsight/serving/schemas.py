"""The API's request and response models, and the converters from stored rows to them.

A new field of a prediction (in the JSON and on the result card) goes into
:class:`PredictionOut` and is filled in :func:`prediction_out`; every endpoint that returns
predictions (uploads, re-scoring, images, patients) goes through that one converter."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from dermsight.data.schema import CLASS_NAMES, MALIGNANT
from dermsight.imaging.quality import WARNINGS, warning_message
from dermsight.inference.ood import REFUSAL, REFUSAL_MESSAGE
from dermsight.serving.reference import RiskReference
from dermsight.serving.storage.models import Image, Patient, Prediction, RankedLesion

ID_MAX = 2**31 - 1  # ids are INTEGER (32 bits on PostgreSQL); 2**63 overflowed SQLite: a 500 found by fuzzing
RowId = Annotated[int, PathParam(ge=1, le=ID_MAX, description="A row id.")]
DISCLAIMER = "Decision support, not a diagnosis."
NON_MELANOMA_CANCER_LEVEL = 0.5  # P(BCC) + P(SCC) at or above this: "more likely than not"
URGENT_RISK = 0.30  # a calibrated melanoma risk from here on: urgent referral (about 1 in 3 such lesions is melanoma)
Referral = Literal["urgent", "routine", "not_prompted"]


# -- models ---------------------------------------------------------------------------


class PatientIn(BaseModel):
    reference: str | None = Field(None, max_length=200, description="A pseudonymous clinic code; never a name.")


class PatientOut(BaseModel):
    id: int
    reference: str | None
    created_at: datetime
    lesion_count: int
    url: str


class Diagnosis(BaseModel):
    code: str
    name: str
    probability: float = Field(description="Calibrated probability, 0-1.")
    malignant: bool = Field(
        description="Melanoma, basal or squamous cell carcinoma, or actinic keratosis (precancerous)."
    )


class QualityWarning(BaseModel):
    code: str = Field(description=f"One of {', '.join(WARNINGS)} (dermsight.imaging.quality).")
    message: str = Field(description="What is wrong with the photo, in plain words.")


class RiskMeaning(BaseModel):
    """What this risk meant on held-out images (the scoring bundle's out-of-fold validation)."""

    images: int = Field(description="Validation images whose risks were nearest this one.")
    melanomas: int = Field(description="How many of them were melanoma.")
    risk_low: float = Field(description="The lowest of their risks, 0-1.")
    risk_high: float = Field(description="The highest of their risks, 0-1.")
    measured_on: str = Field(description="Which images: collections, and how each was held out.")


class Refusal(BaseModel):
    code: Literal["not_dermoscopic"] = Field(
        description=f"Why no risk is given. `{REFUSAL}`: the out-of-distribution gate (dermsight.inference.ood) found "
        "the image is not dermoscopy: an ordinary close-up photo, or no skin image at all."
    )
    message: str = Field(description="The reason in plain words, for the person who uploaded the image.")


class PredictionOut(BaseModel):
    """One image's prediction. A refused image (`looks_dermoscopic` false, `refusal` set) carries
    no model output: probabilities, classes, risk, decision flags, differential, context and
    heat map are null."""

    id: int
    image_id: int
    lesion_id: int
    patient_id: int | None
    model_version: str
    refusal: Refusal | None = Field(description="Set when DermSight refuses the image and gives no risk; else null.")
    probabilities: dict[str, float] | None = Field(description="Calibrated probability of each class.")
    predicted_class: str | None
    predicted_class_name: str | None
    melanoma_risk: float | None = Field(description="Calibrated probability of melanoma, 0-1.")
    risk_spread: float | None = Field(
        None, description="Standard deviation of the melanoma risks of the ensemble's member networks (how much they "
        "disagree); None for a single-network model."
    )
    unsure: bool | None = Field(
        None, description="True: the member networks disagree more than on 9 in 10 held-out images (risk_spread above "
        "the level fitted by bench/uncertainty.py); None for a model without a fitted level."
    )
    uncertainty: str | None = Field(None, description="How sure the model is, in plain words; None for one network.")
    quality_warnings: list[QualityWarning] = Field(
        description="Image-quality problems measured before scoring (warnings, not refusals); empty when none."
    )
    threshold: float = Field(description="The model's referral threshold on melanoma_risk.")
    above_threshold: bool | None
    referral: Referral | None = Field(
        description=f"What DermSight suggests to the clinician: urgent (melanoma_risk >= {URGENT_RISK}), routine "
        "(at or above the threshold), not_prompted (below it; melanoma not ruled out); None when not dermoscopic."
    )
    risk_meaning: RiskMeaning | None = Field(
        None, description="Among held-out validation images with about this risk, how many were melanoma; None when "
        "the scoring model's validation table is not loaded (another model version, or none shipped)."
    )
    looks_dermoscopic: bool = Field(description="False: not a dermoscopic image, refused (see `refusal`): no risk.")
    decision: str = Field(description="The outcome in plain words.")
    differential: list[Diagnosis] | None = Field(description="The three most probable classes, most probable first.")
    non_melanoma_cancer_likely: bool | None = Field(
        description=f"P(BCC) + P(SCC) >= {NON_MELANOMA_CANCER_LEVEL}: a basal or squamous cell carcinoma is likely; "
        "refer."
    )
    context: dict[str, float | None] | None = Field(description="Patient context (ugly duckling); None for one-offs.")
    created_at: datetime
    image_uploaded_at: datetime = Field(
        description="When the scored image was uploaded (the server's clock, UTC). DermSight never stores the file's "
        "name (it can carry a patient's name): the page keeps it in the uploading browser tab, keyed by `image_id` "
        "and this time."
    )
    image_url: str
    heatmap_url: str | None
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
    uploaded_at: datetime = Field(description="When the lesion's newest image (the one scored) was uploaded.")
    rank: int = Field(description="1 = first in the requested order.")
    ugly_duckling_score: float | None
    prediction: PredictionOut


class PatientDetail(PatientOut):
    order: Literal["risk", "ugly_duckling"]
    lesions: list[LesionOut]


class RejectedFile(BaseModel):
    number: int = Field(description="The file's place in the upload, 1 = first.")
    filename: str = Field(description="The name it was uploaded with, echoed back (never stored or logged).")
    reason: str = Field(description="Why it was left out, in one sentence.")


class ScoringOut(BaseModel):
    patient_id: int | None
    patient_url: str | None
    model_version: str
    predictions: list[PredictionOut] = Field(description="One per stored file, in upload order.")
    rejected: list[RejectedFile] = Field(
        default_factory=list, description="Uploaded files left out, nothing of them stored (status 207); empty when "
        "every file was stored (status 201)."
    )
    disclaimer: str = DISCLAIMER


class ModelOut(BaseModel):
    name: str
    version: str
    classes: list[str]
    class_names: dict[str, str]
    melanoma_threshold: float
    threshold: dict = Field(description="The bundle's own operating point and how it was chosen.")
    operating_point: str = Field(description="The active operating point in words: a site profile's, or the "
                                 "bundle's threshold from other clinics and how it held there.")
    site: dict | None = Field(None, description="The active site profile (`dermsight calibrate`), None without one.")
    metrics: dict = Field(description="Out-of-fold validation metrics of the bundle.")
    training: dict


class HealthOut(BaseModel):
    status: Literal["ok"]
    model_version: str
    database: str


# -- converters -----------------------------------------------------------------------


def differential(probabilities: dict[str, float], top: int = 3) -> list[Diagnosis]:
    """The `top` most probable classes, most probable first ("benign, other" included)."""
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])[:top]
    return [Diagnosis(code=c, name=CLASS_NAMES.get(c, c), probability=p, malignant=c in MALIGNANT) for c, p in ranked]


def referral(prediction: Prediction) -> Referral | None:
    if not prediction.looks_dermoscopic:
        return None
    if not prediction.above_threshold:
        return "not_prompted"
    return "urgent" if prediction.melanoma_risk >= URGENT_RISK else "routine"


DECISIONS: dict[Referral | None, str] = {
    "urgent": "High melanoma risk: refer urgently for a dermatologist's examination.",
    "routine": "Above the referral threshold: refer for a dermatologist's examination.",
    "not_prompted": "Below the referral threshold: DermSight does not prompt a referral. This does not rule out "
    "melanoma; your clinical and dermoscopic examination decides.",
    None: REFUSAL_MESSAGE,
}


def decision(prediction: Prediction) -> str:
    """The clinician's next step in words (the clinician reads the card, not the patient)."""
    return DECISIONS[referral(prediction)]


def uncertainty(prediction: Prediction) -> str | None:
    """The ensemble's spread (the standard deviation of its networks' melanoma risks) in
    percentage points, and what it means for the decision."""
    if prediction.risk_spread is None or not prediction.looks_dermoscopic:
        return None
    points = round(100 * prediction.risk_spread)
    spread = (
        "by less than 1 percentage point" if points < 1 else f"by about {points} percentage point{'s' * (points != 1)}"
    )
    if prediction.unsure:
        return (
            f"The model is unsure about this lesion: its networks' melanoma risks differ {spread}, more than on 9 in "
            "10 of the images it was tested on. On such images its risks were much less reliable, so give your own "
            "examination more weight than this risk."
        )
    margin = abs(prediction.melanoma_risk - prediction.threshold)
    lead = (
        f"The model's networks agree: their melanoma risks differ {spread}" if prediction.unsure is False
        else f"The model's networks' melanoma risks differ {spread}"
    )
    if prediction.risk_spread < margin:
        return f"{lead}, less than this risk's distance from the referral threshold: the decision does not hinge on it."
    return f"{lead}, as much as this risk's distance from the referral threshold: the decision is a close call."


def risk_meaning(prediction: Prediction, reference: RiskReference | None) -> RiskMeaning | None:
    if reference is None or reference.model_version != prediction.model_version or not prediction.looks_dermoscopic:
        return None
    band = reference.around(prediction.melanoma_risk)
    return RiskMeaning(
        images=band.images, melanomas=band.melanomas, risk_low=band.low, risk_high=band.high,
        measured_on=reference.measured_on,
    )


def quality_warnings(prediction: Prediction) -> list[QualityWarning]:
    image = prediction.image
    codes = prediction.quality_warnings.split(";")
    return [QualityWarning(code=code, message=warning_message(code, image.width, image.height)) for code in codes if code]


def prediction_out(prediction: Prediction, reference: RiskReference | None = None) -> PredictionOut:
    """The API's prediction; `reference` (the loaded bundle's validation risks) fills risk_meaning."""
    image = prediction.image
    if not prediction.looks_dermoscopic:
        return PredictionOut(
            id=prediction.id, image_id=image.id, lesion_id=image.lesion_id, patient_id=image.lesion.patient_id,
            model_version=prediction.model_version, refusal=Refusal(code=REFUSAL, message=REFUSAL_MESSAGE),
            probabilities=None, predicted_class=None, predicted_class_name=None, melanoma_risk=None,
            quality_warnings=quality_warnings(prediction), threshold=prediction.threshold, above_threshold=None,
            looks_dermoscopic=False, referral=None, risk_meaning=None, decision=decision(prediction),
            differential=None, non_melanoma_cancer_likely=None,
            context=None, created_at=prediction.created_at, image_uploaded_at=image.uploaded_at,
            image_url=f"/api/images/{image.id}/file", heatmap_url=None,
        )
    probabilities = prediction.probabilities
    return PredictionOut(
        id=prediction.id,
        image_id=image.id,
        lesion_id=image.lesion_id,
        patient_id=image.lesion.patient_id,
        model_version=prediction.model_version,
        probabilities=probabilities,
        predicted_class=prediction.predicted_class,
        predicted_class_name=CLASS_NAMES.get(prediction.predicted_class, prediction.predicted_class),
        melanoma_risk=prediction.melanoma_risk,
        risk_spread=prediction.risk_spread,
        unsure=prediction.unsure,
        uncertainty=uncertainty(prediction),
        quality_warnings=quality_warnings(prediction),
        threshold=prediction.threshold,
        above_threshold=prediction.above_threshold,
        referral=referral(prediction),
        risk_meaning=risk_meaning(prediction, reference),
        refusal=None,
        looks_dermoscopic=True,
        decision=decision(prediction),
        differential=differential(probabilities),
        non_melanoma_cancer_likely=probabilities.get("BCC", 0.0) + probabilities.get("SCC", 0.0) >= NON_MELANOMA_CANCER_LEVEL,
        context=prediction.context,
        created_at=prediction.created_at,
        image_uploaded_at=image.uploaded_at,
        image_url=f"/api/images/{image.id}/file",
        heatmap_url=f"/api/predictions/{prediction.id}/heatmap",
    )


def image_out(image: Image, reference: RiskReference | None = None) -> ImageOut:
    """The API view of a stored image with its predictions."""
    return ImageOut(
        id=image.id, lesion_id=image.lesion_id, patient_id=image.lesion.patient_id, sha256=image.sha256,
        format=image.format, width=image.width, height=image.height, age=image.age, sex=image.sex,
        site=image.lesion.site, uploaded_at=image.uploaded_at,
        file_url=f"/api/images/{image.id}/file",
        predictions=[prediction_out(p, reference) for p in image.predictions],
    )


def patient_out(patient: Patient, lesion_count: int) -> PatientOut:
    """The API view of a patient in a list."""
    return PatientOut(
        id=patient.id, reference=patient.reference, created_at=patient.created_at,
        lesion_count=lesion_count, url=f"/patients/{patient.id}",
    )


def lesion_out(item: RankedLesion, rank: int, reference: RiskReference | None = None) -> LesionOut:
    """The API view of one lesion of a patient, with its rank in the requested order."""
    return LesionOut(
        lesion_id=item.lesion.id, site=item.lesion.site, rank=rank, uploaded_at=item.prediction.image.uploaded_at,
        ugly_duckling_score=item.ugly_duckling_score, prediction=prediction_out(item.prediction, reference),
    )


def scoring_out(
    patient_id: int | None, model_version: str, predictions: list[Prediction], reference: RiskReference | None = None,
    rejected: list[RejectedFile] | None = None,
) -> ScoringOut:
    """The API answer to an upload (with the files left out) or a re-scoring."""
    return ScoringOut(
        patient_id=patient_id,
        patient_url=f"/patients/{patient_id}" if patient_id is not None else None,
        model_version=model_version,
        predictions=[prediction_out(p, reference) for p in predictions],
        rejected=rejected or [],
    )
