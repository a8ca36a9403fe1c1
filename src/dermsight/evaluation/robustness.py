"""Does the model read the lesion or the camera? Held-out scoring under other acquisitions.

- :data:`ACQUISITIONS`: a fixed, documented set of re-encodings a clinic's camera or an
  archive applies (JPEG quality, resolution, aspect, colour temperature, focus);
- :func:`held_out_scores`: images scored by a network that never saw them: for an ensemble
  trained with source folds, the member trained without the image's fold (a source left out
  whole, or a HAM10000 fold); otherwise the bundle's network, which is held out only for
  images it never trained on (the caller picks those);
- :func:`acquisition_sweep`, :func:`paired_consistency`, :func:`ugly_duckling`: the
  measurements of `bench/robustness.py` and `dermsight evaluate --robustness`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermsight.evaluation.join import EvaluationError
from dermsight.evaluation.held_out import HeldOutError, held_out_kinds, load_out_of_fold
from dermsight.imaging.decode import decode_image, read_image_bytes
from dermsight.imaging.preprocess import views
from dermsight.inference.context import patient_context
from dermsight.inference.predictor import Predictor, softmax
from dermsight.models.bundle import Bundle
from dermsight.models.metadata import encode_metadata


def _jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def encode(rgb: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    return encode


def _half_size(rgb: np.ndarray) -> np.ndarray:
    image = Image.fromarray(rgb)
    small = image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BICUBIC)
    return np.asarray(small.resize(image.size, Image.BICUBIC))


def _aspect(rgb: np.ndarray) -> np.ndarray:
    """A non-square frame squashed to a square; a square one stretched to 4:3 (what another
    archive or camera does to the same lesion)."""
    height, width = rgb.shape[:2]
    size = (min(height, width),) * 2 if height != width else (round(width * 4 / 3), height)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def _warmer(rgb: np.ndarray) -> np.ndarray:
    """A lower colour temperature (a warmer light source): red up 10%, blue down 10%."""
    gains = np.array([1.10, 1.0, 0.90], np.float32)
    return np.clip(rgb.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def _blur(rgb: np.ndarray) -> np.ndarray:
    """Slightly out of focus: a Gaussian blur of radius 1 px at the source resolution."""
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=1.0)))


ACQUISITIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "untouched": lambda rgb: rgb,
    "jpeg_95": _jpeg(95),
    "jpeg_75": _jpeg(75),
    "jpeg_50": _jpeg(50),
    "half_size": _half_size,
    "aspect_changed": _aspect,
    "warmer_light": _warmer,
    "slight_blur": _blur,
}


def members_of(predictor: Predictor, folds: Sequence[int] | None) -> np.ndarray:
    """Per row, the index of the member network that never saw it, or -1 for the bundle's own
    output: an ensemble trained with source folds keeps one member per fold, in fold order."""
    n = len(folds) if folds is not None else 0
    members = int(predictor.bundle.training.get("members", 1))
    if folds is None or members < 2:
        return np.full(n, -1)
    return np.array([int(f) if f is not None and not np.isnan(f) and 0 <= f < members else -1 for f in folds])


def held_out_scores(
    predictor: Predictor, rgbs: Sequence[np.ndarray], records: pd.DataFrame, members: np.ndarray, batch: int = 64,
) -> dict[str, np.ndarray]:
    """Calibrated probabilities (N, K) and embeddings (N, F) of decoded images, each from
    `members[i]` (-1: the bundle's output), preprocessed as the bundle does."""
    prep = predictor.bundle.preprocessing
    metadata = encode_metadata(records.reset_index(drop=True), predictor.bundle.metadata_features)
    names = tuple(predictor.bundle.views)
    wanted = ["logits", "embedding", *(["member_logits", "member_embeddings"] if "member_logits" in predictor.outputs else [])]
    probabilities, embeddings = [], []
    for start in range(0, len(rgbs), batch):
        images = np.stack([prep.normalise(prep.resize(rgb)) for rgb in rgbs[start : start + batch]])
        n = len(images)
        stacked = views(images, names).reshape(-1, *images.shape[1:])
        meta = np.tile(metadata[start : start + n].astype(np.float32), (len(names), 1))
        outputs = [o.reshape(len(names), n, *o.shape[1:]).mean(axis=0) for o in predictor.session.run(wanted, {"image": stacked, "metadata": meta})]
        logits, embedding = outputs[0], outputs[1]
        rows = members[start : start + n]
        if len(outputs) > 2 and (rows >= 0).any():
            pick = rows >= 0
            logits[pick] = outputs[2][pick, rows[pick]]
            embedding = embedding.copy()
            member_embedding = outputs[3][np.arange(n), np.maximum(rows, 0)]
            width = member_embedding.shape[1]
            embedding = np.where(pick[:, None], np.pad(member_embedding, ((0, 0), (0, embedding.shape[1] - width))), embedding)
        probabilities.append(softmax(logits / predictor.bundle.temperature, axis=1))
        embeddings.append(embedding)
    return {"probabilities": np.concatenate(probabilities), "embeddings": np.concatenate(embeddings)}


def decode_all(refs: Sequence[str]) -> list[np.ndarray]:
    """Every image behind `refs`, decoded to RGB (ImageError on the first unreadable one)."""
    return [decode_image(read_image_bytes(ref), name=str(ref)) for ref in refs]


def _summary(y_mel: np.ndarray, diagnosis: np.ndarray, probabilities: np.ndarray, classes: list[str], threshold: float) -> dict:
    risk = probabilities[:, classes.index("MEL")]
    predicted = np.asarray(classes)[probabilities.argmax(axis=1)]
    labelled = np.isin(diagnosis, classes)
    out = {
        "flagged": float(np.mean(risk >= threshold)),
        "mean_risk": float(risk.mean()),
        "balanced_accuracy": float(balanced_accuracy_score(diagnosis[labelled], predicted[labelled])) if labelled.any() else None,
    }
    if 0 < y_mel.sum() < len(y_mel):
        out["auc"] = float(roc_auc_score(y_mel, risk))
        out["sensitivity"] = float(np.mean(risk[y_mel == 1] >= threshold))
        out["specificity"] = float(np.mean(risk[y_mel == 0] < threshold))
    return out


def acquisition_sweep(predictor: Predictor, records: pd.DataFrame, members: np.ndarray) -> list[dict]:
    """Metrics of held-out labelled `records` under every acquisition, with each one's change
    against the untouched images (AUC, balanced accuracy, share flagged, mean risk, and the
    median |risk change| per image)."""
    originals = decode_all(records["image_ref"].tolist())
    classes, threshold = predictor.classes, predictor.threshold
    y = (records["diagnosis"] == "MEL").to_numpy().astype(int)
    diagnosis = records["diagnosis"].to_numpy(dtype=object)
    sources = records["source"].to_numpy(dtype=object)
    rows, base = [], None
    for name, transform in ACQUISITIONS.items():
        scores = held_out_scores(predictor, [transform(rgb) for rgb in originals], records, members)
        entry = {"acquisition": name, **_summary(y, diagnosis, scores["probabilities"], classes, threshold)}
        risk = scores["probabilities"][:, classes.index("MEL")]
        entry["auc_by_source"] = {
            str(s): float(roc_auc_score(y[sources == s], risk[sources == s]))
            for s in sorted(set(sources)) if 0 < y[sources == s].sum() < (sources == s).sum()
        }
        if base is None:
            base = (entry, risk)
        else:
            reference, base_risk = base
            for key in ("auc", "balanced_accuracy", "flagged", "mean_risk"):
                if entry.get(key) is not None and reference.get(key) is not None:
                    entry[f"{key}_change"] = entry[key] - reference[key]
            entry["median_abs_risk_change"] = float(np.median(np.abs(risk - base_risk)))
            entry["same_referral"] = float(np.mean((risk >= threshold) == (base_risk >= threshold)))
        rows.append(entry)
    return rows


def held_out_sweep(bundle: Bundle, records: pd.DataFrame, per_source: int = 300) -> list[dict]:
    """The acquisition sweep on up to `per_source` held-out labelled images of each source, each
    scored by a network that never saw it (see `acquisition_sweep`)."""
    try:
        oof = load_out_of_fold(bundle)
    except HeldOutError:
        oof = pd.DataFrame(columns=["image_id", "source", "patient_id", "lesion_id", "fold"])
    predictor = Predictor(bundle)
    records = records[records["image_ref"].notna() & records["diagnosis"].notna()].reset_index(drop=True)
    records["fold"] = records["image_id"].map(oof.set_index("image_id")["fold"])
    records["member"] = members_of(predictor, records["fold"].to_numpy())
    kinds = held_out_kinds(bundle, records, oof)
    held_out = np.isin(kinds, ("left_out_source", "external_source", "unseen_images")) | (records["member"] >= 0).to_numpy()
    chosen = records[held_out].sample(frac=1.0, random_state=0).groupby("source").head(per_source).reset_index(drop=True)
    if chosen.empty:
        raise EvaluationError("no image of DATA is held out from this bundle: nothing to re-score honestly")
    return acquisition_sweep(predictor, chosen, chosen["member"].to_numpy())


def paired_consistency(
    predictor: Predictor, first_refs: Sequence[str], second_refs: Sequence[str], records: pd.DataFrame, members: np.ndarray,
) -> dict:
    """The same lesions in two encodings (e.g. HAM10000's and isic9's copy of one image), each
    pair scored by the same held-out network: how often the referral and the class agree, and
    how far the risks are apart."""
    first = held_out_scores(predictor, decode_all(first_refs), records, members)["probabilities"]
    second = held_out_scores(predictor, decode_all(second_refs), records, members)["probabilities"]
    mel, threshold = predictor.classes.index("MEL"), predictor.threshold
    difference = np.abs(first[:, mel] - second[:, mel])
    return {
        "pairs": int(len(first)),
        "same_referral": float(np.mean((first[:, mel] >= threshold) == (second[:, mel] >= threshold))),
        "same_class": float(np.mean(first.argmax(axis=1) == second.argmax(axis=1))),
        "median_abs_risk_difference": float(np.median(difference)),
        "p95_abs_risk_difference": float(np.percentile(difference, 95)),
        "mean_risk_first": float(first[:, mel].mean()),
        "mean_risk_second": float(second[:, mel].mean()),
    }


def ugly_duckling(table: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict:
    """Within patients with a melanoma and at least one benign lesion: how often a melanoma
    ranks first by risk alone, by the ugly-duckling score, and by a logistic combination of
    the within-patient z-scores cross-fitted by patient (leave-one-patient-out), against
    chance (melanomas / lesions). `table`: patient_id, melanoma (0/1), melanoma_risk, embedding
    columns given as an (N, F) array in `table.attrs["embeddings"]`. 95% intervals: bootstrap
    over patients."""
    from sklearn.linear_model import LogisticRegression

    embeddings = table.attrs["embeddings"]
    context = patient_context(table["patient_id"].reset_index(drop=True), embeddings, table["melanoma_risk"].to_numpy())
    frame = pd.concat([table.reset_index(drop=True).drop(columns=[c for c in context.columns if c in table.columns]), context], axis=1)
    counts = frame.groupby("patient_id")["melanoma"].agg(["sum", "count"])
    eligible = counts[(counts["sum"] >= 1) & (counts["sum"] < counts["count"])].index
    frame = frame[frame["patient_id"].isin(eligible)].reset_index(drop=True)
    features = frame[["risk_z", "distance_z"]].to_numpy()
    combined = np.zeros(len(frame))
    for patient in eligible:  # leave one patient out
        out = (frame["patient_id"] == patient).to_numpy()
        model = LogisticRegression().fit(features[~out], frame.loc[~out, "melanoma"])
        combined[out] = model.decision_function(features[out])
    frame["combined"] = combined
    hits = {name: [] for name in ("risk", "ugly_duckling_score", "combined")}
    chance = []
    for _, rows in frame.groupby("patient_id"):
        for name in hits:
            column = "melanoma_risk" if name == "risk" else name
            hits[name].append(float(rows.loc[rows[column].idxmax(), "melanoma"]))
        chance.append(rows["melanoma"].mean())
    rng = np.random.default_rng(seed)
    n = len(chance)
    result = {"patients": n, "images": int(len(frame)), "chance": float(np.mean(chance))}
    for name, values in hits.items():
        values = np.asarray(values)
        boot = [values[rng.integers(0, n, n)].mean() for _ in range(n_boot)] if n else [np.nan]
        result[f"melanoma_first_by_{name}"] = {
            "value": float(values.mean()) if n else None,
            "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)),
        }
    return result
