"""Does the patient's age, sex and site help rank melanomas at a clinic the networks never saw?

    python bench/metadata_transfer.py [BUNDLE] > bench/metadata_transfer_results.json

The images of bench/tta.py (at most PER_CLASS melanomas and PER_CLASS benign images of each source a fold network
was trained without, and of HAM10000's lesion-grouped CV; each scored by the member network that never saw it, in the
bundle's two views) are scored twice: with the metadata each source records, and with every field missing (what an
upload without age, sex and site gets; the networks trained with 30% of their images shown that way). Per source:
how many images carry each field, melanoma AUC and specificity at the source's own 90%-sensitivity threshold in both
ways, and the gain of leaving the metadata out with its paired bootstrap 95% interval (images resampled within the
source). A source whose AUC rises without its metadata is one where the networks' metadata weights do not transfer.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
from frozen_heads import paired_gain, specificity_at
from sklearn.metrics import roc_auc_score
from tta import member_batches, scored_records

from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.imaging.preprocess import views
from dermsight.inference.predictor import Predictor, softmax
from dermsight.models.metadata import encode_metadata


def member_logits(predictor: Predictor, records: pd.DataFrame, metadata: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{way: (N, K) logits averaged over the bundle's views} from each record's member, one decode per image."""
    names = tuple(predictor.bundle.views)
    out = {way: np.zeros((len(records), len(predictor.classes)), np.float32) for way in metadata}
    for output, session, rows, images in member_batches(predictor, records):
        stacked = views(images, names).reshape(-1, *images.shape[1:])
        for way, encoded in metadata.items():
            logits = session.run([output], {"image": stacked, "metadata": np.tile(encoded[rows], (len(names), 1))})[0]
            out[way][rows] = logits.reshape(len(names), len(rows), -1).mean(axis=0)
    return out


def main(bundle: str) -> dict:
    predictor = Predictor(bundle)
    records = scored_records(predictor, load_out_of_fold(predictor.bundle))
    features = predictor.bundle.metadata_features
    blank = records.assign(age=np.nan, sex=None, site=None)
    metadata = {"with metadata": encode_metadata(records, features).astype(np.float32),
                "without metadata": encode_metadata(blank, features).astype(np.float32)}
    logits = member_logits(predictor, records, metadata)
    mel, temperature = predictor.classes.index("MEL"), predictor.bundle.temperature
    risks = {way: softmax(value / temperature, axis=1)[:, mel] for way, value in logits.items()}
    rng = np.random.default_rng(0)
    per_source = []
    for source, rows in sorted(records.groupby("source").indices.items(), key=lambda item: (item[0] == "ham10000", item[0])):
        part = records.iloc[rows]
        y = (part["diagnosis"] == "MEL").to_numpy().astype(int)
        entry = {"source": source, "held_out": "grouped_cv" if source == "ham10000" else "left_out_source",
                 "images": int(len(rows)), "melanomas": int(y.sum()),
                 "share_with_field": {f: round(float(part[f].notna().mean()), 3) for f in ("age", "sex", "site")}}
        for way, risk in risks.items():
            entry[way] = {"auc": round(float(roc_auc_score(y, risk[rows])), 4),
                          "specificity_at_90": specificity_at(y, risk[rows])}
        entry["auc_gain_without_metadata_ci95"] = paired_gain(y, risks["with metadata"][rows], risks["without metadata"][rows], rng)
        per_source.append(entry)
    return {"bundle": predictor.bundle.name, "load_average": open("/proc/loadavg").read().split()[:3], "per_source": per_source}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", default="bundles/default", help="Bundle directory (default: bundles/default).")
    print(json.dumps(main(parser.parse_args().bundle), indent=1))
