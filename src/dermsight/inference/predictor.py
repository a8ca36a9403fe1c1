"""The one Predictor: used by `dermsight predict`, the API and batch scoring alike.

bytes/image_ref -> the bundle's preprocessing -> ONNX Runtime (test-time views
averaged) -> temperature-calibrated probabilities -> threshold decision -> patient
context. Needs neither torch nor timm.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from dermsight.data.schema import CLASS_NAMES, DIAGNOSES, MALIGNANT
from dermsight.imaging.batches import iter_batches, load_square
from dermsight.imaging.preprocess import view, views
from dermsight.imaging.quality import QUALITY_MEASURES, quality_warnings
from dermsight.inference.context import CONTEXT_COLUMNS, patient_context
from dermsight.inference.ood import REFUSAL, OODGate
from dermsight.inference.onnx_session import ParallelSession
from dermsight.inference.score_cache import ScoreCache
from dermsight.models.bundle import Bundle, load_bundle, with_site
from dermsight.models.metadata import encode_metadata
from dermsight.models.site_profile import SiteProfile

# One probability column per ISIC 2019 code, UNK ("benign, other") included, whatever
# subset a bundle predicts (absent classes are 0): the layout never changes.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "image",
    *DIAGNOSES,
    "melanoma_risk",
    "predicted_class",
    "differential",
    "above_threshold",
    "looks_dermoscopic",
    "quality_warnings",
)

# With the class probabilities, the model's answers that mean nothing for an image the gate refused.
WITHHELD_COLUMNS = ("melanoma_risk", "risk_spread", "unsure", "predicted_class", "differential", "above_threshold")


@dataclass
class Scores:
    """Model outputs for a batch: calibrated probabilities (N, K), embeddings (N, F),
    melanoma class activation maps (N, h, w: the class head's melanoma map less the mean of its
    classes' maps, averaged over the views), whether each image passed the
    out-of-distribution gate (N,), each member network's calibrated probabilities
    (N, members, K): one member for a single network, the fold networks of an ensemble, and
    the image-quality measures taken while loading (N, QUALITY_MEASURES; NaN when not taken)."""

    probabilities: np.ndarray
    embeddings: np.ndarray
    melanoma_cam: np.ndarray
    looks_dermoscopic: np.ndarray
    member_probabilities: np.ndarray
    image_quality: np.ndarray

    def risk_spread(self, melanoma_index: int) -> np.ndarray:
        """Standard deviation of the members' melanoma risks (0 for a single network)."""
        return self.member_probabilities[:, :, melanoma_index].std(axis=1)


@dataclass
class PreparedImages:
    """Encoded images made ready for the model by `Predictor.prepare_images`: normalised inputs
    (N, 3, S, S), encoded metadata (N, M), quality measures, the uint8 squares (N, S, S, 3) and
    the metadata frame (image_id, patient_id, ...)."""

    inputs: np.ndarray
    metadata: np.ndarray
    quality: np.ndarray
    squares: np.ndarray
    frame: pd.DataFrame


def differential_text(probabilities: np.ndarray, classes: Sequence[str], top: int = 3) -> list[str]:
    """Each row's `top` most probable classes in plain names, malignant ones marked:
    "melanoma 57% (malignant); melanocytic nevus 16%; benign keratosis 12%"."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    return [
        "; ".join(
            f"{CLASS_NAMES.get(classes[k], classes[k])} {100 * row[k]:.{1 if row[k] < 0.1 else 0}f}%"
            + (" (malignant)" if classes[k] in MALIGNANT else "")
            for k in ranks
        )
        for row, ranks in zip(probabilities, order)
    ]


def no_quality(n: int) -> np.ndarray:
    """Image-quality measures of `n` images that were not measured."""
    return np.full((n, len(QUALITY_MEASURES)), np.nan, np.float32)


def prediction_table(scores: Scores, image_ids: Sequence[str], patient_ids: pd.Series | None, bundle: Bundle) -> pd.DataFrame:
    """`Predictor.predict_table` without a Predictor (no ONNX session): what the batch engines'
    group-by tasks run on one patient's scores, with the bundle's classes, threshold, input
    size (for the quality warnings), uncertainty level and site profile (recalibrated risks,
    the members' spread in the site's units, the site's threshold)."""
    classes, mel = list(bundle.classes), bundle.classes.index("MEL")
    n = len(scores.probabilities)
    referred = scores.probabilities[:, mel] >= bundle.model_threshold  # the network's risk decides, site or not
    if bundle.site:  # the site's recalibrated risks (members too: their spread is in the site's units)
        scores = replace(scores, probabilities=bundle.site_probabilities(scores.probabilities),
                         member_probabilities=bundle.site_probabilities(scores.member_probabilities))
    risk = scores.probabilities[:, mel]
    columns: dict[str, object] = {"image": list(image_ids)}
    if patient_ids is not None:
        columns["patient_id"] = patient_ids.to_numpy()
    for code in DIAGNOSES:
        columns[code] = scores.probabilities[:, classes.index(code)] if code in classes else np.zeros(n, np.float32)
    columns["melanoma_risk"] = risk
    if scores.member_probabilities.shape[1] > 1:
        columns["risk_spread"] = scores.risk_spread(mel)
        if bundle.unsure_level is not None:
            columns["unsure"] = columns["risk_spread"] > bundle.unsure_level
    columns["predicted_class"] = np.asarray(classes, dtype=object)[scores.probabilities.argmax(axis=1)]
    columns["differential"] = differential_text(scores.probabilities, classes)
    columns["above_threshold"] = referred
    columns["looks_dermoscopic"] = scores.looks_dermoscopic
    warnings = [""] * n  # images whose quality was not measured (Ray without measures) get none
    measured = np.flatnonzero(~np.isnan(scores.image_quality).any(axis=1))
    for i, codes in zip(measured, quality_warnings(scores.image_quality[measured], bundle.preprocessing.size)):
        warnings[i] = ";".join(codes)
    columns["quality_warnings"] = warnings
    if patient_ids is not None:
        context = patient_context(patient_ids, scores.embeddings, risk)
        columns.update({column: context[column].to_numpy() for column in CONTEXT_COLUMNS})
    return pd.DataFrame(columns)  # built at once: a column at a time cost ~3 ms per served upload


def withhold_refused(table: pd.DataFrame) -> pd.DataFrame:
    """The prediction table as it leaves DermSight (`dermsight predict`'s file; the service
    stores the same, serving.scoring):
    a `refusal` column (the reason code, empty for an accepted image) beside
    `looks_dermoscopic`, and for each refused image no model output at all: its class
    probabilities, risk, spread, class, differential, decision and patient context are blank."""
    out = table.copy()
    refused = ~out["looks_dermoscopic"].astype(bool).to_numpy()
    out.insert(out.columns.get_loc("looks_dermoscopic") + 1, "refusal", np.where(refused, REFUSAL, ""))
    if refused.any():
        for column in [c for c in (*DIAGNOSES, *WITHHELD_COLUMNS, *CONTEXT_COLUMNS) if c in out.columns]:
            kind = out[column].dtype.kind
            out[column] = out[column].astype("boolean" if kind == "b" else "float64" if kind in "fiu" else "object")
            out.loc[refused, column] = pd.NA if kind == "b" else np.nan if kind in "fiu" else None
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """scipy.special.softmax, the same operations (max-shifted exp over its sum) without
    importing scipy: a quarter of a second off every start of `predict` and `serve`."""
    shifted = np.exp(x - np.amax(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


class Predictor:
    """A bundle's ONNX graph, gate and decision rule behind one interface: score preprocessed
    arrays (`score`), encoded uploads (`predict_images`, the API) or records with image files
    (`predict_records`, the CLI, evaluation and the batch engines), always into the same
    prediction table. `threads`: ONNX Runtime runs in flight (default: one per core)."""

    def __init__(self, bundle: Bundle | Path | str | None = None, threads: int | None = None,
                 site: SiteProfile | Path | str | None = None):
        """`site`: a site profile (or its file) to apply; None: the bundle's own operating point
        (or the profile a given Bundle already carries)."""
        bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.bundle = bundle if bundle.site and site is None else with_site(bundle, site)
        self.session = ParallelSession(self.bundle.onnx_path, threads)
        self.classes = self.bundle.classes
        self.melanoma_index = self.classes.index("MEL")
        self.ood_gate = OODGate.load(self.bundle.path)
        graph_outputs = {o.name for o in self.session.get_outputs()}
        self.outputs = ["logits", "embedding", "cam", "gate_features", *(["member_logits"] if "member_logits" in graph_outputs else [])]

    @property
    def threshold(self) -> float:
        return self.bundle.melanoma_threshold

    def score(self, images: np.ndarray, metadata: np.ndarray, quality: np.ndarray | None = None) -> Scores:
        """Preprocessed images (N, 3, S, S) + encoded metadata (N, M) -> Scores, carrying the
        images' quality measures when given. Logits are averaged over the bundle's views; each
        view's heat map is mapped back to the original orientation before averaging."""
        return self.score_views(views(images, tuple(self.bundle.views)), metadata, quality)

    def score_views(self, stacked: np.ndarray, metadata: np.ndarray, quality: np.ndarray | None = None) -> Scores:
        """`score` on images already stacked in every bundle view: (V, N, 3, S, S), as
        `iter_batches(..., views=bundle.views)` delivers them."""
        names = tuple(self.bundle.views)
        if stacked.shape[0] != len(names):
            raise ValueError(f"expected {len(names)} views ({', '.join(names)}), got {stacked.shape[0]}")
        n = stacked.shape[1]
        flat = stacked.reshape(-1, *stacked.shape[2:])
        meta = np.tile(metadata.astype(np.float32), (len(names), 1))
        feeds = {"image": flat, "metadata": meta}
        outputs = self.session.run(self.outputs, feeds)
        logits, embeddings, _, gate_features = (a.reshape(len(names), n, -1).mean(axis=0) for a in outputs[:4])
        cams = outputs[2]
        # melanoma's evidence against the classes' mean: the centred logit the softmax reads
        centred = cams[:, self.melanoma_index] - cams.mean(axis=1)
        mel_cams = centred.reshape(len(names), n, *cams.shape[2:])
        cam = np.mean([view(mel_cams[v], name) for v, name in enumerate(names)], axis=0)  # flips are self-inverse
        accepted = self.accepts(gate_features, stacked[0])  # the photo detector sees the image as taken
        temperature = self.bundle.temperature
        if len(outputs) > 4:  # an ensemble: each member's logits, averaged over the views
            members = outputs[4].reshape(len(names), n, *outputs[4].shape[1:]).mean(axis=0)
        else:
            members = logits[:, None, :]
        return Scores(
            softmax(logits / temperature, axis=1), embeddings, cam, accepted, softmax(members / temperature, axis=2),
            no_quality(n) if quality is None else np.asarray(quality, np.float32),
        )

    def accepts(self, gate_features: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The out-of-distribution gate's verdict on images (N, 3, S, S) with their gate features;
        all True for a bundle without a gate."""
        if self.ood_gate is None:
            return np.ones(len(images), bool)
        return self.ood_gate.accepts(gate_features, images)

    def gate_features(self, refs: Sequence, batch_size: int = 32, progress: bool = True) -> tuple[np.ndarray, list[int]]:
        """The out-of-distribution gate's input for each readable image (means over the
        bundle's views), and the indices of those images: what `dermsight train` fits the
        gate on."""
        parts, rows = [], []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"gate features of {len(refs)} images", total=len(refs))
            batches = iter_batches(
                list(refs), self.bundle.preprocessing, batch_size, on_item=lambda: bar.advance(task), views=self.bundle.views
            )
            for batch in batches:
                if batch.indices:
                    flat = batch.images.reshape(-1, *batch.images.shape[2:])
                    meta = np.zeros((len(flat), len(self.bundle.metadata_features)), np.float32)
                    features = self.session.run(["gate_features"], {"image": flat, "metadata": meta})[0]
                    parts.append(features.reshape(len(batch.images), len(batch.indices), -1).mean(axis=0))
                    rows.extend(batch.indices)
        return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), rows

    def predict_table(self, scores: Scores, image_ids: Sequence[str], patient_ids: pd.Series | None = None) -> pd.DataFrame:
        """The documented prediction table: one row per image, in PREDICTION_COLUMNS order,
        plus `risk_spread` and `unsure` for an ensemble, and patient-context columns when
        patient ids are given."""
        return prediction_table(scores, image_ids, patient_ids, self.bundle)

    def predict_images(self, images: Sequence[bytes], metadata: pd.DataFrame) -> tuple[pd.DataFrame, Scores, np.ndarray]:
        """Score encoded images (the API's path). `metadata` has one row per image with
        age, sex, site (schema vocabulary) and optionally patient_id, patient_images and
        image_id. Raises ImageError naming the first unreadable (or blank) image. Returns the
        prediction table, the raw Scores, and the model-input squares (N, S, S, 3) uint8
        on which the heat maps lie."""
        prepared = self.prepare_images(images, metadata)
        table, scores = self.predict_prepared(prepared)
        return table, scores, prepared.squares

    def prepare_images(self, images: Sequence[bytes], metadata: pd.DataFrame) -> PreparedImages:
        """`predict_images`' first half: decode, measure and encode (ImageError naming the first
        unreadable or blank image), no model run yet."""
        prep = self.bundle.preprocessing
        quality = no_quality(len(images))
        squares = np.stack([load_square(data, prep, f"image {i + 1}", quality[i]) for i, data in enumerate(images)])
        frame = metadata.reset_index(drop=True).copy()
        for column in ("age", "sex", "site", "patient_id"):
            if column not in frame.columns:
                frame[column] = None
        frame["image_id"] = frame["image_id"] if "image_id" in frame.columns else [f"image {i + 1}" for i in range(len(frame))]
        inputs = np.stack([prep.normalise(s) for s in squares])
        return PreparedImages(inputs, encode_metadata(frame, self.bundle.metadata_features), quality, squares, frame)

    def predict_prepared(self, prepared: PreparedImages) -> tuple[pd.DataFrame, Scores]:
        """`predict_images`' second half: the model, the gate and the prediction table."""
        scores = self.score(prepared.inputs, prepared.metadata, prepared.quality)
        frame = prepared.frame
        has_patients = frame["patient_id"].notna().any()
        return self.predict_table(scores, frame["image_id"], frame["patient_id"] if has_patients else None), scores

    def predict_records(
        self, records: pd.DataFrame, batch_size: int = 32, progress: bool = True, cache: ScoreCache | None = None
    ) -> tuple[pd.DataFrame, dict[str, str]]:
        """Score every record (schema columns; image_ref required). Returns the prediction
        table (in record order) and {image_id: error} for images that could not be read.
        With a `cache`, images scored before (same content, same metadata) are not scored again."""
        records = records.reset_index(drop=True)
        metadata = encode_metadata(records, self.bundle.metadata_features)
        refs = records["image_ref"].tolist()
        keys, held = cache.read(refs, metadata) if cache else ([], [None] * len(refs))
        parts: list[tuple[list[int], Scores]] = []
        found = cache.get(keys) if cache else {}
        if found:
            rows = sorted(found)
            parts.append((rows, Scores(*(np.stack([found[r][f] for r in rows]) for f in range(len(fields(Scores)))))))
        todo = [i for i in range(len(refs)) if i not in found]
        items = [refs[i] if held[i] is None else held[i] for i in todo]  # a file hashed for the cache is not read again
        del held
        errors: dict[str, str] = {}

        def finish(rows: list[int], scoring: Future) -> None:
            scores = scoring.result()
            parts.append((rows, scores))
            if cache:
                cache.put([keys[r] for r in rows], *(getattr(scores, f.name) for f in fields(Scores)))

        # Two batches are scored at once, so that the session's streams get the next batch's
        # runs while the last runs of this one finish (a core would otherwise idle there).
        with Progress(disable=not progress or not todo, transient=True) as bar, ThreadPoolExecutor(2) as scorers:
            task = bar.add_task(f"scoring {len(todo)} images", total=len(todo))
            batches = iter_batches(
                items, self.bundle.preprocessing, batch_size, on_item=lambda: bar.advance(task),
                views=self.bundle.views, measure=True, item_names=[str(refs[i]) for i in todo],
            )
            in_flight: deque[tuple[list[int], Future]] = deque()
            for batch in batches:
                errors.update({records["image_id"][todo[i]]: e for i, e in batch.errors.items()})
                if batch.indices:
                    rows = [todo[i] for i in batch.indices]
                    in_flight.append((rows, scorers.submit(self.score_views, batch.images, metadata[rows], batch.quality)))
                if len(in_flight) == 2:
                    finish(*in_flight.popleft())
            while in_flight:
                finish(*in_flight.popleft())
        rows = [i for indices, _ in parts for i in indices]
        if not rows:
            return pd.DataFrame(columns=list(PREDICTION_COLUMNS)), errors
        scores = Scores(*(np.concatenate([getattr(s, f.name) for _, s in parts]) for f in fields(Scores)))
        order = np.argsort(rows, kind="stable")
        scores = Scores(*(getattr(scores, f.name)[order] for f in fields(Scores)))
        scored = records.iloc[np.asarray(rows)[order]].reset_index(drop=True)
        has_patients = scored["patient_id"].notna().any()
        return self.predict_table(scores, scored["image_id"], scored["patient_id"] if has_patients else None), errors
