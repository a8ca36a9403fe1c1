"""The HTML pages: upload (/), the patient list and a patient's view (their data come from
the JSON API through static/app.js), the public education page (/learn) with the
bundle's held-out numbers, and the API documentation (/docs: Swagger UI, /redoc: ReDoc)
from the app's own copies of their scripts."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dermsight.data.schema import CLASS_NAMES, SEXES, SITES
from dermsight.serving.dependencies import PageDep, PredictorDep, ReferenceDep, StorageDep
from dermsight.serving.reference import RiskReference
from dermsight.serving.schemas import RowId, patient_out
from dermsight.serving.scoring import MAX_FILES
from dermsight.serving.storage.models import NotFound

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index(page: PageDep, storage: StorageDep) -> HTMLResponse:
    patients = [patient_out(p, n) for p, n in storage.list_patients()]
    return page("index.html", patients=patients, sites=SITES, sexes=SEXES, max_files=MAX_FILES)


@router.get("/patients", response_class=HTMLResponse)
def patients_page(page: PageDep, storage: StorageDep) -> HTMLResponse:
    return page("patients.html", patients=[patient_out(p, n) for p, n in storage.list_patients()])


@router.get("/patients/{patient_id}", response_class=HTMLResponse)
def patient_page(patient_id: RowId, page: PageDep, storage: StorageDep) -> HTMLResponse:
    try:
        patient = patient_out(storage.get_patient(patient_id), 0)
    except NotFound as err:
        return page("missing.html", status_code=404, message=str(err))
    return page("patient.html", patient=patient)


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(page: PageDep, request: Request) -> HTMLResponse:
    return page("api_docs.html", viewer="Swagger UI", openapi_url=request.app.openapi_url)


@router.get("/redoc", response_class=HTMLResponse)
def redoc(page: PageDep, request: Request) -> HTMLResponse:
    return page("api_docs.html", viewer="ReDoc", openapi_url=request.app.openapi_url)


@router.get("/learn", response_class=HTMLResponse)
def learn(page: PageDep, predictor: PredictorDep, reference: ReferenceDep) -> HTMLResponse:
    bundle = predictor.bundle
    name, _, created = bundle.version.partition("@")
    return page(
        "learn.html", bundle=bundle, numbers=accuracy(bundle.metrics), calibration=calibration(reference),
        threshold=bundle.threshold, class_names=[CLASS_NAMES[c] for c in bundle.classes],
        model_name=name, model_date=created[:10],
    )


CALIBRATION_EXAMPLES = (0.05, 0.2, 0.4)  # the risks /learn explains with the bundle's validation images


def calibration(reference: RiskReference | None) -> dict | None:
    """What a few risks meant on the bundle's out-of-fold validation images (None without them)."""
    if reference is None:
        return None
    rows = []
    for risk in CALIBRATION_EXAMPLES:
        band = reference.around(risk)
        rows.append({
            "risk": f"{100 * risk:.0f}%", "images": f"{band.images:,}", "melanomas": f"{band.melanomas:,}",
            "low": f"{100 * band.low:.1f}%", "high": f"{100 * band.high:.1f}%",
            "share": f"{100 * band.melanoma_share:.0f}%",
        })
    return {"rows": rows, "measured_on": reference.measured_on}


def accuracy(metrics: dict) -> dict[str, object]:
    """The bundle's held-out numbers as display text (None where not recorded): per source left
    out of training whole ("never_seen"), then pooled out-of-fold."""
    pooled = metrics.get("pooled", {})
    melanoma, multiclass = pooled.get("melanoma", {}), pooled.get("multiclass", {})

    def with_interval(entry: dict | None, percent: bool) -> str | None:
        """"0.79 (0.78–0.80)": the value and its 95% interval, compact enough for a phone's table."""
        if not entry or entry.get("value") is None:
            return None
        show = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.2f}")
        text = show(entry["value"])
        if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
            text += f" ({show(entry['ci_low'])}–{show(entry['ci_high'])})"
        return text

    balanced = multiclass.get("balanced_accuracy")
    sensitivity, specificity = melanoma.get("sensitivity", {}), melanoma.get("specificity", {})
    never_seen = [
        {
            "name": row["name"], "images": f"{row['images']:,}", "melanomas": f"{row['melanomas']:,}",
            "auc": with_interval(row.get("auc"), percent=False),
            "sensitivity": with_interval(row.get("sensitivity"), percent=True),
            "specificity": with_interval(row.get("specificity"), percent=True),
            "mean_risk": f"{100 * row['mean_risk']:.0f}%" if row.get("mean_risk") is not None else "–",
            "melanoma_rate": f"{100 * row['melanoma_rate']:.0f}%" if row.get("melanoma_rate") is not None else "–",
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
        "ece": f"{100 * melanoma['ece']:.1f}" if melanoma.get("ece") is not None else None,
        "classes": str(len(multiclass["classes"])) if "classes" in multiclass else None,
        "melanomas_flagged": round(100 * sensitivity["value"]) if sensitivity.get("value") is not None else None,
        "benign_cleared": round(100 * specificity["value"]) if specificity.get("value") is not None else None,
    }
