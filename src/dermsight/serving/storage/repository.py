"""Data access: :class:`Storage` reads and writes the rows (one call = one transaction)
and keeps the file store in step with them. A scoring run's files are written before its
rows commit and removed again when the transaction fails; deleted rows take the files
only they referred to with them. Callers get detached rows with the links they read
(an image's lesion and predictions) already loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload, sessionmaker

from dermsight.serving.storage.database import make_engine, upgrade_database
from dermsight.serving.storage.files import FileStore
from dermsight.serving.storage.models import (
    ApiKey,
    AuditEvent,
    Image,
    Lesion,
    NotFound,
    Patient,
    Prediction,
    now,
)


@dataclass
class FileCheck:
    """What :meth:`Storage.check_files` found: files no row refers to (removed when asked),
    leftover temporary files of interrupted writes (removed likewise), and files that rows
    refer to but that are missing (reported; nothing can bring them back)."""

    orphans: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    removed: bool = False

    @property
    def clean(self) -> bool:
        return not (self.orphans or self.temporary or self.missing)

    def summary(self) -> str:
        verb = "removed" if self.removed else "found"
        return (
            f"storage check: {len(self.orphans)} orphan file(s) {verb}, {len(self.temporary)} temporary file(s) "
            f"{verb}, {len(self.missing)} file(s) missing for stored rows"
        )


@dataclass
class NewImage:
    """An uploaded image the Predictor accepted, with the metadata it was scored with."""

    data: bytes
    format: str
    width: int
    height: int
    age: float | None
    sex: str | None
    site: str | None


@dataclass
class NewPrediction:
    """A prediction as the Scorer made it, before it is stored: with its melanoma activation
    map (the heat map is drawn from it on its first request) or an already drawn heat map. A
    refused image (looks_dermoscopic False) has its `refusal` code and no model output (None)."""

    model_version: str
    probabilities: dict[str, float] | None
    predicted_class: str | None
    melanoma_risk: float | None
    threshold: float
    above_threshold: bool | None
    looks_dermoscopic: bool
    context: dict[str, float | None] | None
    heatmap_jpeg: bytes | None = None
    melanoma_cam: list[list[float]] | None = None
    risk_spread: float | None = None
    unsure: bool | None = None
    quality_warnings: str = ""  # dermsight.imaging.quality codes, ";"-joined
    refusal: str | None = None


# Loaded with every image, so detached rows answer prediction.image.lesion.patient_id.
_IMAGE_LINKS = (selectinload(Image.lesion), selectinload(Image.predictions).selectinload(Prediction.image))


class Storage:
    """The rows in the database at `database_url` (migrated to the newest schema when
    opened) and their files under `files_dir`."""

    def __init__(self, database_url: str, files_dir: Path | str):
        self.files = FileStore(files_dir)
        self.files_dir = self.files.root
        self.engine = make_engine(database_url)
        upgrade_database(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    # -- patients ---------------------------------------------------------------------

    def create_patient(self, reference: str | None = None) -> Patient:
        with self.sessions.begin() as session:
            patient = Patient(reference=reference)
            session.add(patient)
        return patient

    def list_patients(self) -> list[tuple[Patient, int]]:
        """Every patient with its number of lesions, newest first."""
        counts = select(Lesion.patient_id, func.count(Lesion.id).label("n")).group_by(Lesion.patient_id).subquery()
        query = (
            select(Patient, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.patient_id == Patient.id)
            .order_by(Patient.id.desc())
        )
        with self.sessions() as session:
            return [(patient, int(n)) for patient, n in session.execute(query)]

    def get_patient(self, patient_id: int) -> Patient:
        """The patient with lesions, images and predictions loaded; NotFound if absent."""
        query = select(Patient).where(Patient.id == patient_id).options(
            selectinload(Patient.lesions).selectinload(Lesion.images).options(*_IMAGE_LINKS)
        )
        with self.sessions() as session:
            patient = session.scalars(query).one_or_none()
        if patient is None:
            raise NotFound(f"patient {patient_id} does not exist")
        return patient

    def delete_patient(self, patient_id: int) -> None:
        """Remove the patient, every row below it and every file only they referred to."""
        # The file lock is held while rows are deleted and unreferenced files removed, as
        # while files are written and their rows commit: a file never goes under a new row.
        with self.files.locked():
            with self.sessions.begin() as session:
                patient = session.get(Patient, patient_id)
                if patient is None:
                    raise NotFound(f"patient {patient_id} does not exist")
                paths = self._paths(session, Lesion.patient_id == patient_id)
                session.delete(patient)
            self._remove_unreferenced(paths)

    # -- images and predictions -------------------------------------------------------

    def get_image(self, image_id: int) -> Image:
        query = select(Image).where(Image.id == image_id).options(*_IMAGE_LINKS)
        with self.sessions() as session:
            image = session.scalars(query).one_or_none()
        if image is None:
            raise NotFound(f"image {image_id} does not exist")
        return image

    def delete_image(self, image_id: int) -> None:
        """Remove the image, its predictions, its lesion if that is left empty, and files."""
        with self.files.locked():
            with self.sessions.begin() as session:
                image = session.get(Image, image_id)
                if image is None:
                    raise NotFound(f"image {image_id} does not exist")
                paths = self._paths(session, Image.id == image_id)
                lesion = image.lesion
                session.delete(image)
                session.flush()
                if not session.scalar(select(func.count(Image.id)).where(Image.lesion_id == lesion.id)):
                    session.delete(lesion)
            self._remove_unreferenced(paths)

    def get_prediction(self, prediction_id: int) -> Prediction:
        with self.sessions() as session:
            options = [selectinload(Prediction.image).options(*_IMAGE_LINKS)]
            prediction = session.get(Prediction, prediction_id, options=options)
        if prediction is None:
            raise NotFound(f"prediction {prediction_id} does not exist")
        return prediction

    def save_heatmap(self, prediction_id: int, jpeg: bytes) -> str:
        """Store the heat map drawn on a prediction's first request; the relative path of its
        file (that of the one stored first, when another request drew it meanwhile). NotFound
        when the prediction was deleted."""
        with self.files.locked():
            created: list[Path] = []
            try:
                with self.sessions.begin() as session:
                    row = session.get(Prediction, prediction_id)
                    if row is None:
                        raise NotFound(f"prediction {prediction_id} does not exist")
                    if row.heatmap_path is None:
                        row.heatmap_path = self.files.put(jpeg, "heatmaps", ".jpg", created)[0]
                    return row.heatmap_path
            except BaseException:
                for path in created:
                    path.unlink(missing_ok=True)
                raise

    def save_scoring(
        self, patient_id: int | None, scored: list[tuple[int | NewImage, NewPrediction]]
    ) -> list[Prediction]:
        """Store one scoring run in one transaction: for each (stored image id or new
        image, prediction) pair, the new image's lesion and image rows, and the prediction.
        Returns the predictions in input order (image and lesion loaded)."""
        with self.files.locked():
            created: list[Path] = []
            try:
                stored = [
                    (
                        self.files.put(item.data, "images", "", created) if isinstance(item, NewImage) else None,
                        self.files.put(prediction.heatmap_jpeg, "heatmaps", ".jpg", created)
                        if prediction.heatmap_jpeg is not None else None,
                    )
                    for item, prediction in scored
                ]
                with self.sessions.begin() as session:
                    if patient_id is not None and session.get(Patient, patient_id) is None:
                        raise NotFound(f"patient {patient_id} does not exist")
                    rows = [
                        self._add(session, patient_id, item, prediction, image_file, heatmap_file)
                        for (item, prediction), (image_file, heatmap_file) in zip(scored, stored)
                    ]
                    session.flush()
                    for row in rows:  # what callers read after the session closes
                        _ = row.image.lesion
            except BaseException:
                for path in created:
                    path.unlink(missing_ok=True)
                raise
        return rows

    def file(self, relative: str) -> Path:
        """The file at `relative` (a path from a row), never outside the storage directory."""
        return self.files.path(relative)

    def check_files(self, remove: bool = True) -> FileCheck:
        """Compare the files on disk with the rows: remove (when `remove`) files no row refers
        to and temporary files of interrupted writes; report rows whose file is missing."""
        with self.files.locked():
            with self.sessions() as session:
                referenced = set(session.scalars(select(Image.path))) | set(
                    session.scalars(select(Prediction.heatmap_path).where(Prediction.heatmap_path.is_not(None)))
                )
            on_disk, temporary = self.files.scan()
            orphans = [relative for relative in on_disk if relative not in referenced]
            missing = sorted(referenced - set(on_disk))
            check = FileCheck(orphans=orphans, temporary=temporary, missing=missing, removed=remove)
            if remove:
                self.files.remove_listed(check.orphans + check.temporary)
        return check

    # -- API keys ---------------------------------------------------------------------

    def add_api_key(self, name: str, prefix: str, key_hash: str, role: str) -> ApiKey:
        with self.sessions.begin() as session:
            key = ApiKey(name=name, prefix=prefix, key_hash=key_hash, role=role)
            session.add(key)
        return key

    def api_key(self, prefix: str) -> ApiKey | None:
        """The key row with this prefix, revoked or not; None if there is none."""
        with self.sessions() as session:
            return session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()

    def list_api_keys(self) -> list[ApiKey]:
        with self.sessions() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))

    def revoke_api_keys(self, which: str) -> list[ApiKey]:
        """Revoke the active keys whose id, name or prefix is `which`; returns them."""
        with self.sessions.begin() as session:
            matches = [
                key for key in session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None)))
                if which in (str(key.id), key.name, key.prefix)
            ]
            for key in matches:
                key.revoked_at = now()
        return matches

    # -- the audit trail ----------------------------------------------------------------

    def add_audit_event(
        self, actor: str, action: str, outcome: str, *, key: tuple[int | None, str | None, str | None] | None = None,
        objects: str = "", status: int | None = None,
    ) -> AuditEvent:
        """Append one row to the audit trail; `key` is (id, name, prefix) of the key that acted."""
        key_id, key_name, key_prefix = key or (None, None, None)
        with self.sessions.begin() as session:
            event = AuditEvent(actor=actor, key_id=key_id, key_name=key_name, key_prefix=key_prefix, action=action,
                               objects=objects, outcome=outcome, status=status)
            session.add(event)
        return event

    def audit_events(
        self, *, key: str | None = None, action: str | None = None, outcome: str | None = None,
        since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
    ) -> list[AuditEvent]:
        """Audit rows, oldest first (the newest `limit` when given): of the key whose name or
        prefix is `key`, of `action` (``patient`` matches ``patient.delete`` too), with
        `outcome`, at or after `since` and before `until`."""
        query = select(AuditEvent)
        if key is not None:
            query = query.where((AuditEvent.key_name == key) | (AuditEvent.key_prefix == key))
        if action is not None:
            query = query.where((AuditEvent.action == action) | AuditEvent.action.startswith(f"{action}.",
                                                                                            autoescape=True))
        if outcome is not None:
            query = query.where(AuditEvent.outcome == outcome)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if until is not None:
            query = query.where(AuditEvent.at < until)
        query = query.order_by(AuditEvent.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.sessions() as session:
            return list(reversed(session.scalars(query).all()))

    def counts(self) -> dict[str, int]:
        """Rows per table and files on disk (what a failed request must leave unchanged)."""
        with self.sessions() as session:
            rows = {
                model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Patient, Lesion, Image, Prediction)
            }
        return rows | self.files.counts()

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _add(
        session, patient_id: int | None, item: int | NewImage, prediction: NewPrediction,
        image_file: tuple[str, str] | None, heatmap_file: tuple[str, str] | None,
    ) -> Prediction:
        if isinstance(item, NewImage):
            lesion = Lesion(patient_id=patient_id, site=item.site)
            image = Image(
                lesion=lesion, sha256=image_file[1], path=image_file[0], format=item.format,
                width=item.width, height=item.height, age=item.age, sex=item.sex,
            )
            session.add_all([lesion, image])
        else:
            image = session.get(Image, item)
            if image is None:
                raise NotFound(f"image {item} was deleted while it was being scored")
        row = Prediction(
            image=image,
            model_version=prediction.model_version,
            probabilities=prediction.probabilities,
            predicted_class=prediction.predicted_class,
            melanoma_risk=prediction.melanoma_risk,
            risk_spread=prediction.risk_spread,
            unsure=prediction.unsure,
            quality_warnings=prediction.quality_warnings,
            threshold=prediction.threshold,
            above_threshold=prediction.above_threshold,
            looks_dermoscopic=prediction.looks_dermoscopic,
            refusal=prediction.refusal,
            context=prediction.context,
            melanoma_cam=prediction.melanoma_cam,
            heatmap_path=heatmap_file[0] if heatmap_file else None,
        )
        session.add(row)
        return row

    @staticmethod
    def _paths(session, where) -> set[str]:
        """Files referred to by the images (and their predictions) matching `where`."""
        images = session.execute(select(Image.id, Image.path).join(Lesion).where(where)).all()
        image_ids = [image_id for image_id, _ in images]
        heatmaps = session.scalars(select(Prediction.heatmap_path).where(Prediction.image_id.in_(image_ids)))
        return {path for _, path in images} | {path for path in heatmaps if path is not None}  # refused: no heat map

    def _remove_unreferenced(self, paths: set[str]) -> None:
        with self.sessions() as session:
            still = set(session.scalars(select(Image.path).where(Image.path.in_(paths))))
            still |= set(session.scalars(select(Prediction.heatmap_path).where(Prediction.heatmap_path.in_(paths))))
        self.files.remove(paths - still)
