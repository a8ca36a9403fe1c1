"""Combine sources into one deduplicated table with patient/lesion-grouped folds, and
save or load it as a manifest (``manifest.csv`` + ``manifest.json``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dermsight.data import harmonise
from dermsight.data.records import Loaded, SourceError
from dermsight.data.schema import RECORD_COLUMNS, Problem, as_records
from dermsight.data.sources import read_source

MANIFEST_KEYS: tuple[str, ...] = ("image_id", "image_ref", "source")  # the columns that mark a CSV as a manifest


def load_sources(specs: Iterable[str]) -> Loaded:
    """Read every source; a source that cannot be read at all becomes a problem."""
    combined = Loaded()
    for spec in specs:
        try:
            combined.extend(read_source(spec))
        except SourceError as err:
            # SourceError messages start with the path; `where` already names the source.
            message = str(err).removeprefix(f"{spec}: ").removeprefix(f"{spec.partition(':')[2]}: ")
            combined.problems.append(Problem("unreadable_source", spec, message, skipped=True))
    return combined


def deduplicate(loaded: Loaded) -> Loaded:
    """One record per image id. Copies are merged (the first with an image file wins;
    empty fields are filled from the others). When copies disagree on the diagnosis,
    the majority label is kept; a tie drops every copy, since no label can be trusted."""
    records = loaded.records
    problems = list(loaded.problems)
    if records.empty:
        return Loaded(records, problems)
    records = records.assign(_has_image=records["image_ref"].notna(), _order=np.arange(len(records)))
    records = records.sort_values(["image_id", "_has_image", "_order"], ascending=[True, False, True])
    dup_mask = records["image_id"].duplicated(keep=False)
    merged_rows = []
    for image_id, copies in records[dup_mask].groupby("image_id", sort=False):
        sources = ", ".join(copies["source"])
        label, complaint = _agreed_diagnosis(copies)
        if complaint:
            problems.append(Problem("conflicting_labels", image_id, f"copies ({sources}) {complaint}", label is None))
        if label is None and complaint:
            continue
        merged = copies.bfill().iloc[0].copy()
        if label is not None:  # unlabelled copies (e.g. one test image in two sources) stay unlabelled
            merged["diagnosis"], merged["melanoma"] = label, harmonise.melanoma_from(label)
        merged_rows.append(merged)
        problems.append(Problem("duplicate", image_id, f"{len(copies)} copies ({sources}) merged into one"))
    merged = pd.DataFrame(merged_rows) if merged_rows else records.iloc[:0]
    out = pd.concat([records[~dup_mask], merged]).sort_values("_order")
    return Loaded(as_records(out), problems)


def _agreed_diagnosis(copies: pd.DataFrame) -> tuple[str | None, str | None]:
    """The diagnosis the copies support, and a complaint when they disagreed.

    HAM10000's "akiec" covers actinic keratosis and intraepithelial carcinoma (Bowen's
    disease, an SCC in situ); ISIC 2019 relabelled the latter SCC, so an SCC copy
    refines an akiec copy rather than contradicting it."""
    labels = [
        "SCC" if code == "AK" and original == "akiec" and "SCC" in set(copies["diagnosis"]) else code
        for code, original in zip(copies["diagnosis"], copies["original_label"])
        if code is not None
    ]
    if not labels:
        return None, None if copies["diagnosis"].isna().all() else "have no usable label"
    votes = Counter(labels).most_common()
    if len(votes) == 1:
        return votes[0][0], None
    summary = ", ".join(f"{code} x{n}" for code, n in votes)
    if votes[0][1] == votes[1][1]:
        return None, f"disagree on the diagnosis ({summary}), a tie"
    return votes[0][0], f"disagree on the diagnosis ({summary}); majority {votes[0][0]} kept"


def group_ids(records: pd.DataFrame) -> np.ndarray:
    """A group number per record such that images sharing a patient or a lesion share a
    group (connected components of the image-patient-lesion graph)."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in ("patient_id", "lesion_id"):
        first_seen: dict[str, int] = {}
        for i, key in enumerate(records[column]):
            if key is None or (isinstance(key, float) and np.isnan(key)):
                continue
            if key in first_seen:
                parent[find(i)] = find(first_seen[key])
            else:
                first_seen[key] = i
    roots = [find(i) for i in range(len(records))]
    return pd.factorize(pd.Series(roots))[0]


def assign_folds(records: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Add `group` and `fold` columns: label-stratified k folds in which no patient or
    lesion ever appears in two folds. Deterministic for a given table and seed."""
    from sklearn.model_selection import StratifiedGroupKFold  # imported here: 1.5 s, only folds need it

    groups = group_ids(records)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise SourceError(f"only {n_groups} patient/lesion groups: cannot make {n_folds} grouped folds")
    labels = records["diagnosis"].fillna("unlabelled").to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(records), -1, dtype=int)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        folds[held_out] = fold
    return records.assign(group=groups, fold=folds)


def assign_source_folds(records: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Leave-one-source-out folds: the largest source (HAM10000 in the shared data) in
    grouped, label-stratified folds as :func:`assign_folds` makes them, and every other
    source, whole, added to one fold of its own (the k-th smaller source to fold k). A
    network trained without fold k has then never seen an image of that source: its
    predictions there are what a clinic with another dermatoscope gets. Sources are ranked
    by their labelled images; a source without any (ISIC 2019's labels alone) claims no
    fold, its rows spread over the folds by group."""
    trainable = records["image_ref"].notna() & records["diagnosis"].notna()
    sources = records.loc[trainable, "source"].value_counts()
    largest, others = sources.index[0], sorted(sources.index[1:])
    main = records["source"] == largest
    if len(others) > n_folds:
        raise SourceError(f"{len(others)} sources besides {largest} need at least as many folds; got {n_folds}")
    folded = assign_folds(records[main], n_folds, seed)
    groups = group_ids(records)
    out = records.assign(group=groups, fold=groups % n_folds)
    out.loc[main, "fold"] = folded["fold"].to_numpy()
    for fold, source in enumerate(others):
        out.loc[records["source"] == source, "fold"] = fold
    # A row without a usable image follows the images of its group (a label-only ISIC 2019 row
    # that shares a lesion with an archive image); a patient or lesion with images in two
    # sources (none in the shared data) goes where its first image went.
    with_image = out[trainable]
    group_fold = with_image.groupby("group")["fold"].first()
    out["fold"] = out["group"].map(group_fold).fillna(out["fold"]).astype(int)
    return out


def build_dataset(specs: Iterable[str], n_folds: int = 5, seed: int = 0, by_source: bool = False) -> Loaded:
    """Read, deduplicate and fold (`by_source`: leave-one-source-out folds, see
    :func:`assign_source_folds`): the table every training and evaluation run starts from."""
    loaded = deduplicate(load_sources(specs))
    if not loaded.records.empty:
        fold = assign_source_folds if by_source else assign_folds
        loaded.records = fold(loaded.records, n_folds, seed)
    return loaded


def save_manifest(loaded: Loaded, path: Path, *, sources: list[str], n_folds: int, seed: int) -> None:
    """Write ``<path>`` (CSV, one row per image) and ``<path>.json`` (how it was made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loaded.records.to_csv(path, index=False)
    info = {
        "sources": sources,
        "n_folds": n_folds,
        "seed": seed,
        "n_records": int(len(loaded.records)),
        "problems": [vars(p) for p in loaded.problems],
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))


def is_manifest(path: Path, labelled: bool = False) -> bool:
    """Whether the CSV at `path` has a manifest's key columns (and `diagnosis` when `labelled`);
    False for a file pandas cannot read as CSV."""
    needed = {*MANIFEST_KEYS, *(("diagnosis",) if labelled else ())}
    try:
        return needed <= set(pd.read_csv(path, nrows=0).columns)
    except (ValueError, UnicodeDecodeError):
        return False


def load_labelled(specs: Iterable[str]) -> Loaded:
    """Records from dataset sources or labelled manifest CSVs, deduplicated by image id."""
    loaded = Loaded()
    for spec in specs:
        path = Path(spec)
        if path.is_file() and path.suffix.lower() == ".csv" and is_manifest(path, labelled=True):
            loaded.extend(Loaded(load_manifest(path), []))
        else:
            loaded.extend(load_sources([spec]))
    return deduplicate(loaded)


def image_refs(specs: Iterable[str]) -> dict[str, str]:
    """image_id -> absolute image path over the readable ones of `specs` (the first source naming
    an image wins); sources that cannot be read are skipped."""
    found: dict[str, str] = {}
    for spec in specs:
        try:
            records = load_sources([spec]).records
        except (OSError, ValueError):
            continue
        with_image = records[records["image_ref"].notna()]
        found.update({k: str(Path(v).resolve()) for k, v in zip(with_image["image_id"], with_image["image_ref"]) if k not in found})
    return found


def load_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by :func:`save_manifest`, with schema dtypes."""
    frame = pd.read_csv(path, dtype={c: str for c in RECORD_COLUMNS if c not in ("age", "melanoma")})
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: not a DermSight manifest (missing {', '.join(missing)})")
    extra = frame[[c for c in frame.columns if c not in RECORD_COLUMNS]]
    return pd.concat([as_records(frame), extra], axis=1)
