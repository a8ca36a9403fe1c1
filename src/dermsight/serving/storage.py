"""Where the web app keeps patients, lesions, images and predictions.

Rows live in a SQL database: embedded SQLite (WAL, foreign keys on) by default, or
PostgreSQL by URL. Image and heat-map files live under a storage directory, named by
the SHA-256 of their content only, so identical uploads share one file. Files are
written atomically (temporary file + ``os.replace``, fsynced) before the rows that
point to them commit; one call = one transaction; a file is removed once no row refers
to it. A crash between a file's write and its row's commit leaves an orphan file, never
a row without its file: :meth:`Storage.check_files` (run when the app starts) removes
orphans and reports rows whose file has gone missing. Writers in several processes on
one storage directory serialise on a lock of that directory.

API keys live here too, as SHA-256 hashes only (:class:`ApiKey`).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker
from sqlalchemy.types import TypeDecorator

MIGRATIONS = Path(__file__).with_name("migrations")
FOLDERS = ("images", "heatmaps")
TEMPORARY_PREFIX = ".incoming-"


def _now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands them back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str | None] = mapped_column(String(200))  # a clinic's pseudonymous code; never a name
    created_at: Mapped[datetime] = mapped_column(default=_now)
    lesions: Mapped[list[Lesion]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", passive_deletes=True, order_by="Lesion.id"
    )


class Lesion(Base):
    """One skin lesion; without a patient it is an anonymous one-off prediction."""

    __tablename__ = "lesions"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    site: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    patient: Mapped[Patient | None] = relationship(back_populates="lesions")
    images: Mapped[list[Image]] = relationship(
        back_populates="lesion", cascade="all, delete-orphan", passive_deletes=True, order_by="Image.id"
    )


class Image(Base):
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
    uploaded_at: Mapped[datetime] = mapped_column(default=_now)
    lesion: Mapped[Lesion] = relationship(back_populates="images")
    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True, order_by="Prediction.id"
    )


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(200))
    probabilities: Mapped[dict] = mapped_column(JSON)  # class code -> calibrated probability
    predicted_class: Mapped[str] = mapped_column(String(10))
    melanoma_risk: Mapped[float] = mapped_column(Float)
    risk_spread: Mapped[float | None] = mapped_column(Float)  # sd of an ensemble's member risks; None for one network
    threshold: Mapped[float] = mapped_column(Float)
    above_threshold: Mapped[bool] = mapped_column(Boolean)
    looks_dermoscopic: Mapped[bool] = mapped_column(Boolean)
    context: Mapped[dict | None] = mapped_column(JSON)  # patient context (ugly duckling), None for one-offs
    heatmap_path: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    image: Mapped[Image] = relationship(back_populates="predictions")


class ApiKey(Base):
    """An API key: its public prefix (how a presented key finds its row) and the SHA-256
    of the whole key. The key itself is shown once, when created, and never stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column()


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
    model_version: str
    probabilities: dict[str, float]
    predicted_class: str
    melanoma_risk: float
    threshold: float
    above_threshold: bool
    looks_dermoscopic: bool
    context: dict[str, float | None] | None
    heatmap_jpeg: bytes
    risk_spread: float | None = None


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


class NotFound(LookupError):
    """A patient, image or prediction that does not exist (any more)."""


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
            -item.prediction.melanoma_risk,
            item.lesion.id,
        )

    return sorted(ranked, key=key)


# Loaded with every image, so detached rows answer prediction.image.lesion.patient_id.
_IMAGE_LINKS = (selectinload(Image.lesion), selectinload(Image.predictions).selectinload(Prediction.image))


def make_engine(database_url: str) -> Engine:
    """An engine for `database_url`; SQLite connections get WAL and foreign keys."""
    if not database_url.startswith("sqlite"):
        return create_engine(database_url, pool_pre_ping=True)
    engine = create_engine(database_url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    return engine


def upgrade_database(engine: Engine) -> None:
    """`alembic upgrade head` on `engine`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Storage:
    def __init__(self, database_url: str, files_dir: Path | str):
        self.files_dir = Path(files_dir)
        for folder in FOLDERS:
            (self.files_dir / folder).mkdir(parents=True, exist_ok=True)
        self._root = self.files_dir.resolve()
        self.engine = make_engine(database_url)
        upgrade_database(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Held while files are written and their rows commit, and while rows are deleted
        # and unreferenced files removed: a file is never removed under a committing row.
        # (`_files_locked` adds a lock file for other processes on the same directory.)
        self._files_lock = threading.Lock()

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
        with self._files_locked():
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
        with self._files_locked():
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

    def save_scoring(
        self, patient_id: int | None, scored: list[tuple[int | NewImage, NewPrediction]]
    ) -> list[Prediction]:
        """Store one scoring run in one transaction: for each (stored image id or new
        image, prediction) pair, the new image's lesion and image rows, and the prediction.
        Returns the predictions in input order (image and lesion loaded)."""
        with self._files_locked():
            created: list[Path] = []
            try:
                stored = [
                    (
                        self._put(item.data, "images", "", created) if isinstance(item, NewImage) else None,
                        self._put(prediction.heatmap_jpeg, "heatmaps", ".jpg", created),
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
        path = (self.files_dir / relative).resolve()
        if not path.is_relative_to(self._root) or path == self._root:
            raise NotFound(f"stored file {relative!r} is outside the storage directory")
        return path

    def check_files(self, remove: bool = True) -> FileCheck:
        """Compare the files on disk with the rows: remove (when `remove`) files no row refers
        to and temporary files of interrupted writes; report rows whose file is missing."""
        check = FileCheck(removed=remove)
        with self._files_locked():
            with self.sessions() as session:
                referenced = set(session.scalars(select(Image.path))) | set(
                    session.scalars(select(Prediction.heatmap_path))
                )
            on_disk = set()
            for folder in FOLDERS:
                for path in sorted((self.files_dir / folder).iterdir()):
                    relative = f"{folder}/{path.name}"
                    if path.name.startswith(TEMPORARY_PREFIX):
                        check.temporary.append(relative)
                    elif path.is_file():
                        on_disk.add(relative)
                        if relative not in referenced:
                            check.orphans.append(relative)
            check.missing = sorted(referenced - on_disk)
            if remove:
                for relative in check.orphans + check.temporary:
                    (self.files_dir / relative).unlink(missing_ok=True)
        return check

    # -- API keys ---------------------------------------------------------------------

    def add_api_key(self, name: str, prefix: str, key_hash: str) -> ApiKey:
        with self.sessions.begin() as session:
            key = ApiKey(name=name, prefix=prefix, key_hash=key_hash)
            session.add(key)
        return key

    def api_key(self, prefix: str) -> ApiKey | None:
        """The key row with this prefix, revoked or not; None if there is none."""
        with self.sessions() as session:
            return session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()

    def api_key_active(self, key_id: int) -> bool:
        with self.sessions() as session:
            key = session.get(ApiKey, key_id)
            return key is not None and key.revoked_at is None

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
                key.revoked_at = _now()
        return matches

    def counts(self) -> dict[str, int]:
        """Rows per table and files on disk (what a failed request must leave unchanged)."""
        with self.sessions() as session:
            rows = {
                model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Patient, Lesion, Image, Prediction)
            }
        return rows | {f"{folder} files": len(list((self.files_dir / folder).iterdir())) for folder in FOLDERS}

    # -- internals ----------------------------------------------------------------------

    @contextmanager
    def _files_locked(self):
        """The thread lock, then an exclusive lock on the storage directory itself for
        other processes using it (flock on the directory: no lock file to leave behind)."""
        with self._files_lock:
            descriptor = os.open(self.files_dir, os.O_RDONLY)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)  # closing releases the lock

    def _add(
        self, session, patient_id: int | None, item: int | NewImage, prediction: NewPrediction,
        image_file: tuple[str, str] | None, heatmap_file: tuple[str, str],
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
            threshold=prediction.threshold,
            above_threshold=prediction.above_threshold,
            looks_dermoscopic=prediction.looks_dermoscopic,
            context=prediction.context,
            heatmap_path=heatmap_file[0],
        )
        session.add(row)
        return row

    def _put(self, data: bytes, folder: str, suffix: str, created: list[Path]) -> tuple[str, str]:
        """Write `data` to folder/<sha256><suffix> atomically unless it is already there;
        returns (relative path, sha256) and appends newly created files to `created`."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{folder}/{digest}{suffix}"
        target = self.files_dir / relative
        if not target.exists():
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=TEMPORARY_PREFIX)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, target)
                _fsync_directory(target.parent)  # the rename itself survives a power cut
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            created.append(target)
        return relative, digest

    @staticmethod
    def _paths(session, where) -> set[str]:
        """Files referred to by the images (and their predictions) matching `where`."""
        images = session.execute(select(Image.id, Image.path).join(Lesion).where(where)).all()
        image_ids = [image_id for image_id, _ in images]
        heatmaps = session.scalars(select(Prediction.heatmap_path).where(Prediction.image_id.in_(image_ids)))
        return {path for _, path in images} | set(heatmaps)

    def _remove_unreferenced(self, paths: set[str]) -> None:
        with self.sessions() as session:
            still = set(session.scalars(select(Image.path).where(Image.path.in_(paths))))
            still |= set(session.scalars(select(Prediction.heatmap_path).where(Prediction.heatmap_path.in_(paths))))
        for relative in paths - still:
            self.file(relative).unlink(missing_ok=True)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
