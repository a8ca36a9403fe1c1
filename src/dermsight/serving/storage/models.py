"""The tables: patients, lesions, images, predictions, API keys (with their roles) and the
audit trail (SQLAlchemy ORM), and how a patient's loaded lesions are ranked. The schema is built by the migrations
(``serving/migrations``); a test checks they match these classes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class NotFound(LookupError):
    """A patient, image, prediction or stored file that does not exist (any more)."""


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands them back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    """The tables' base: datetimes stored as UTC."""

    type_annotation_map = {datetime: UTCDateTime}


class Patient(Base):
    """A patient, known by a row id and optionally a clinic's pseudonymous reference (never a name)."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str | None] = mapped_column(String(200))  # a clinic's pseudonymous code; never a name
    created_at: Mapped[datetime] = mapped_column(default=now)
    lesions: Mapped[list[Lesion]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", passive_deletes=True, order_by="Lesion.id"
    )


class Lesion(Base):
    """One skin lesion; without a patient it is an anonymous one-off prediction."""

    __tablename__ = "lesions"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    site: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=now)
    patient: Mapped[Patient | None] = relationship(back_populates="lesions")
    images: Mapped[list[Image]] = relationship(
        back_populates="lesion", cascade="all, delete-orphan", passive_deletes=True, order_by="Image.id"
    )


class Image(Base):
    """A stored (sanitised) image of a lesion, with the metadata it was scored with."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    lesion_id: Mapped[int] = mapped_column(ForeignKey("lesions.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(200))  # relative to the storage directory
    format: Mapped[str] = mapped_column(String(10))  # jpeg, png, ... (from the magic bytes)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    age: Mapped[float | None] = mapped_column(Float)  # the patient's age when the image was taken
    sex: Mapped[str | None] = mapped_column(String(10))
    uploaded_at: Mapped[datetime] = mapped_column(default=now)
    lesion: Mapped[Lesion] = relationship(back_populates="images")
    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True, order_by="Prediction.id"
    )


class Prediction(Base):
    """One scoring of an image by one model version, with its heat map."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(200))
    # A refused image (looks_dermoscopic False) has no model output: probabilities, class, risk,
    # above_threshold, context, activation map and heat map are NULL, and `refusal` holds the reason code.
    probabilities: Mapped[dict | None] = mapped_column(JSON)  # class code -> calibrated probability
    predicted_class: Mapped[str | None] = mapped_column(String(10))
    melanoma_risk: Mapped[float | None] = mapped_column(Float)
    risk_spread: Mapped[float | None] = mapped_column(Float)  # sd of an ensemble's member risks; None for one network
    unsure: Mapped[bool | None] = mapped_column(Boolean)  # spread above the bundle's fitted level; None: no level
    quality_warnings: Mapped[str] = mapped_column(String(200), default="", server_default="")  # codes, ";"-joined
    threshold: Mapped[float] = mapped_column(Float)
    above_threshold: Mapped[bool | None] = mapped_column(Boolean)
    looks_dermoscopic: Mapped[bool] = mapped_column(Boolean)
    refusal: Mapped[str | None] = mapped_column(String(40))  # dermsight.inference.ood.REFUSAL when refused
    context: Mapped[dict | None] = mapped_column(JSON)  # patient context (ugly duckling), None for one-offs
    # The melanoma class activation map (rows of floats) the heat map is drawn from; the heat
    # map file itself (heatmap_path) is made on its first request (Scorer.heatmap).
    melanoma_cam: Mapped[list | None] = mapped_column(JSON)
    heatmap_path: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=now)
    image: Mapped[Image] = relationship(back_populates="predictions")


# What a key may do, each role including the ones before it (see security.required_role).
ROLES = ("read", "clinician", "admin")


class ApiKey(Base):
    """An API key: its public prefix (how a presented key finds its row), the SHA-256 of
    the whole key and its role (one of ROLES). The key itself is shown once, when
    created, and never stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=now)
    revoked_at: Mapped[datetime | None] = mapped_column()
    role: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")


class AuditEvent(Base):
    """One state-changing request or key change: when, who (the key's id, name and
    prefix; "cli" for the command line), what (an action such as ``patient.delete``
    and the ids it touched) and how it ended. Never a file name, age, reference or any
    other value a user typed. Written by the server and the CLI only: no API route
    changes or deletes a row."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=now, index=True)
    actor: Mapped[str] = mapped_column(String(10))  # key, session, cli, dev, anonymous
    key_id: Mapped[int | None] = mapped_column(Integer)  # no foreign key: the trail outlives nothing it names
    key_name: Mapped[str | None] = mapped_column(String(100), index=True)
    key_prefix: Mapped[str | None] = mapped_column(String(32), index=True)
    action: Mapped[str] = mapped_column(String(40), index=True)
    objects: Mapped[str] = mapped_column(Text, default="", server_default="")  # e.g. "patient 3; images 7,8"
    outcome: Mapped[str] = mapped_column(String(10))  # done, refused, failed
    status: Mapped[int | None] = mapped_column(Integer)  # the HTTP status; None from the command line


# -- ranking a patient's lesions -----------------------------------------------------------


@dataclass
class RankedLesion:
    """A lesion with its newest image and that image's newest prediction."""

    lesion: Lesion
    image: Image
    prediction: Prediction

    @property
    def ugly_duckling_score(self) -> float | None:
        return (self.prediction.context or {}).get("ugly_duckling_score")


RANKINGS = ("risk", "ugly_duckling")


def ranked_lesions(patient: Patient, by: str = "risk") -> list[RankedLesion]:
    """The patient's (fully loaded) lesions that have a prediction, highest first by
    melanoma risk or by ugly-duckling score (missing scores and ties fall back to risk).
    Images that do not look dermoscopic have no meaningful risk and go last."""
    if by not in RANKINGS:
        raise ValueError(f"unknown ranking {by!r} (expected one of {', '.join(RANKINGS)})")
    ranked = [
        RankedLesion(lesion, lesion.images[-1], lesion.images[-1].predictions[-1])
        for lesion in patient.lesions
        if lesion.images and lesion.images[-1].predictions
    ]

    def key(item: RankedLesion) -> tuple:
        duckling = item.ugly_duckling_score if by == "ugly_duckling" else None
        return (
            not item.prediction.looks_dermoscopic,
            -duckling if duckling is not None else math.inf,
            -(item.prediction.melanoma_risk or 0.0),  # a refused image has none (and is last already)
            item.lesion.id,
        )

    return sorted(ranked, key=key)
