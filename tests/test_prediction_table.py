"""The prediction table's readable columns, on real images scored by the committed bundle."""

from __future__ import annotations

import numpy as np

from dermsight.data.schema import CLASS_NAMES, MALIGNANT
from dermsight.inference.predictor import PREDICTION_COLUMNS, Predictor, differential_text


def test_differential_names_the_three_most_probable_classes(isic2020):
    records = isic2020.records
    records = records[records["image_ref"].str.contains("test_128", na=False)].sort_values("image_id").head(12)
    predictor = Predictor()
    table, _ = predictor.predict_records(records.reset_index(drop=True), progress=False)
    assert [c for c in PREDICTION_COLUMNS if c in table.columns] == list(PREDICTION_COLUMNS)
    classes = predictor.classes
    for _, row in table.iterrows():
        ranked = sorted(classes, key=lambda c: -row[c])[:3]
        parts = row["differential"].split("; ")
        assert [p.rsplit(" ", 2 if p.endswith("(malignant)") else 1)[0] for p in parts] == [CLASS_NAMES[c] for c in ranked]
        assert [p.endswith("(malignant)") for p in parts] == [c in MALIGNANT for c in ranked]
        assert parts[0].startswith(CLASS_NAMES[row["predicted_class"]] + " ")


def test_differential_text_formats_small_probabilities_with_a_decimal():
    probabilities = np.asarray([[0.05, 0.9, 0.05, 0.0]], np.float32)
    assert differential_text(probabilities, ["MEL", "NV", "BCC", "DF"]) == [
        "melanocytic nevus 90%; melanoma 5.0% (malignant); basal cell carcinoma 5.0% (malignant)"
    ]
