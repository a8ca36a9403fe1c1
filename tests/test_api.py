"""The JSON API and the pages it serves, in process (TestClient), on real ISIC images:
every endpoint, and every bad input answered with a 4xx sentence and an unchanged store.
The app's tests run on SQLite and on PostgreSQL, each on a fresh database."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import dermsight.serving.routes.images as images_routes
from dermsight.inference.heatmap import heatmap_jpeg
from dermsight.inference.ood import REFUSAL_MESSAGE
from dermsight.inference.predictor import Predictor
from dermsight.serving.app import create_app
from dermsight.serving.schemas import DECISIONS, decision, uncertainty
from dermsight.serving.scoring import Scorer, Upload, parse_metadata
from dermsight.serving.storage.models import Prediction
from dermsight.serving.storage.repository import Storage


@pytest.fixture(scope="module")
def database(module_database_url) -> str:
    """The app's database: a fresh one on each backend (the app tests run on both)."""
    return module_database_url


@pytest.fixture(scope="module")
def data_dir(database, tmp_path_factory):
    """The app's files: a fresh folder for each backend's database."""
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def client(serving_bundle, data_dir, database):
    with TestClient(create_app(serving_bundle, database, storage_dir=data_dir, dev=True)) as client:
        yield client
    client.app.state.storage.engine.dispose()


@pytest.fixture(scope="module")
def storage(client):
    return client.app.state.scorer.storage


def upload(client, images, **form):
    """POST /api/images with image paths or (name, bytes) pairs, and form fields."""
    pairs = [(i.name, i.read_bytes()) if hasattr(i, "read_bytes") else i for i in images]
    files = [("files", (name, data, "application/octet-stream")) for name, data in pairs]
    return client.post("/api/images", files=files, data={k: str(v) for k, v in form.items()})


def new_patient(client, reference=None) -> int:
    response = client.post("/api/patients", json={"reference": reference})
    assert response.status_code == 201
    return response.json()["id"]


def stored_files(storage) -> set[str]:
    return {f"{folder}/{p.name}" for folder in ("images", "heatmaps") for p in (storage.files_dir / folder).iterdir()}


# -- heat maps -----------------------------------------------------------------------


def test_heatmap_marks_activation_and_leaves_cold_regions_alone():
    square = np.full((64, 64, 3), 120, np.uint8)
    cam = np.full((7, 7), -1.0, np.float32)
    cam[0, 0] = 5.0  # one hot cell in the top-left corner
    image = np.asarray(Image.open(io.BytesIO(heatmap_jpeg(cam, square)))).astype(int)
    assert image.shape == (64, 64, 3)
    assert np.abs(image[:4, :4] - 120).max() > 40  # coloured where the model looked
    assert np.abs(image[40:, 40:] - 120).max() <= 2  # negative evidence is not drawn (JPEG: within 2 levels)
    flat = np.asarray(Image.open(io.BytesIO(heatmap_jpeg(np.zeros((7, 7), np.float32), square)))).astype(int)
    assert np.abs(flat - 120).max() <= 2


# -- service endpoints ---------------------------------------------------------------


def test_health_model_and_docs(client, serving_bundle, database):
    health = client.get("/api/health").json()
    created = json.loads((serving_bundle / "bundle.json").read_text())["training"]["created"]
    backend = database.split(":")[0].split("+")[0]  # sqlite, postgresql
    assert created and health == {"status": "ok", "model_version": f"serving-test@{created}", "database": backend}
    model = client.get("/api/model").json()
    bundle = Predictor(serving_bundle).bundle
    assert model["name"] == bundle.name and model["version"] == health["model_version"]
    assert model["classes"] == bundle.classes and model["class_names"]["MEL"] == "melanoma"
    assert model["melanoma_threshold"] == pytest.approx(bundle.melanoma_threshold)
    assert model["metrics"] == json.loads(json.dumps(bundle.metrics))
    for url in ("/docs", "/redoc"):  # the app's own copies of Swagger UI and ReDoc, never a CDN
        page = client.get(url).text
        assert "/static/docs/" in page and "cdn" not in page.lower() and "https://" not in page
    assert client.get("/static/docs/swagger-ui-bundle.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/health", "/api/model",
        "/api/patients", "/api/patients/{patient_id}", "/api/patients/{patient_id}/rescore",
        "/api/images", "/api/images/{image_id}", "/api/images/{image_id}/file",
        "/api/predictions/{prediction_id}", "/api/predictions/{prediction_id}/heatmap",
    }


# -- predictions ---------------------------------------------------------------------


def test_one_off_prediction_matches_the_predictor(client, storage, serving_bundle, lesion_images):
    before = storage.counts()
    response = upload(client, lesion_images[:1], age="55", sex="male", site="back")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["patient_id"] is None and body["patient_url"] is None
    assert body["disclaimer"] == "Decision support, not a diagnosis."
    (prediction,) = body["predictions"]
    # The API goes through the one Predictor: same bytes and metadata, same numbers.
    metadata = pd.DataFrame({"age": [55.0], "sex": ["male"], "site": ["torso"]})  # "back" is harmonised to torso
    table, _, _ = Predictor(serving_bundle).predict_images([lesion_images[0].read_bytes()], metadata)
    assert prediction["melanoma_risk"] == pytest.approx(table["melanoma_risk"][0], rel=1e-5)
    assert prediction["predicted_class"] == table["predicted_class"][0]
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert prediction["above_threshold"] == (prediction["melanoma_risk"] >= prediction["threshold"])
    assert prediction["looks_dermoscopic"] is True and prediction["context"] is None
    assert prediction["decision"] == DECISIONS[prediction["referral"]]
    assert prediction["referral"] == ("not_prompted" if not prediction["above_threshold"]
                                      else "urgent" if prediction["melanoma_risk"] >= 0.3 else "routine")
    assert storage.counts()["predictions"] == before["predictions"] + 1

    image = client.get(prediction["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == lesion_images[0].read_bytes()
    heat = client.get(prediction["heatmap_url"])
    size = Predictor(serving_bundle).bundle.preprocessing.size
    assert heat.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(heat.content)).size == (size, size)
    assert client.get(f"/api/predictions/{prediction['id']}").json() == prediction
    detail = client.get(f"/api/images/{prediction['image_id']}").json()
    assert (detail["age"], detail["sex"], detail["site"]) == (55.0, "male", "torso")
    assert (detail["width"], detail["height"]) == (200, 150)
    assert detail["predictions"] == [prediction] and detail["patient_id"] is None

    assert client.delete(f"/api/images/{prediction['image_id']}").status_code == 204
    assert storage.counts() == before
    assert client.get(prediction["image_url"]).status_code == 404


WITHHELD = ("probabilities", "predicted_class", "predicted_class_name", "melanoma_risk", "risk_spread", "unsure",
            "uncertainty", "above_threshold", "differential", "non_melanoma_cancer_likely", "context", "heatmap_url")


def assert_refused_without_risk(client, storage, prediction) -> None:
    """A refused image carries no risk anywhere: not in the API's answer, not in the stored row, no heat map."""
    assert prediction["looks_dermoscopic"] is False
    assert prediction["refusal"] == {"code": "not_dermoscopic", "message": REFUSAL_MESSAGE}
    assert prediction["decision"] == REFUSAL_MESSAGE and "ordinary photo" in REFUSAL_MESSAGE
    assert {key: prediction[key] for key in WITHHELD} == dict.fromkeys(WITHHELD)
    row = storage.get_prediction(prediction["id"])
    stored = (row.melanoma_risk, row.above_threshold, row.probabilities, row.predicted_class, row.risk_spread,
              row.context, row.melanoma_cam, row.heatmap_path)
    assert stored == (None,) * len(stored) and row.refusal == "not_dermoscopic"
    assert client.get(f"/api/predictions/{prediction['id']}/heatmap").status_code == 404
    assert client.get(f"/api/predictions/{prediction['id']}").json() == prediction


def test_non_dermoscopic_image_gets_no_risk(client, storage, document_png):
    (prediction,) = upload(client, [("page.png", document_png)]).json()["predictions"]
    assert_refused_without_risk(client, storage, prediction)


def test_ordinary_photos_of_moles_carry_no_risk(client, storage, clinical_photos, lesion_images):
    """Real Derm7pt clinical photos (cases no detector saw): each refused one carries no risk,
    one-off and in a patient, whose dermoscopic lesion keeps its risk and ranks first."""
    before = stored_files(storage)
    response = upload(client, clinical_photos)
    assert response.status_code == 201, response.text
    predictions = response.json()["predictions"]
    refused = [photo for photo, p in zip(clinical_photos, predictions) if not p["looks_dermoscopic"]]
    assert len(refused) >= 2  # the serving bundle's gate refuses most (conftest); the rate: bench/ood.py
    for prediction in predictions:
        if prediction["looks_dermoscopic"]:
            assert prediction["refusal"] is None and prediction["melanoma_risk"] is not None
        else:
            assert_refused_without_risk(client, storage, prediction)
    heatmaps = len(predictions) - len(refused)
    assert len(stored_files(storage) - before) == len(clinical_photos)  # heat maps are drawn when first asked for
    for prediction in predictions:
        client.get(f"/api/predictions/{prediction['id']}/heatmap")
    assert len(stored_files(storage) - before) == len(clinical_photos) + heatmaps  # no heat map for a refused one
    patient = new_patient(client, "P-photo")
    predictions = upload(client, [lesion_images[0], refused[0]], patient_id=patient).json()["predictions"]
    assert predictions[0]["looks_dermoscopic"] is True and predictions[0]["melanoma_risk"] is not None
    assert_refused_without_risk(client, storage, predictions[1])
    lesions = client.get(f"/api/patients/{patient}").json()["lesions"]
    assert [lesion["prediction"]["id"] for lesion in lesions] == [p["id"] for p in predictions]
    assert lesions[1]["ugly_duckling_score"] is None


def test_patient_lesions_ranked_with_ugly_duckling_context(client, lesion_images):
    patient = new_patient(client, "P-rank")
    first = upload(client, lesion_images[:3], age=61, sex="female", site="torso", patient_id=patient)
    assert first.status_code == 201 and first.json()["patient_url"] == f"/patients/{patient}"
    second = upload(client, lesion_images[3:5], age=61, sex="female", site="lower extremity", patient_id=patient).json()
    # The second upload re-scored the whole patient: context covers all five lesions.
    assert [p["context"]["patient_lesions"] for p in second["predictions"]] == [5.0, 5.0]
    by_risk = client.get(f"/api/patients/{patient}").json()
    assert by_risk["order"] == "risk" and by_risk["lesion_count"] == 5 and by_risk["reference"] == "P-rank"
    risks = [lesion["prediction"]["melanoma_risk"] for lesion in by_risk["lesions"]]
    assert risks == sorted(risks, reverse=True) and [lesion["rank"] for lesion in by_risk["lesions"]] == [1, 2, 3, 4, 5]
    assert [lesion["prediction"]["context"]["risk_rank"] for lesion in by_risk["lesions"]] == [1, 2, 3, 4, 5]
    by_duckling = client.get(f"/api/patients/{patient}", params={"order": "ugly_duckling"}).json()
    scores = [lesion["ugly_duckling_score"] for lesion in by_duckling["lesions"]]
    assert scores == sorted(scores, reverse=True) and all(s is not None for s in scores)
    assert {lesion["site"] for lesion in by_duckling["lesions"]} == {"torso", "lower extremity"}
    assert client.get(f"/api/patients/{patient}", params={"order": "size"}).status_code == 422


def test_rescore_with_a_new_model_keeps_history(client, serving_bundle, data_dir, database, lesion_images, tmp_path):
    patient = new_patient(client)
    upload(client, lesion_images[:2], age=40, patient_id=patient)
    # A new model: restart the app on the same store with another bundle.
    newer = tmp_path / "newer"
    shutil.copytree(serving_bundle, newer)
    config = json.loads((newer / "bundle.json").read_text())
    config["name"] = "newer-model"
    (newer / "bundle.json").write_text(json.dumps(config))
    with TestClient(create_app(newer, database, storage_dir=data_dir, dev=True)) as restarted:
        result = restarted.post(f"/api/patients/{patient}/rescore")
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["model_version"].startswith("newer-model@") and len(body["predictions"]) == 2
        assert all(p["model_version"] == body["model_version"] for p in body["predictions"])
        image = restarted.get(f"/api/images/{body['predictions'][0]['image_id']}").json()
        assert [p["model_version"].split("@")[0] for p in image["predictions"]] == ["serving-test", "newer-model"]
        lesions = restarted.get(f"/api/patients/{patient}").json()["lesions"]
        assert all(lesion["prediction"]["model_version"].startswith("newer-model@") for lesion in lesions)
    restarted.app.state.storage.engine.dispose()
    assert client.post(f"/api/patients/{new_patient(client)}/rescore").json()["predictions"] == []


def test_patients_create_list_get_delete(client, storage, lesion_images):
    before, before_files = storage.counts(), stored_files(storage)
    patient = new_patient(client, "  P-del  ")
    listed = {p["id"]: p for p in client.get("/api/patients").json()}
    assert listed[patient]["reference"] == "P-del" and listed[patient]["lesion_count"] == 0
    upload(client, lesion_images[:2], patient_id=patient)
    client.post(f"/api/patients/{patient}/rescore")
    assert client.get("/api/patients").json()[0]["lesion_count"] == 2
    assert client.delete(f"/api/patients/{patient}").status_code == 204
    assert storage.counts() == before and stored_files(storage) == before_files
    for method, url in (("get", f"/api/patients/{patient}"), ("delete", f"/api/patients/{patient}"),
                        ("post", f"/api/patients/{patient}/rescore")):
        response = client.request(method, url)
        assert response.status_code == 404 and response.json() == {"detail": f"patient {patient} does not exist"}


def test_unknown_ids_are_404(client):
    for url in ("/api/images/999999", "/api/images/999999/file",
                "/api/predictions/999999", "/api/predictions/999999/heatmap"):
        response = client.get(url)
        assert response.status_code == 404 and "does not exist" in response.json()["detail"], url
    assert client.delete("/api/images/999999").status_code == 404
    assert client.get("/patients/999999").status_code == 404


def test_bad_patient_bodies(client):
    for body in ({"reference": "x" * 201}, {"reference": 5}):
        response = client.post("/api/patients", json=body)
        assert response.status_code == 422 and response.json()["detail"].startswith("reference:")
    response = client.post("/api/patients", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and isinstance(response.json()["detail"], str)


# -- bad uploads: a 4xx sentence, and nothing half-written -----------------------------


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """20000 x 20000 pixels (400 MP) in a few KB."""
    out = io.BytesIO()
    Image.new("P", (20000, 20000)).save(out, format="PNG")
    return out.getvalue()


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (150, 90, 70)).save(out, format="PNG")
    return out.getvalue()


BAD_UPLOADS = {
    # name: (files as (name, bytes) or "lesion", form fields, status, words the detail must contain)
    "text file": ([("notes.txt", b"patient has a mole on the back\n")], {}, 422, "notes.txt: not an image"),
    "empty file": ([("empty.jpg", b"")], {}, 422, "empty.jpg: file is empty"),
    "truncated jpeg": (["truncated"], {}, 422, "cut.jpg: corrupt or truncated JPEG"),
    "20000x20000 png": (["huge"], {}, 422, "huge.png: image is too large"),
    "1x1 png": ([("dot.png", png(1, 1))], {}, 422, "dot.png: image is only 1x1 pixels"),
    "age abc": (["lesion"], {"age": "abc"}, 422, "age 'abc' is not a number"),
    "age -5": (["lesion"], {"age": "-5"}, 422, "age '-5' is outside 0-120 years"),
    "unknown site": (["lesion"], {"site": "moon"}, 422, "unknown anatomical site 'moon'"),
    "unknown sex": (["lesion"], {"sex": "robot"}, 422, "unknown sex 'robot'"),
    "patient id text": (["lesion"], {"patient_id": "x"}, 422, "patient_id: Input should be a valid integer"),
    "unknown patient": (["lesion"], {"patient_id": "999999"}, 404, "patient 999999 does not exist"),
    "no files": ([], {"age": "40"}, 422, "files: Field required"),
    "too many files": (["lesion"] * 21, {}, 422, "21 images in one upload; at most 20"),
    "both files bad": (["truncated", ("notes.txt", b"hello")], {}, 422, "notes.txt: not an image"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_stores_nothing(case, client, storage, lesion_images, huge_png):
    items, form, status, words = BAD_UPLOADS[case]
    lesion = lesion_images[0].read_bytes()
    named = {
        "lesion": ("lesion.jpg", lesion),
        "truncated": ("cut.jpg", lesion[: len(lesion) // 2]),
        "huge": ("huge.png", huge_png),
    }
    files = [named[item] if isinstance(item, str) else item for item in items]
    if "patient_id" not in form and case != "no files":
        form = {**form, "patient_id": str(new_patient(client))}
    before, before_files = storage.counts(), stored_files(storage)
    response = upload(client, files, **form)
    assert response.status_code == status, response.text
    assert response.json() == {"detail": response.json()["detail"]} and words in response.json()["detail"]
    assert storage.counts() == before and stored_files(storage) == before_files


def test_mixed_upload_stores_each_good_file_and_reports_each_bad_one(client, storage, lesion_images):
    """A truncated JPEG beside a real lesion: the lesion is scored and stored, the broken file
    is reported with its reason and nothing of it is stored (207: some files left out)."""
    # A real lesion no other test stored (files are content-addressed: a shared one would add no new file).
    out = io.BytesIO()
    Image.open(lesion_images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="JPEG", quality=95)
    lesion = out.getvalue()
    patient = new_patient(client, "P-mixed")
    before, before_files = storage.counts(), stored_files(storage)
    response = upload(client, [("cut.jpg", lesion[: len(lesion) // 2]), ("good.jpg", lesion)], patient_id=patient)
    assert response.status_code == 207, response.text
    body = response.json()
    assert body["rejected"] == [{"number": 1, "filename": "cut.jpg", "reason": body["rejected"][0]["reason"]}]
    assert "cut.jpg: corrupt or truncated JPEG" in body["rejected"][0]["reason"]
    (prediction,) = body["predictions"]
    assert storage.file(storage.get_image(prediction["image_id"]).path).read_bytes() == lesion
    after = storage.counts()
    assert (after["images"] - before["images"], after["predictions"] - before["predictions"]) == (1, 1)
    assert len(stored_files(storage) - before_files) == 1  # the good image (its heat map: when first asked for)
    assert len(client.get(f"/api/patients/{patient}").json()["lesions"]) == 1
    assert upload(client, [("good.jpg", lesion)]).json()["rejected"] == []  # all good: 201, nothing left out


def test_oversized_file_is_413(client, storage, lesion_images, monkeypatch):
    monkeypatch.setattr(images_routes, "MAX_FILE_BYTES", 1024)
    before = storage.counts()
    response = upload(client, lesion_images[:1])
    assert response.status_code == 413 and "over the" in response.json()["detail"]
    assert storage.counts() == before


# -- pages ---------------------------------------------------------------------------


def test_pages_render_with_bundle_numbers(client, serving_bundle):
    bundle = Predictor(serving_bundle).bundle
    patient = new_patient(client, "P-page")
    for url in ("/", "/patients", f"/patients/{patient}", "/learn"):
        page = client.get(url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), url
        assert 'name="viewport"' in page.text and "Decision support, not a diagnosis." in page.text
    index = client.get("/").text
    assert 'name="site"' in index and "palms/soles" in index and "P-page" in index
    learn = client.get("/learn").text
    melanoma = bundle.metrics["pooled"]["melanoma"]
    assert f"{melanoma['auc']['value']:.2f}" in learn
    assert f"{100 * melanoma['sensitivity']['value']:.0f}%" in learn
    assert f"{100 * melanoma['specificity']['value']:.0f}%" in learn
    assert f"{100 * bundle.metrics['pooled']['multiclass']['balanced_accuracy']:.0f}%" in learn
    assert "ABCDE" in learn and "dermatologist" in learn
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/app.css").status_code == 200


def test_serve_command_starts_the_app(serving_bundle, tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from dermsight.cli import app as cli

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    arguments = ["serve", "--model", str(serving_bundle), "--data-dir", str(tmp_path), "--port", "8123"]
    keyless = CliRunner().invoke(cli, arguments)  # production mode with no way to authenticate: refused
    assert keyless.exit_code == 2 and "no active API key" in keyless.output and not started, keyless.output
    assert CliRunner().invoke(cli, ["keys", "create", "clinic", "--data-dir", str(tmp_path)]).exit_code == 0
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123) and started["app"].title == "DermSight"
    assert (tmp_path / "dermsight.db").exists()
    missing = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "not a DermSight model bundle" in missing.output


@pytest.fixture
def storage_on(database_url, tmp_path):
    """A Storage on a fresh database of each backend, for the scorer's concurrency tests."""
    store = Storage(database_url, tmp_path / "files")
    yield store
    store.engine.dispose()


def test_concurrent_one_off_uploads_each_store_their_own_image(serving_bundle, lesion_images, storage_on):
    """One-off uploads are scored and stored side by side (no lock): sent all at once, each
    must come back with its own image, score and heat map, all stored."""
    from concurrent.futures import ThreadPoolExecutor

    storage = storage_on
    scorer = Scorer(Predictor(serving_bundle), storage)
    images = [path.read_bytes() for path in lesion_images]
    metadata = parse_metadata("60", "female", "torso")
    expected = [scorer.predictor.predict_images([data], pd.DataFrame({"age": [60.0], "sex": ["female"], "site": ["torso"]}))[0] for data in images]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda data: scorer.upload([Upload("lesion.jpg", data)], metadata, None).predictions, images))
    assert len(set(images)) == len(images) >= 6
    assert storage.counts()["predictions"] == storage.counts()["images"] == len(images)
    for data, table, (prediction,) in zip(images, expected, results):
        assert storage.file(prediction.image.path).read_bytes() == data
        assert prediction.melanoma_risk == pytest.approx(table["melanoma_risk"][0], rel=1e-5)
        assert Image.open(scorer.heatmap(prediction.id)).format == "JPEG"


def test_concurrent_uploads_to_one_patient_each_see_the_ones_before(serving_bundle, lesion_images, storage_on):
    """A patient is scored by one request at a time: the k-th of six uploads sent at once
    rescores the k-1 lesions stored before it, so 1 + 2 + ... + 6 predictions are stored
    (scorings that overlapped would each miss the others' lesions)."""
    from concurrent.futures import ThreadPoolExecutor

    storage = storage_on
    scorer = Scorer(Predictor(serving_bundle), storage)
    patient = storage.create_patient("P-concurrent").id
    metadata = parse_metadata("60", "female", "torso")
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(
            lambda path: scorer.upload([Upload(path.name, path.read_bytes())], metadata, patient).predictions, lesion_images
        ))
    assert all(len(predictions) == 1 for predictions in results)
    assert len(storage.get_patient(patient).lesions) == len(lesion_images) == 6
    assert storage.counts()["predictions"] == sum(range(1, 7))
    assert sorted(prediction.context["patient_lesions"] for (prediction,) in results) == [1, 2, 3, 4, 5, 6]


def test_heat_map_drawn_on_request_is_the_one_drawn_at_scoring(client, storage, serving_bundle, lesion_images):
    """A scoring stores the activation map, no heat map; the first GET draws it over the stored
    image's model-input square, byte for byte the JPEG drawn from the Predictor's own map and
    square at scoring time, and keeps it: later GETs serve that file."""
    response = upload(client, [lesion_images[2]], age="50", sex="female", site="torso")
    (prediction,) = response.json()["predictions"]
    row = storage.get_prediction(prediction["id"])
    assert row.heatmap_path is None and np.asarray(row.melanoma_cam).ndim == 2
    stored = storage.file(storage.get_image(prediction["image_id"]).path).read_bytes()
    meta = pd.DataFrame({"age": [50.0], "sex": ["female"], "site": ["torso"]})
    _, scores, squares = Predictor(serving_bundle).predict_images([stored], meta)
    eager = heatmap_jpeg(scores.melanoma_cam[0], squares[0])
    first = client.get(prediction["heatmap_url"])
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.content == eager
    path = storage.get_prediction(prediction["id"]).heatmap_path
    assert path is not None and storage.file(path).read_bytes() == eager
    assert client.get(prediction["heatmap_url"]).content == eager
    assert storage.get_prediction(prediction["id"]).heatmap_path == path


def test_heat_maps_stored_as_png_before_jpeg_are_still_served(client, storage, lesion_images):
    prediction = upload(client, [lesion_images[1]]).json()["predictions"][0]
    assert client.get(prediction["heatmap_url"]).status_code == 200
    row = storage.get_prediction(prediction["id"])
    png = io.BytesIO()
    Image.open(storage.file(row.heatmap_path)).save(png, format="PNG")
    legacy = row.heatmap_path.removesuffix(".jpg") + ".png"
    storage.file(legacy).write_bytes(png.getvalue())
    from sqlalchemy import update

    with storage.sessions.begin() as session:
        session.execute(update(Prediction).where(Prediction.id == row.id).values(heatmap_path=legacy))
    served = client.get(prediction["heatmap_url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == png.getvalue()


def test_prediction_carries_a_readable_differential(client, shared):
    meta = pd.read_csv(shared / "ham10000" / "HAM10000_metadata.csv")
    bcc = [shared / "ham10000" / "images" / f"{i}.jpg" for i in meta[meta.dx == "bcc"].image_id[:4]]
    response = upload(client, bcc)
    assert response.status_code == 201, response.text
    for prediction in response.json()["predictions"]:
        ranked = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])[:3]
        differential = prediction["differential"]
        assert [d["code"] for d in differential] == [code for code, _ in ranked]
        assert [d["probability"] for d in differential] == pytest.approx([p for _, p in ranked])
        assert all(d["malignant"] == (d["code"] in {"MEL", "BCC", "SCC", "AK"}) for d in differential)
        assert differential[0]["code"] == prediction["predicted_class"] and differential[0]["name"] == prediction["predicted_class_name"]
        cancer = prediction["probabilities"].get("BCC", 0) + prediction["probabilities"].get("SCC", 0)
        assert prediction["non_melanoma_cancer_likely"] == (cancer >= 0.5)
        assert prediction["risk_spread"] is None  # a single-network bundle has no members to disagree


# -- how sure the model is, and what is wrong with the photo ---------------------------


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive_melanoma(shared) -> np.ndarray:
    """A real 256 x 256 ISIC archive melanoma (sharp, well exposed, larger than the network input)."""
    from dermsight.data.readers import read_isic_cli

    records = read_isic_cli(shared / "isic2017").records
    return np.asarray(Image.open(records.loc[records["diagnosis"] == "MEL", "image_ref"].iloc[1]).convert("RGB"))


def test_quality_warnings_name_what_is_wrong_with_each_photo(client, archive_melanoma):
    from PIL import ImageFilter

    blurred = np.asarray(Image.fromarray(archive_melanoma).filter(ImageFilter.GaussianBlur(4.5)))
    tiny = np.asarray(Image.fromarray(archive_melanoma).resize((100, 100), Image.BICUBIC))
    files = [("sharp.jpg", _jpeg(archive_melanoma)), ("blurred.jpg", _jpeg(blurred)), ("tiny.jpg", _jpeg(tiny))]
    response = upload(client, files)
    assert response.status_code == 201, response.text
    sharp, blur, small = response.json()["predictions"]
    assert sharp["quality_warnings"] == []
    assert [w["code"] for w in blur["quality_warnings"]] == ["out_of_focus"]
    assert "out of focus" in blur["quality_warnings"][0]["message"]
    assert "too_small" in [w["code"] for w in small["quality_warnings"]]
    assert any(w["message"].startswith("The image is only 100 x 100 px") for w in small["quality_warnings"])
    assert sharp["unsure"] is None and sharp["uncertainty"] is None  # a single network: no spread, no level
    stored = client.get(f"/api/images/{blur['image_id']}").json()["predictions"][-1]
    assert stored["quality_warnings"] == blur["quality_warnings"]  # kept with the prediction, not recomputed


def test_a_blank_image_is_refused_and_stores_nothing(client, storage):
    before = stored_files(storage)
    response = upload(client, [("blank.jpg", _jpeg(np.full((300, 300, 3), 200, np.uint8)))])
    assert response.status_code == 422
    assert response.json()["detail"] == "blank.jpg: the image is blank (a single colour): there is no lesion to score"
    assert stored_files(storage) == before


def test_the_ensemble_says_when_it_is_unsure(isic2020, tmp_path):
    """The committed ensemble bundle and its fitted level: of real ISIC 2020 images the Predictor
    calls unsure and sure, the API calls some unsure and some not, always by the level, in words."""
    from dermsight.models.bundle import DEFAULT_BUNDLE, load_bundle

    level = load_bundle(DEFAULT_BUNDLE).unsure_level
    records = isic2020.records
    records = records[records["image_ref"].str.contains("test_128", na=False)].sort_values("image_id").head(60)
    table, _ = Predictor(DEFAULT_BUNDLE).predict_records(records.reset_index(drop=True), progress=False)
    chosen = pd.concat([table[table["unsure"]].head(4), table[~table["unsure"]].head(4)])
    refs = records.set_index("image_id").loc[chosen["image"], "image_ref"]
    files = [(f"{name}.jpg", open(ref, "rb").read()) for name, ref in refs.items()]
    with TestClient(create_app(DEFAULT_BUNDLE, f"sqlite:///{tmp_path / 'db.sqlite'}", storage_dir=tmp_path, dev=True)) as app:
        response = upload(app, files)
        learn = app.get("/learn").text
        app.app.state.storage.engine.dispose()
    assert "The model is 4 networks trained on different sources" in learn and "Before scoring, each photo" in learn
    assert response.status_code == 201, response.text
    predictions = response.json()["predictions"]
    assert {p["unsure"] for p in predictions} == {True, False}  # uploaded without their metadata: close, not equal
    for p in predictions:
        assert p["unsure"] == (p["risk_spread"] > level)
        assert p["uncertainty"].startswith("The model is unsure" if p["unsure"] else "The model's networks agree")
        assert "too_small" in [w["code"] for w in p["quality_warnings"]]  # test_128: 128 px < the network's 160


@pytest.mark.parametrize(
    ("risk", "spread", "unsure", "grade", "says"),
    [
        (0.41, 0.22, True, "urgent", "differ by about 22 percentage points, more than on 9 in 10 of the images it was "
         "tested on. On such images its risks were much less reliable, so give your own examination more weight than "
         "this risk."),
        (0.02, 0.12, True, "not_prompted", "differ by about 12 percentage points, more than on 9 in 10"),
        (0.20, 0.05, False, "routine", "agree: their melanoma risks differ by about 5 percentage points, less than "
         "this risk's distance from the referral threshold: the decision does not hinge on it."),
        (0.01, 0.004, False, "not_prompted", "differ by less than 1 percentage point, less than this risk's distance"),
        (0.06, 0.03, False, "routine", "differ by about 3 percentage points, as much as this risk's distance from the "
         "referral threshold: the decision is a close call."),
        (0.03, 0.01, False, "not_prompted", "differ by about 1 percentage point, as much as this risk's distance"),
        (0.03, 0.01, None, "not_prompted", "The model's networks' melanoma risks differ by about 1 percentage point"),
    ],
)
def test_the_card_says_how_sure_in_points_above_and_below_the_threshold(risk, spread, unsure, grade, says):
    """The wording of every case, unsure and sure, above and below the threshold (0.039), a close call or not, for
    the clinician: percentage points with their number, never a "±"."""
    threshold = 0.039
    prediction = Prediction(melanoma_risk=risk, risk_spread=spread, unsure=unsure, threshold=threshold,
                            above_threshold=risk >= threshold, looks_dermoscopic=True)
    text = uncertainty(prediction)
    assert says in text and "±" not in text
    assert text.startswith("The model is unsure about this lesion" if unsure else "The model's networks")
    assert decision(prediction) == DECISIONS[grade]
