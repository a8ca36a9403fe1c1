"""The service itself: health (public, for load balancers) and the loaded model."""

from __future__ import annotations

from fastapi import APIRouter

from dermsight.data.schema import CLASS_NAMES
from dermsight.models.bundle import operating_point
from dermsight.serving.dependencies import PredictorDep, StorageDep
from dermsight.serving.schemas import HealthOut, ModelOut

router = APIRouter(prefix="/api", tags=["service"])


@router.get("/health", response_model=HealthOut)
def health(predictor: PredictorDep, storage: StorageDep) -> HealthOut:
    storage.ping()
    return HealthOut(status="ok", model_version=predictor.bundle.version, database=storage.backend)


@router.get("/model", response_model=ModelOut)
def model(predictor: PredictorDep) -> ModelOut:
    bundle = predictor.bundle
    return ModelOut(
        name=bundle.name, version=bundle.version, classes=bundle.classes,
        class_names={c: CLASS_NAMES[c] for c in bundle.classes}, melanoma_threshold=bundle.melanoma_threshold,
        threshold=bundle.threshold, metrics=bundle.metrics, training=bundle.training,
        operating_point=operating_point(bundle), site=bundle.site.summary() if bundle.site else None,
    )
