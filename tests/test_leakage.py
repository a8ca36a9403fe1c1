"""No patient and no lesion on both sides of a split, checked from the raw patient and lesion
ids (never from the computed `group` column, which a grouping bug would corrupt as well), on
records that carry both ids, with chains of them and patients whose images span sources.

The shared datasets have no record with both a patient and a lesion id (HAM10000 has lesions,
ISIC 2020 patients), so these records are built: their ids are what such data links."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dermsight.data.dataset import assign_folds, assign_source_folds, group_ids
from dermsight.data.records import SourceError
from dermsight.data.schema import as_records

ID_COLUMNS = ("patient_id", "lesion_id")


def linked_records(n: int, seed: int, *, sources: tuple[str, ...] = ("main",), none_share: float = 0.5) -> pd.DataFrame:
    """`n` records whose patient ids (n/2 values) and lesion ids (n/2 values) are each missing
    for `none_share` of them: many small groups joined by chains of both ids."""
    rng = np.random.default_rng(seed)

    def ids(prefix: str) -> list[str | None]:
        return [None if rng.random() < none_share else f"{prefix}{k}" for k in rng.integers(0, n // 2, n)]

    return as_records(pd.DataFrame({
        "image_id": [f"ISIC_{i:07d}" for i in range(n)],
        "image_ref": [f"/images/{i}.jpg" for i in range(n)],
        "patient_id": ids("IP_"),
        "lesion_id": ids("IL_"),
        "diagnosis": rng.choice(["NV", "MEL", "BKL"], n, p=[0.6, 0.25, 0.15]),
        "source": rng.choice(sources, n),
    }))


def components(records: pd.DataFrame) -> np.ndarray:
    """The groups by another route: connected components (scipy) of the graph joining each row
    to its patient id and its lesion id, numbered in order of first appearance."""
    n, nodes, rows, columns = len(records), {}, [], []
    for column in ID_COLUMNS:
        for row, key in enumerate(records[column]):
            if key is not None:
                rows.append(row)
                columns.append(n + nodes.setdefault((column, key), len(nodes)))
    size = n + len(nodes)
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(size, size))
    return pd.factorize(connected_components(graph, directed=False)[1][:n])[0]


def assert_no_id_in_two_folds(folded: pd.DataFrame) -> None:
    for column in ID_COLUMNS:
        folds = folded.dropna(subset=[column]).groupby(column)["fold"].nunique()
        split = folds[folds > 1]
        assert split.empty, f"{len(split)} {column}s in two folds, e.g. {split.index[:3].tolist()}"


def test_a_row_with_both_ids_joins_its_patients_group_to_its_lesions_group():
    """The rows P1/L1, P2/L2, P2/L1: the third row links patient P2 to lesion L1, so all three
    are one group (re-linking the row alone, not its group, splits P2: groups 0, 1, 0)."""
    records = pd.DataFrame({"patient_id": ["P1", "P2", "P2"], "lesion_id": ["L1", "L2", "L1"]})
    assert group_ids(records).tolist() == [0, 0, 0]


def test_a_chain_of_patients_and_lesions_is_one_group():
    """P1-L1-P2-L2-P3-L3-P4, each link made by a later row than the one it joins, and a row
    with neither id on its own."""
    records = pd.DataFrame({
        "patient_id": ["P1", "P2", "P3", "P4", "P2", "P3", "P4", None, "P9"],
        "lesion_id": ["L1", "L2", "L3", "L4", "L1", "L2", "L3", None, None],
    })
    assert group_ids(records).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2]


@pytest.mark.parametrize("seed", range(3))
def test_groups_are_exactly_the_connected_patients_and_lesions(seed):
    """600 records with both ids, chains among them: the groups are the connected components
    of the patient/lesion graph, no more split and no more merged."""
    records = linked_records(600, seed, none_share=0.4)
    expected = components(records)
    assert 100 < expected.max() + 1 < 500 and np.bincount(expected).max() >= 10  # chains, not all singletons
    assert group_ids(records).tolist() == expected.tolist()


def test_grouped_folds_never_split_a_patient_or_a_lesion():
    records = linked_records(400, seed=0)
    folded = assign_folds(records, n_folds=5, seed=0)
    assert set(folded["fold"]) == {0, 1, 2, 3, 4}
    assert_no_id_in_two_folds(folded)


def test_source_folds_keep_a_patient_spanning_sources_in_one_fold():
    """Leave-one-source-out folds on records whose patients and lesions span three sources
    (and label-only rows without an image): every patient and lesion still sits in one fold,
    read from the raw ids."""
    records = linked_records(400, seed=1, sources=("main", "main", "main", "clinic_a", "clinic_b"))
    records.loc[records.index[::25], "image_ref"] = None  # label-only rows follow their group's images
    spanning = records.dropna(subset=["patient_id"]).groupby("patient_id")["source"].nunique()
    assert (spanning > 1).sum() >= 10
    folded = assign_source_folds(records, n_folds=4, seed=0)
    assert set(folded["fold"]) == {0, 1, 2, 3}
    assert_no_id_in_two_folds(folded)
    # a smaller source stays held out: its images not linked to another source's all sit in its fold
    for fold, source in enumerate(("clinic_a", "clinic_b")):
        alone = folded["source"] == source
        linked = folded["group"].isin(folded.loc[~alone, "group"])
        assert (folded.loc[alone & ~linked, "fold"] == fold).all()


def test_source_folds_split_the_largest_source_and_hold_out_each_other_source():
    """The largest source spread over every fold by the seed, each smaller source's own images in
    a fold of its own, integer folds; more smaller sources than folds is a clear error."""
    records = linked_records(400, seed=2, sources=("main", "main", "main", "clinic_a", "clinic_b"), none_share=0.8)
    folded = assign_source_folds(records, n_folds=2, seed=0)
    assert folded["fold"].dtype == np.int64 and set(folded["fold"]) == {0, 1}
    main = folded["source"] == "main"
    assert folded.loc[main, "fold"].value_counts(normalize=True).between(0.35, 0.65).all()
    for fold, source in enumerate(("clinic_a", "clinic_b")):
        own = folded["source"] == source
        alone = own & ~folded["group"].isin(folded.loc[~own, "group"])
        assert alone.sum() > 20 and (folded.loc[alone, "fold"] == fold).all()
    assert folded.equals(assign_source_folds(records, n_folds=2, seed=0))
    assert not folded["fold"].equals(assign_source_folds(records, n_folds=2, seed=1)["fold"])
    with pytest.raises(SourceError, match="2 sources besides main need at least as many folds; got 1"):
        assign_source_folds(records, n_folds=1)


def test_a_missing_id_never_joins_records():
    """NaN (what pandas reads for an empty cell) is no id: rows missing a patient or lesion id
    are not joined through it, whether or not the NaNs are one object."""
    records = pd.DataFrame({"patient_id": [np.nan, np.nan, "P1", float("nan")],
                            "lesion_id": [None, np.nan, None, float("nan")]}, dtype=object)
    assert group_ids(records).tolist() == [0, 1, 2, 3]


def test_exactly_as_many_groups_as_folds_make_that_many_folds():
    records = linked_records(5, seed=0, none_share=0.0)
    records["patient_id"], records["lesion_id"], records["diagnosis"] = [f"IP_{i}" for i in range(5)], None, "NV"
    folded = assign_folds(records, n_folds=5, seed=0)
    assert sorted(folded["fold"]) == [0, 1, 2, 3, 4]


def test_a_label_only_source_claims_no_fold_and_its_rows_follow_their_groups():
    """A source of labels without images (ISIC 2019's labels alone) is no held-out source: with
    two smaller sources and two folds it is no third one. Its rows sharing a lesion with an
    image sit in that image's fold; rows whose group has no image spread by group number."""
    records = linked_records(200, seed=3, sources=("main", "main", "clinic_a", "clinic_b"), none_share=0.9)
    records["lesion_id"] = [f"IL_{i}" for i in range(len(records))]
    labels_only = as_records(pd.DataFrame({
        "image_id": [f"ISIC_9{i:06d}" for i in range(6)],
        "lesion_id": ["IL_0", "IL_1", "IL_2", "IL_3", "IL_NONE_1", "IL_NONE_2"],
        "diagnosis": ["NV", "MEL", "NV", "BKL", "MEL", "NV"],
        "source": "isic2019",
    }))
    folded = assign_source_folds(pd.concat([records, labels_only], ignore_index=True), n_folds=2, seed=0)
    assert folded["fold"].dtype == np.int64
    assert_no_id_in_two_folds(folded)
    rows = folded[folded["source"] == "isic2019"].set_index("lesion_id")
    imaged = folded.iloc[:4].set_index("lesion_id")["fold"]
    assert rows.loc[imaged.index, "fold"].tolist() == imaged.tolist()
    lone = rows.loc[["IL_NONE_1", "IL_NONE_2"]]
    assert lone["fold"].tolist() == (lone["group"] % 2).tolist()
    assert lone["group"].nunique() == 2
