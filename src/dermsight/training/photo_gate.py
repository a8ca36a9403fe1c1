"""Fit the gate's photo detector (dermoscopy or an ordinary photo?) into a bundle.

Dermoscopy: a sample of every source (of the shared ones, :func:`shared_dermoscopy`: HAM10000
200x150 q75, isic9 squashed 180x180, the isic2017 archive at 256, ISIC 2020 at 512 and 320,
Derm7pt), a quarter of it also as an honest re-take (128 px, squashed, heavy JPEG, a crop). Ordinary photos: Derm7pt's clinical
close-up photos of its published *train* split (the valid split is kept for measuring), each
also as two re-takes (crop, 128 px, heavy JPEG, phone colour), and the everyday photos of
:mod:`dermsight.evaluation.ood_images` (blank frames excluded: loading refuses them) with
re-takes. ISIC 2020's test_128 images are never used: they measure an unseen acquisition.

The threshold is set on held-out folds (a lesion or case, its image and re-takes, stay in one
fold). :func:`source_held_out` measures what the detector does on a whole source it never saw.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dermsight.data.readers import derm7pt_clinical_photos
from dermsight.data.sources import read_source
from dermsight.evaluation.ood_images import acquisition_variant, non_dermoscopic_images
from dermsight.imaging.batches import iter_batches
from dermsight.imaging.preprocess import Preprocessing
from dermsight.inference.ood import OODGate
from dermsight.inference.photo_detector import PhotoDetector, PhotoNetwork
from dermsight.models.bundle import Bundle
from dermsight.models.graph_rewrite import static_padding_model
from dermsight.models.network import export_photo_network

# Dermoscopy sources (folder under the datasets folder) -> (name, family: the fold held out together).
DERMOSCOPY = {
    "ham10000": ("HAM10000", "ham10000"),
    "isic9/train": ("isic9", "isic9"),
    "isic2017": ("isic2017 archive", "isic2017"),
    "isic2020/train_sample.csv": ("ISIC 2020 512 px", "isic2020"),
    "isic2020/train_extra.csv": ("ISIC 2020 320 px", "isic2020"),
    "derm7pt": ("Derm7pt dermoscopy", "derm7pt"),
}
DERMOSCOPY_VARIANTS = ("rescale", "squash", "jpeg", "crop")
FOLDS = 5
REGULARISATION = 0.1  # the logistic regression's C (inverse strength) on standardised features
PHOTO_VARIANTS = ("crop", "rescale", "jpeg", "phone")


def shared_dermoscopy(data: Path, per_source: int = 300, seed: int = 0) -> pd.DataFrame:
    """A sample of `per_source` images of each shared dermoscopy source (:data:`DERMOSCOPY`):
    image_ref, group (lesion, patient or image), source, family."""
    parts = []
    for spec, (source, family) in DERMOSCOPY.items():
        records = read_source(str(data / spec)).records
        records = records[records["image_ref"].notna()]
        records = records.sample(min(per_source, len(records)), random_state=seed)
        groups = records["lesion_id"].fillna(records["patient_id"]).fillna(records["image_id"]).astype(str)
        parts.append(pd.DataFrame({"image_ref": records["image_ref"], "group": groups, "source": source, "family": family}))
    return pd.concat(parts, ignore_index=True)


def gate_images(
    dermoscopy: pd.DataFrame, derm7pt: Sequence[Path], seed: int = 0, max_photos: int | None = None
) -> tuple[list, pd.DataFrame]:
    """The detector's training images: `dermoscopy` (image_ref, group, source, family) and
    re-takes of a quarter of it; the clinical photos (train split; the first `max_photos` when
    given) of each `derm7pt` folder with two re-takes each; the everyday photos with re-takes. Returns (items, one row per item: kind
    dermoscopy / photo / everyday, source, family, group, variant ("" for the original), fold)."""
    rng = np.random.default_rng(seed)
    items: list = []
    rows: list[dict] = []

    def add(item, kind: str, source: str, family: str, group: str, variant: str = "") -> None:
        items.append(item)
        rows.append({"kind": kind, "source": source, "family": family, "group": group, "variant": variant})

    for k, record in enumerate(dermoscopy.itertuples()):
        add(record.image_ref, "dermoscopy", record.source, record.family, record.group)
        if k % 4 == 0:
            how = DERMOSCOPY_VARIANTS[(k // 4) % len(DERMOSCOPY_VARIANTS)]
            retake = acquisition_variant(Path(record.image_ref).read_bytes(), how, rng)
            add(retake, "dermoscopy", record.source, record.family, record.group, how)
    for folder in derm7pt:
        for photo in derm7pt_clinical_photos(Path(folder), split="train").head(max_photos).itertuples():
            add(photo.clinical_ref, "photo", "Derm7pt clinical photos", "photo", photo.image_id)
            encoded = Path(photo.clinical_ref).read_bytes()
            for how in rng.choice(PHOTO_VARIANTS, 2, replace=False):
                add(acquisition_variant(encoded, str(how), rng), "photo", "Derm7pt clinical photos", "photo", photo.image_id, str(how))
    for category, name, encoded in non_dermoscopic_images():
        if category == "blank frame":
            continue
        add(encoded, "everyday", category, "everyday", name)
        if category != "face (LFW)":
            for how in ("crop", "phone", "rescale"):
                add(acquisition_variant(encoded, how, rng), "everyday", category, "everyday", name, how)
    frame = pd.DataFrame(rows)
    if frame.loc[frame["kind"] == "dermoscopy", "family"].nunique() < 2:
        raise ValueError("the photo detector needs dermoscopy of at least two sources")
    groups = (frame["kind"] + ":" + frame["group"]).unique()  # an image, its re-takes and its case stay together
    spread = dict(zip(rng.permutation(groups), np.arange(len(groups)) % FOLDS))
    frame["fold"] = (frame["kind"] + ":" + frame["group"]).map(spread).astype(int)
    return items, frame


def photo_network(prep: Preprocessing) -> PhotoNetwork:
    """The detector's network (:class:`~dermsight.models.network.PhotoFeatureNet`) for inputs
    made by `prep`, as an ONNX graph with its "same" padding folded into constants."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.onnx"
        export_photo_network(path, tuple(prep.mean), tuple(prep.std), prep.size)
        graph = path.read_bytes()
    return PhotoNetwork(static_padding_model(graph) or graph)


def image_photo_features(
    items: Sequence, prep: Preprocessing, network: PhotoNetwork, batch_size: int = 64
) -> tuple[np.ndarray, list[int]]:
    """The `network`'s features of each readable item (image_refs or encoded bytes) under the
    bundle's preprocessing, and the positions of those items."""
    parts, rows = [], []
    for batch in iter_batches(list(items), prep, batch_size):
        if batch.indices:
            parts.append(network.features(batch.images))
            rows.extend(batch.indices)
    return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), rows


def _logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION, class_weight="balanced", max_iter=5000))


def held_out_probabilities(features: np.ndarray, is_photo: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each image's photo probability from a regression fitted without its fold."""
    out = np.zeros(len(features))
    for fold in np.unique(folds):
        rows = folds == fold
        out[rows] = _logistic_regression().fit(features[~rows], is_photo[~rows]).predict_proba(features[rows])[:, 1]
    return out


def fit_photo_detector(
    network: PhotoNetwork, features: np.ndarray, is_photo: np.ndarray, folds: np.ndarray, max_false_rejection: float = 0.01
) -> tuple[PhotoDetector, np.ndarray]:
    """A logistic regression on all (N, F) `features` of `network` (`is_photo` true for ordinary
    photos). The threshold is the (1 - max_false_rejection) quantile of the dermoscopy
    probabilities held out by `folds` (a model fits its own images better than fresh ones).
    Returns the detector and the held-out probabilities."""
    is_photo = np.asarray(is_photo, bool)
    held_out = held_out_probabilities(features, is_photo, folds)
    threshold = float(np.quantile(held_out[~is_photo], 1.0 - max_false_rejection))
    model = _logistic_regression().fit(features, is_photo)
    scaler, regression = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    detector = PhotoDetector(network, scaler.mean_, scaler.scale_, regression.coef_[0].astype(np.float64),
                             float(regression.intercept_[0]), threshold)
    return detector, held_out


def fit_photo_gate(
    bundle: Bundle, dermoscopy: pd.DataFrame, derm7pt: Sequence[Path], max_false_rejection: float = 0.01, seed: int = 0,
    max_photos: int | None = None,
) -> dict:
    """Fit the photo detector on :func:`gate_images` and store it in the bundle's gate (its
    distance part is kept). Returns the held-out validation (:func:`validation`)."""
    gate = OODGate.load(bundle.path, photo_detector=False)  # replaced below
    if gate is None:
        raise ValueError(f"{bundle.path} has no out-of-distribution gate to add a photo detector to")
    items, frame = gate_images(dermoscopy, derm7pt, seed, max_photos)
    network = photo_network(bundle.preprocessing)
    features, rows = image_photo_features(items, bundle.preprocessing, network)
    frame = frame.iloc[rows].reset_index(drop=True)
    is_photo = (frame["kind"] != "dermoscopy").to_numpy()
    gate.photo, held_out = fit_photo_detector(network, features, is_photo, frame["fold"].to_numpy(), max_false_rejection)
    gate.save(bundle.path)
    return validation(frame, held_out, gate.photo.threshold)


def validation(frame: pd.DataFrame, held_out: np.ndarray, threshold: float) -> dict:
    """Shares refused at `threshold` by `held_out` probabilities, by kind and source, as taken
    and re-taken."""
    frame = frame.assign(refused=held_out > threshold)
    out: dict = {"threshold": threshold, "images": int(len(frame))}
    for kind, part in frame.groupby("kind", sort=False):
        out[kind] = {
            source: {"images": int(len(rows)), "refused": float(rows.loc[rows["variant"] == "", "refused"].mean()),
                     "re-takes refused": float(rows.loc[rows["variant"] != "", "refused"].mean())}
            for source, rows in part.groupby("source", sort=False)
        }
    return out


def source_held_out(features: np.ndarray, frame: pd.DataFrame, max_false_rejection: float = 0.01) -> dict:
    """Each dermoscopy source family scored by a regression fitted without it (the photos and everyday
    images split by their folds alike), refused at the (1 - max_false_rejection) quantile of the
    other families' held-out probabilities: what the detector does on a dermatoscope it never saw."""
    is_photo = (frame["kind"] != "dermoscopy").to_numpy()
    families = sorted(set(frame.loc[~is_photo, "family"]))
    folds = np.where(is_photo, frame["fold"] % len(families), frame["family"].map({f: i for i, f in enumerate(families)}))
    held_out = held_out_probabilities(features, is_photo, np.asarray(folds, int))
    dermoscopy = frame.assign(probability=held_out)[~is_photo]
    out = {}
    for source, part in dermoscopy.groupby("source", sort=False):
        others = dermoscopy.loc[dermoscopy["family"] != part["family"].iloc[0], "probability"]
        level = np.quantile(others, 1.0 - max_false_rejection)
        out[source] = {"images": int(len(part)), "refused": float(np.mean(part["probability"] > level))}
    return out


def refit_distance_gate(bundle: Bundle, dermoscopy: pd.DataFrame, quantile: float = 0.99) -> dict:
    """Refit the gate's distance part on the network's gate features of `dermoscopy` (image_ref,
    family), each source family its own fold, so the threshold (the `quantile` of held-out
    scores) is set on dermatoscopes the distances never saw; the photo detector is kept. Needed
    when the gate no longer fits the graph's features. Returns the threshold and image count."""
    from dermsight.inference.ood import fit_ood_gate
    from dermsight.inference.predictor import Predictor

    predictor = Predictor(bundle)
    old = predictor.ood_gate
    if old is None:
        raise ValueError(f"{bundle.path} has no out-of-distribution gate to refit")
    features, rows = predictor.gate_features(dermoscopy["image_ref"].tolist())
    families = dermoscopy["family"].to_numpy()[rows]
    codes = {family: i for i, family in enumerate(sorted(set(families)))}
    gate = fit_ood_gate(features, old.block_sizes, np.asarray([codes[f] for f in families]), quantile=quantile)
    gate.photo = old.photo
    gate.save(bundle.path)
    return {"threshold": gate.threshold, "images": int(len(rows))}
