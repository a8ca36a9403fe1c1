"""How each evaluated image was held out from the bundle, and the metrics of every source.

A clinic runs DermSight on its own dermatoscope: the number it should expect is the one on
a source the model never saw. Every evaluated image gets one of these kinds:

- ``left_out_source``: predicted by a fold network trained without any image of its source
  (a bundle trained with ``--source-folds``: its out-of-fold predictions for every source but
  the largest);
- ``external_source``: its source was not among the bundle's training sources at all;
- ``unseen_images``: images of a training source that the bundle never trained on, from
  patients and lesions it never saw either (e.g. ISIC 2020 images beyond its training sample);
- ``grouped_cv``: out-of-fold, from a network that trained on other patients of the same source;
- ``seen_patient``: not itself trained on, but its patient or lesion was: reported, never in
  the held-out figures.

An image the bundle trained on is always evaluated with its out-of-fold prediction, never
with the shipped network (which saw it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermsight.data.schema import CLASSES, DIAGNOSES
from dermsight.models.bundle import Bundle

KINDS: dict[str, str] = {
    "left_out_source": "source left out: a network trained without any image of it",
    "external_source": "a source the bundle never trained on",
    "unseen_images": "unseen patients of a training source",
    "grouped_cv": "grouped cross-validation (other patients of the same source trained on)",
    "seen_patient": "patient or lesion seen in training (not a held-out figure)",
}
SOURCE_FIRST = ("left_out_source", "external_source", "unseen_images", "grouped_cv", "seen_patient")
SOURCE_NAMES: dict[str, str] = {
    "ham10000": "HAM10000",
    "class_folders": "isic9 (images that are not HAM10000 copies)",
    "isic2020": "SIIM-ISIC 2020",
    "isic_archive": "ISIC Archive export (isic2017)",
    "derm7pt": "Derm7pt",
}
_TEXT = ("image_id", "patient_id", "lesion_id", "sex", "site", "diagnosis", "source")


class HeldOutError(ValueError):
    """The bundle's out-of-fold table is missing or unreadable."""


def load_out_of_fold(bundle: Bundle) -> pd.DataFrame:
    """The bundle's out_of_fold.csv.gz; HeldOutError when it is missing or unreadable."""
    path = bundle.path / "out_of_fold.csv.gz"
    if not path.exists():
        raise HeldOutError(f"{path} is missing: this bundle carries no out-of-fold predictions (retrain it)")
    try:
        return pd.read_csv(path, dtype={c: str for c in _TEXT}, float_precision="round_trip")
    except (OSError, ValueError) as err:
        raise HeldOutError(f"{path}: not readable ({err})") from None


def out_of_fold_predictions(bundle: Bundle, oof: pd.DataFrame) -> pd.DataFrame:
    """The out-of-fold table in the `dermsight predict` layout (the gate was not run on it), with
    the bundle's site profile applied when it carries one."""
    classes = [c for c in bundle.classes if c in CLASSES or c == "UNK"]
    probabilities = pd.DataFrame(bundle.site_probabilities(oof[bundle.classes].to_numpy()), columns=bundle.classes)
    table = pd.DataFrame({"image": oof["image_id"]})
    for code in DIAGNOSES:
        table[code] = probabilities[code].to_numpy() if code in probabilities.columns else 0.0
    table["melanoma_risk"] = table["MEL"]
    table["predicted_class"] = np.asarray(classes, dtype=object)[probabilities[classes].to_numpy().argmax(axis=1)]
    table["above_threshold"] = oof["MEL"].to_numpy() >= bundle.model_threshold
    table["looks_dermoscopic"] = True
    return table


def held_out_kinds(bundle: Bundle, frame: pd.DataFrame, oof: pd.DataFrame) -> np.ndarray:
    """One of KINDS per row of `frame` (columns image or image_id, source, patient_id, lesion_id)."""
    ids = frame["image"] if "image" in frame.columns else frame["image_id"]
    in_oof = ids.isin(set(oof["image_id"])).to_numpy()
    source = frame["source"].fillna("unknown").to_numpy(dtype=object)
    source_folds = bool(bundle.training.get("config", {}).get("source_folds"))
    largest = oof["source"].value_counts().idxmax() if len(oof) else None
    trained = set(bundle.training.get("sources") or oof["source"].dropna().unique())
    seen = np.zeros(len(frame), bool)
    for column in ("patient_id", "lesion_id"):
        if column in frame.columns:
            seen |= frame[column].isin(set(oof[column].dropna())).to_numpy()
    return np.select(
        [in_oof & source_folds & (source != largest), in_oof, seen, np.isin(source, list(trained))],
        ["left_out_source", "grouped_cv", "seen_patient", "unseen_images"],
        "external_source",
    )


def per_source(frame: pd.DataFrame, classes: list[str], threshold: float, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Metrics of each (source, held-out kind) in a joined frame (see evaluate.join_predictions,
    with a `held_out` column): held-out kinds first. AUC with a cluster-bootstrap interval,
    sensitivity and specificity at the bundle's threshold, the share flagged (above it), the
    mean risk, ECE, and balanced accuracy over the classes the source labels."""
    # Imported here: serving reads the out-of-fold table (serving.reference) in an image without the
    # scoring libraries (isic-challenge-scoring, scikit-learn: see the Dockerfile).
    from dermsight.evaluation.metrics import binary_summary, expected_calibration_error, multiclass_summary

    rows = []
    for (source, kind), part in frame.groupby([frame["source"].fillna("unknown"), "held_out"], sort=False):
        y = part["melanoma"].to_numpy()
        risk = part["melanoma_risk"].to_numpy(dtype=float)
        entry = {
            "source": str(source),
            "name": SOURCE_NAMES.get(str(source), str(source)),
            "held_out": str(kind),
            "held_out_meaning": KINDS.get(str(kind), str(kind)),
            "images": int(len(part)),
            "melanomas": int(y.sum()),
            "flagged": float(np.mean(risk >= threshold)),
            "mean_risk": float(risk.mean()),
            "melanoma_rate": float(y.mean()),
            "ece_melanoma": expected_calibration_error(y, risk),
        }
        if 0 < y.sum() < len(y):
            groups = _group_numbers(part)
            summary = binary_summary(y, risk, threshold, groups=groups, n_boot=n_boot, seed=seed)
            entry.update({key: summary[key] for key in ("auc", "sensitivity", "specificity", "pauc_80")})
        labelled = part[part["diagnosis"].isin(classes)]
        if labelled["diagnosis"].nunique() > 1:
            entry["balanced_accuracy"] = multiclass_summary(labelled["diagnosis"], labelled[classes], classes)["balanced_accuracy"]
            entry["classes_labelled"] = sorted(labelled["diagnosis"].unique())
        rows.append(entry)
    order = {kind: i for i, kind in enumerate(SOURCE_FIRST)}
    return sorted(rows, key=lambda r: (order.get(r["held_out"], 99), -r["images"]))


def _group_numbers(part: pd.DataFrame) -> np.ndarray | None:
    keys = part["patient_id"].fillna(part["lesion_id"]) if "patient_id" in part.columns else None
    if keys is None or keys.isna().all():
        return None
    return pd.factorize(keys.fillna(part["image"]))[0]
