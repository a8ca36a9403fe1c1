"""The patient's image count a model reads (`log_patient_images`) is the same whichever way
the images are scored: the single-process Predictor counts a patient's images over its whole
input, and so must the batch engines (which split the input into pieces) and the web app
(which scores a patient's stored lesions with each upload).

The default bundle does not read that count (source-neutral features), so these tests use
`patient_count_bundle`, a small real bundle trained on ISIC 2020 images whose patients' counts
are known, and check that it does read it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from dermsight.inference.engine_steps import decode_rows, engine_rows
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import load_bundle
from dermsight.models.metadata import METADATA_FEATURES, encode_metadata
from dermsight.serving.app import create_app
from engine_tables import scattered_patients

COUNT = METADATA_FEATURES.index("log_patient_images")


def test_the_bundle_reads_the_patient_image_count(patient_count_bundle, lesion_images):
    predictor = Predictor(patient_count_bundle)
    assert "log_patient_images" in predictor.bundle.metadata_features
    image = lesion_images[0].read_bytes()
    risks = [
        predictor.predict_images([image], pd.DataFrame({"age": [60.0], "patient_id": ["P"], "patient_images": [n]}))[0]
        for n in (1.0, 3.0, 40.0)
    ]
    assert len({float(table["melanoma_risk"][0]) for table in risks}) == 3


def test_engine_pieces_carry_each_patients_count_over_the_whole_input(test_128, patient_count_bundle):
    """The rows the Ray and Spark engines split into pieces (engine_steps: `engine_rows`, then
    `decode_rows` per piece) encode the metadata exactly as the Predictor encodes the whole input: real
    test_128 patients in shuffled order (each spans several pieces), counts left for the engines
    to count, a few rows without a patient, two with a count given by their source."""
    records = scattered_patients(test_128, 120)
    records.loc[[0, 1], "patient_id"] = None
    records.loc[[2, 3], "patient_images"] = [17.0, 230.0]  # ISIC 2020's count in the whole source dataset
    features = tuple(load_bundle(patient_count_bundle).metadata_features)
    assert features == METADATA_FEATURES
    rows = engine_rows(records)
    pieces = [decode_rows(rows.iloc[part], load_bundle(patient_count_bundle).preprocessing, features)
              for part in np.array_split(np.arange(len(rows)), 4)]
    spans = records.iloc[: len(rows) // 4]["patient_id"].dropna()
    assert spans.isin(records.iloc[len(rows) // 4 :]["patient_id"]).any()  # a patient in two pieces
    metadata = np.concatenate([piece["metadata"] for piece in pieces])
    expected = encode_metadata(records, features)
    np.testing.assert_array_equal(metadata, expected)
    counts = records["patient_id"].map(records["patient_id"].value_counts())
    counted = records["patient_images"].fillna(counts)
    np.testing.assert_allclose(metadata[:, COUNT], np.nan_to_num(np.log1p(counted.to_numpy(float))), rtol=1e-6)


@pytest.fixture(scope="module")
def count_client(patient_count_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("count-app")
    app = create_app(patient_count_bundle, f"sqlite:///{folder / 'app.db'}", storage_dir=folder, dev=True)
    with TestClient(app) as client:
        yield client
    client.app.state.storage.engine.dispose()


def upload(client, paths, patient: int):
    files = [("files", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]
    response = client.post("/api/images", files=files, data={"age": "61", "patient_id": str(patient)})
    assert response.status_code == 201, response.text
    return response.json()["predictions"]


def test_a_patient_upload_scores_as_the_predictor_with_all_the_patients_images(count_client, patient_count_bundle,
                                                                              lesion_images):
    """Two images stored, one uploaded: the model sees a patient of three images, for all three;
    a rescore sees the same. Risks equal the Predictor's on the three images of one patient."""
    patient = count_client.post("/api/patients", json={"reference": "P-count"}).json()["id"]
    upload(count_client, lesion_images[:2], patient)
    (new,) = upload(count_client, lesion_images[2:3], patient)
    metadata = pd.DataFrame({"age": [61.0] * 3, "patient_id": ["P-count"] * 3})
    table, _, _ = Predictor(patient_count_bundle).predict_images([p.read_bytes() for p in lesion_images[:3]], metadata)
    assert new["context"]["patient_lesions"] == 3.0
    assert new["melanoma_risk"] == pytest.approx(float(table["melanoma_risk"][2]), rel=1e-5)
    rescored = count_client.post(f"/api/patients/{patient}/rescore").json()["predictions"]
    assert [p["melanoma_risk"] for p in rescored] == pytest.approx(table["melanoma_risk"].tolist(), rel=1e-5)
