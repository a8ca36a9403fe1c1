"""Combining sources: deduplication by ISIC id, patient/lesion-grouped folds, manifests."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import combine
from dermsight.data.dataset import (
    assign_folds,
    assign_source_folds,
    build_dataset,
    deduplicate,
    group_ids,
    load_manifest,
    load_sources,
    save_manifest,
)
from dermsight.data.records import Loaded, SourceError
from dermsight.data.schema import RECORD_COLUMNS, as_records


@pytest.fixture(scope="module")
def ham_isic9(ham, isic9):
    return deduplicate(combine(ham, isic9))


def test_ham10000_and_isic9_share_1381_images(ham, isic9):
    assert len(set(ham.records["image_id"]) & set(isic9.records["image_id"])) == 1_381


def test_deduplicate_ham10000_and_isic9(ham, isic9, ham_isic9):
    ham_ids, isic9_ids = set(ham.records["image_id"]), set(isic9.records["image_id"])
    shared_ids = ham_ids & isic9_ids
    records = ham_isic9.records
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert records["image_id"].is_unique

    merged = {p.where for p in ham_isic9.problems if p.kind == "duplicate"}
    dropped = {p.where for p in ham_isic9.problems if p.kind == "conflicting_labels" and p.skipped}
    assert len(records) == len(ham_ids | isic9_ids) - len(dropped)
    # Every shared image is either merged into one record or (labels tied) dropped.
    assert shared_ids <= merged | dropped and not merged & dropped
    assert len(shared_ids & merged) == 1_367 and len(shared_ids & dropped) == 14
    # The isic9 images filed under two classes (no HAM copy to break the tie) are dropped.
    in_two_folders = set(isic9.records.loc[isic9.records["image_id"].duplicated(), "image_id"])
    assert len(in_two_folders) == 137 and in_two_folders - ham_ids <= dropped

    # A merged record keeps HAM10000's file, lesion and metadata.
    kept = records[records["image_id"].isin(shared_ids)].set_index("image_id")
    assert len(kept) == 1_367
    assert (kept["source"] == "ham10000").all() and kept["lesion_id"].str.startswith("HAM_").all()
    assert kept["image_ref"].str.contains("/ham10000/images/").all()
    ham_by_id = ham.records.set_index("image_id").loc[kept.index]
    assert (kept["age"].fillna(-1) == ham_by_id["age"].fillna(-1)).all()
    assert (kept["site"].fillna("") == ham_by_id["site"].fillna("")).all()
    # Images only in isic9 stay as they were.
    only9 = records[records["image_id"].isin(isic9_ids - ham_ids)]
    assert (only9["source"] == "class_folders").all() and only9["lesion_id"].isna().all()


def test_isic9_scc_refines_ham_akiec(ham, isic9, ham_isic9):
    scc_in_isic9 = set(isic9.records.loc[isic9.records["diagnosis"] == "SCC", "image_id"])
    akiec = set(ham.records.loc[ham.records["original_label"] == "akiec", "image_id"])
    refined = scc_in_isic9 & akiec
    assert len(refined) > 100
    records = ham_isic9.records.set_index("image_id")
    assert set(records.loc[sorted(refined), "diagnosis"]) == {"SCC"}
    assert not {p.where for p in ham_isic9.problems if p.kind == "conflicting_labels"} & refined


@pytest.fixture(scope="module")
def pooled(ham, isic2020):
    """Every 4th HAM10000 lesion (all its images) + the ISIC 2020 images: lesion groups of
    1-6 images and patient groups of 1-240 (sklearn's grouped k-fold is slow on all 16k)."""
    lesions = sorted(ham.records["lesion_id"].unique())[::4]
    return deduplicate(combine(Loaded(ham.records[ham.records["lesion_id"].isin(lesions)], []), isic2020)).records


@pytest.fixture(scope="module")
def folded(pooled):
    return assign_folds(pooled, n_folds=5, seed=0)


def test_folds_keep_patients_and_lesions_together(folded):
    assert set(folded["fold"]) == {0, 1, 2, 3, 4}
    for column in ("patient_id", "lesion_id"):
        keyed = folded.dropna(subset=[column])
        assert keyed[column].nunique() > 500 and keyed.groupby(column).size().max() >= 5
        assert (keyed.groupby(column)["fold"].nunique() == 1).all(), f"a {column} is in two folds"
    sizes = folded["fold"].value_counts(normalize=True)
    assert sizes.between(0.15, 0.25).all()


def test_every_fold_has_melanomas(folded):
    melanomas = folded[folded["melanoma"] == 1].groupby("fold").size()
    assert len(melanomas) == 5 and melanomas.min() >= 40
    # Stratified: every fold holds every class, down to the 29 dermatofibromas.
    assert (folded.groupby("fold")["diagnosis"].nunique() == folded["diagnosis"].nunique()).all()


def test_folds_are_deterministic_for_a_seed(pooled, folded):
    again = assign_folds(pooled, n_folds=5, seed=0)
    assert again["fold"].tolist() == folded["fold"].tolist()
    assert again["group"].tolist() == folded["group"].tolist()
    other = assign_folds(pooled, n_folds=5, seed=1)
    assert (other["fold"] != folded["fold"]).mean() > 0.5


def test_groups_join_patients_and_lesions_transitively():
    records = pd.DataFrame(
        {
            "patient_id": ["IP_1", "IP_2", "IP_2", None, None, "IP_3"],
            "lesion_id": ["IL_1", "IL_1", None, "IL_9", None, None],
        }
    )
    groups = group_ids(records)
    assert groups[0] == groups[1] == groups[2]  # same lesion, then same patient
    assert len({groups[0], groups[3], groups[4], groups[5]}) == 4


def test_too_few_groups_for_the_folds_is_a_clear_error(ham):
    one_lesion = ham.records[ham.records["lesion_id"] == "HAM_0000118"]
    with pytest.raises(SourceError, match="only 1 patient/lesion groups: cannot make 5 grouped folds"):
        assign_folds(one_lesion)


def test_manifest_round_trip(tmp_path, shared):
    sources = [str(shared / "isic9" / "train"), str(shared / "isic2020" / "train_sample.csv")]
    built = build_dataset(sources, n_folds=3, seed=7)
    path = tmp_path / "runs" / "seed-7" / "manifest.csv"  # folders made as needed
    save_manifest(built, path, sources=sources, n_folds=3, seed=7)
    # the folds of the seed given, and leave-one-source-out ones when asked
    unfolded = deduplicate(load_sources(sources)).records
    assert built.records["fold"].tolist() == assign_folds(unfolded, 3, 7)["fold"].tolist()
    by_source = build_dataset(sources, n_folds=3, seed=7, by_source=True).records
    assert by_source["fold"].tolist() == assign_source_folds(unfolded, 3, 7)["fold"].tolist()
    assert set(by_source.loc[by_source["source"] == "isic2020", "fold"]) == {0}

    loaded = load_manifest(path)
    pd.testing.assert_frame_equal(loaded, built.records)
    assert list(loaded.columns) == [*RECORD_COLUMNS, "group", "fold"]
    assert len(loaded) == 2_241 - 2 * 137 + 203  # isic9 images filed under two classes are dropped

    info = json.loads(path.with_suffix(".json").read_text())
    assert (info["sources"], info["n_folds"], info["seed"], info["n_records"]) == (sources, 3, 7, len(loaded))
    assert {p["kind"] for p in info["problems"]} == {"conflicting_labels"}


def test_load_manifest_refuses_other_csvs(shared):
    missing = "image_id, image_ref, lesion_id, age, site, original_label, melanoma, source, patient_images"
    with pytest.raises(SourceError, match=rf"train_sample.csv: not a DermSight manifest \(missing {missing}\)"):
        load_manifest(shared / "isic2020" / "train_sample.csv")


def test_manifest_ids_stay_text(tmp_path):
    """Ids that look like numbers (a clinic's "0012") come back as written, not as 12."""
    records = as_records(pd.DataFrame({"image_id": ["0012", "0013"], "image_ref": ["/a/0012.jpg", "/a/0013.jpg"],
                                       "patient_id": ["007", "007"], "lesion_id": ["0001", None], "source": "clinic"}))
    save_manifest(Loaded(records, []), tmp_path / "manifest.csv", sources=["clinic"], n_folds=2, seed=0)
    loaded = load_manifest(tmp_path / "manifest.csv")
    ids = loaded[["image_id", "patient_id", "lesion_id"]].values.tolist()
    assert ids == [["0012", "007", "0001"], ["0013", "007", None]]
