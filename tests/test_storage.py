"""The web app's store on SQLite and PostgreSQL (a throwaway cluster, conftest): migrations,
files named by content, one transaction per scoring run, rankings, and deletes that leave nothing."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from PIL import Image as PILImage
from sqlalchemy import inspect, text

from dermsight.serving.storage.database import make_engine, upgrade_database
from dermsight.serving.storage.models import Base, NotFound, ranked_lesions
from dermsight.serving.storage.repository import NewImage, NewPrediction, Storage


@pytest.fixture
def storage(database_url, tmp_path) -> Storage:
    """A fresh Storage on an empty database of each backend (conftest's `database_url`)."""
    store = Storage(database_url, tmp_path / "files")
    yield store
    store.engine.dispose()


@pytest.fixture(scope="module")
def jpegs(shared) -> list[bytes]:
    return [path.read_bytes() for path in sorted((shared / "ham10000" / "images").glob("*.jpg"))[:4]]


def new_image(data: bytes, site: str | None = "torso") -> NewImage:
    width, height = PILImage.open(io.BytesIO(data)).size
    return NewImage(data, "jpeg", width, height, 52.0, "female", site)


def new_prediction(
    risk: float, duckling: float | None = None, heatmap: bytes | None = None, dermoscopic: bool = True
) -> NewPrediction:
    """A prediction as the Scorer builds it; the heat map bytes are unique per risk."""
    context = None if duckling is None else {"ugly_duckling_score": duckling, "risk_rank": 1.0}
    return NewPrediction(
        model_version="test@1", probabilities={"MEL": risk, "NV": 1 - risk},
        predicted_class="NV" if risk < 0.5 else "MEL",
        melanoma_risk=risk, threshold=0.3, above_threshold=risk >= 0.3, looks_dermoscopic=dermoscopic,
        context=context, heatmap_jpeg=heatmap if heatmap is not None else f"jpeg {risk}".encode(),
    )


def counts(patients, lesions, images, predictions, image_files, heatmap_files) -> dict[str, int]:
    return {"patients": patients, "lesions": lesions, "images": images, "predictions": predictions,
            "images files": image_files, "heatmaps files": heatmap_files}


def files(store: Storage) -> set[str]:
    return {str(p.relative_to(store.files_dir)) for p in store.files_dir.rglob("*") if p.is_file()}


def test_migrations_build_the_orm_schema(storage):
    with storage.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert MigrationContext.configure(connection).get_current_revision() == "0007_melanoma_cam"
        if storage.backend == "sqlite":
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    tables = {"patients", "lesions", "images", "predictions", "api_keys", "audit_events"}
    assert tables <= set(inspect(storage.engine).get_table_names())
    # Starting again on the same database is a no-op upgrade that keeps the data.
    patient = storage.create_patient("P-1")
    again = Storage(storage.engine.url.render_as_string(hide_password=False), storage.files_dir)
    assert again.get_patient(patient.id).reference == "P-1"
    again.engine.dispose()


def test_files_are_named_by_content_and_shared(storage, jpegs):
    patient = storage.create_patient()
    heat = b"\xff\xd8\xff same heat map"
    rows = storage.save_scoring(patient.id, [(new_image(jpegs[0]), new_prediction(0.1, heatmap=heat)),
                                             (new_image(jpegs[0]), new_prediction(0.2, heatmap=heat))])
    digest = hashlib.sha256(jpegs[0]).hexdigest()
    assert [r.image.path for r in rows] == [f"images/{digest}"] * 2
    assert rows[0].image.sha256 == digest and (rows[0].image.width, rows[0].image.height) == (200, 150)
    assert storage.file(rows[0].image.path).read_bytes() == jpegs[0]
    assert files(storage) == {f"images/{digest}", f"heatmaps/{hashlib.sha256(heat).hexdigest()}.jpg"}
    assert storage.counts() == counts(1, 2, 2, 2, 1, 1)


def test_a_failed_scoring_run_leaves_nothing(storage, jpegs, monkeypatch):
    patient = storage.create_patient()
    storage.save_scoring(patient.id, [(new_image(jpegs[0]), new_prediction(0.1))])
    before, before_files = storage.counts(), files(storage)
    # An image deleted meanwhile: the new image's files were written, then the transaction fails.
    with pytest.raises(NotFound):
        storage.save_scoring(patient.id, [(new_image(jpegs[1]), new_prediction(0.2)), (10_000, new_prediction(0.3))])
    assert storage.counts() == before and files(storage) == before_files
    # An unknown patient.
    with pytest.raises(NotFound):
        storage.save_scoring(patient.id + 1, [(new_image(jpegs[1]), new_prediction(0.2))])
    assert storage.counts() == before and files(storage) == before_files
    # A disk failure while a file is moved into place: no temporary file stays behind.
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        storage.save_scoring(patient.id, [(new_image(jpegs[2]), new_prediction(0.4))])
    assert storage.counts() == before and files(storage) == before_files


def test_lesions_ranked_by_risk_and_by_ugly_duckling(storage, jpegs):
    patient = storage.create_patient()
    storage.save_scoring(patient.id, [
        (new_image(jpegs[0]), new_prediction(0.10, duckling=1.5)),
        (new_image(jpegs[1]), new_prediction(0.60, duckling=-0.5)),
        (new_image(jpegs[2]), new_prediction(0.30, duckling=0.2)),
        (new_image(jpegs[3]), new_prediction(0.90, duckling=2.0, dermoscopic=False)),
    ])
    loaded = storage.get_patient(patient.id)
    by_risk = [r.prediction.melanoma_risk for r in ranked_lesions(loaded, "risk")]
    by_duckling = [r.ugly_duckling_score for r in ranked_lesions(loaded, "ugly_duckling")]
    assert by_risk == [0.60, 0.30, 0.10, 0.90]  # not dermoscopic: no meaningful risk, last
    assert by_duckling == [1.5, 0.2, -0.5, 2.0]
    # A newer prediction of a lesion (a re-score) replaces the older one in the ranking.
    first_image = loaded.lesions[0].images[0].id
    storage.save_scoring(patient.id, [(first_image, new_prediction(0.95, duckling=0.0))])
    assert ranked_lesions(storage.get_patient(patient.id), "risk")[0].image.id == first_image
    with pytest.raises(ValueError, match="unknown ranking"):
        ranked_lesions(loaded, "size")


def test_deleting_a_patient_removes_rows_and_only_their_files(storage, jpegs):
    keep = storage.create_patient("keep")
    storage.save_scoring(keep.id, [(new_image(jpegs[0]), new_prediction(0.1))])
    kept_files = files(storage)
    gone = storage.create_patient("gone")
    storage.save_scoring(gone.id, [(new_image(jpegs[0]), new_prediction(0.1)),
                                   (new_image(jpegs[1]), new_prediction(0.5))])
    image_id = storage.get_patient(gone.id).lesions[1].images[0].id
    storage.save_scoring(gone.id, [(image_id, new_prediction(0.7))])  # history: two predictions of one image
    storage.delete_patient(gone.id)
    assert storage.counts() == counts(1, 1, 1, 1, 1, 1)
    assert files(storage) == kept_files  # the shared image file stays for "keep"
    assert [p.reference for p, _ in storage.list_patients()] == ["keep"]
    with pytest.raises(NotFound):
        storage.get_patient(gone.id)
    with pytest.raises(NotFound):
        storage.delete_patient(gone.id)


def test_deleting_a_one_off_image_removes_its_lesion(storage, jpegs):
    (row,) = storage.save_scoring(None, [(new_image(jpegs[0], site=None), new_prediction(0.2))])
    assert row.image.lesion.patient_id is None
    assert storage.get_prediction(row.id).image.lesion.site is None
    storage.delete_image(row.image.id)
    assert storage.counts() == counts(0, 0, 0, 0, 0, 0)
    with pytest.raises(NotFound):
        storage.get_image(row.image.id)


def test_list_patients_counts_lesions(storage, jpegs):
    first, second = storage.create_patient("a"), storage.create_patient(None)
    storage.save_scoring(first.id, [(new_image(jpegs[0]), new_prediction(0.1)),
                                    (new_image(jpegs[1]), new_prediction(0.2))])
    assert [(p.id, n) for p, n in storage.list_patients()] == [(second.id, 0), (first.id, 2)]
    assert np.isclose(storage.get_image(storage.get_patient(first.id).lesions[0].images[0].id).age, 52.0)


def test_migration_clears_the_risk_of_images_refused_before_it(database_url):
    """Rows stored by 0004 for a refused image held a risk, a class and a heat map; 0005 clears
    them (and keeps an accepted image's), on each backend."""
    from alembic import command
    from alembic.config import Config

    from dermsight.serving.storage.database import MIGRATIONS

    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        now = "2026-12-01 10:00:00+00:00"
        connection.execute(text(f"INSERT INTO lesions (id, created_at) VALUES (1, '{now}')"))
        connection.execute(text(
            "INSERT INTO images (id, lesion_id, sha256, path, format, width, height, uploaded_at) "
            f"VALUES (1, 1, 'ab', 'images/ab', 'jpeg', 200, 150, '{now}')"
        ))
        for row, dermoscopic in ((1, True), (2, False)):
            connection.execute(text(
                "INSERT INTO predictions (id, image_id, model_version, probabilities, predicted_class, melanoma_risk, "
                "threshold, above_threshold, looks_dermoscopic, context, heatmap_path, created_at, quality_warnings) "
                "VALUES (:id, 1, 'm@1', :probabilities, 'MEL', 0.4, 0.3, :above, :dermoscopic, :context, :heatmap, "
                ":now, '')"
            ), {"id": row, "probabilities": '{"MEL": 0.4}', "above": True, "dermoscopic": dermoscopic,
                "context": '{"risk_rank": 1}', "heatmap": f"heatmaps/h{row}.jpg", "now": now})
    upgrade_database(engine)
    columns = "melanoma_risk, above_threshold, probabilities, predicted_class, heatmap_path, context, refusal"
    with engine.connect() as connection:
        rows = {row[0]: tuple(row[1:]) for row in connection.execute(text(f"SELECT id, {columns} FROM predictions"))}
    engine.dispose()
    assert rows[2] == (None,) * 6 + ("not_dermoscopic",)
    assert rows[1][0] == pytest.approx(0.4) and rows[1][4] == "heatmaps/h1.jpg" and rows[1][6] is None
