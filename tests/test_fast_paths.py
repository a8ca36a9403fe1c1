"""The fast inference paths compute exactly what the plain ones do: the static-padding graph,
batches filled (with their test-time views) by the decode threads, ONNX runs split over
single-threaded streams, the eigen-decomposition OOD gate. Correctness only; speed is bench/run.py's job."""

from __future__ import annotations

import numpy as np
import pandas as pd
import onnx
import onnxruntime as ort
import pytest
from scipy.special import softmax

from dermsight.allocator import tune_for_torch
from dermsight.imaging.batches import iter_batches, load_square
from dermsight.imaging.decode import read_image_bytes
from dermsight.imaging.preprocess import Preprocessing, views
from dermsight.inference.ood import BlockGate, _fit_block
from dermsight.inference.onnx_session import ParallelSession, optimised_model_path
from dermsight.models.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(trained_bundle):
    return load_bundle(trained_bundle)


@pytest.fixture(scope="module")
def images(shared) -> list[str]:
    return sorted(str(p) for p in (shared / "isic2020" / "test_128").glob("*.jpg"))[:37]


def test_static_padding_graph_is_the_same_function(bundle, tmp_path, monkeypatch):
    """On a float graph of the bundle's architecture (an int8 bundle's graph was folded before it
    was quantized; an ensemble bundle ships no float weights, so ImageNet ones stand in)."""
    from dermsight.models.network import DermSightNet, export_onnx

    monkeypatch.setenv("DERMSIGHT_CACHE", str(tmp_path))
    graph = tmp_path / "float.onnx"
    net = DermSightNet.create(bundle.backbone, len(bundle.metadata_features), len(bundle.classes)).eval()
    export_onnx(net, graph, bundle.preprocessing.size)
    path = optimised_model_path(graph)
    assert any(n.op_type == "Shape" for n in onnx.load(str(graph)).graph.node)  # TF "same" padding, computed at run time
    assert path != graph and path.parent == tmp_path / "onnx"
    assert not any(n.op_type == "Shape" for n in onnx.load(str(path)).graph.node)
    assert optimised_model_path(graph) == path  # cached: the second start reuses it
    rng = np.random.default_rng(0)
    size = bundle.preprocessing.size
    feeds = {"image": rng.standard_normal((3, 3, size, size)).astype(np.float32),
             "metadata": rng.standard_normal((3, len(bundle.metadata_features))).astype(np.float32)}
    plain = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feeds)
    fast = ParallelSession(graph).run(None, feeds)
    for a, b in zip(plain, fast):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_parallel_session_split_runs_and_concurrent_callers_get_their_own_numbers(bundle):
    """Rows split into single-row runs over two streams give the outputs of one run over all
    rows, in order; callers on many threads at once each get the outputs of their own input."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    size, width = bundle.preprocessing.size, len(bundle.metadata_features)
    inputs = [{"image": rng.standard_normal((5, 3, size, size)).astype(np.float32),
               "metadata": rng.standard_normal((5, width)).astype(np.float32)} for _ in range(6)]
    names = ["logits", "embedding", "cam"]
    whole = ParallelSession(bundle.onnx_path, streams=1, rows=64)
    expected = [whole.run(names, feeds) for feeds in inputs]
    split = ParallelSession(bundle.onnx_path, streams=2, rows=1)
    assert whole.session.get_session_options().intra_op_num_threads == 1
    for got, want in zip(split.run(names, inputs[0]), expected[0]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with ThreadPoolExecutor(6) as callers:
        results = list(callers.map(lambda feeds: split.run(names, feeds), inputs))
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_batches_carry_every_view_exactly_and_report_unreadable_items(images):
    prep = Preprocessing(size=96)
    items = [*images[:5], "/no/such/image.jpg", *images[5:]]
    names = ("identity", "hflip", "rot180")
    seen, errors = [], {}
    for batch in iter_batches(items, prep, batch_size=16, views=names):
        assert batch.images.shape == (3, len(batch.indices), 3, 96, 96)
        squares = [load_square(read_image_bytes(items[i]), prep, items[i]) for i in batch.indices]
        expected = np.stack([prep.normalise(square) for square in squares])
        np.testing.assert_array_equal(batch.images, views(expected, names))
        seen += batch.indices
        assert not set(batch.errors) & set(errors)  # each unreadable item reported once
        errors.update(batch.errors)
    assert seen == [i for i in range(len(items)) if i != 5]
    assert errors == {5: "/no/such/image.jpg: cannot read file (No such file or directory)"}
    plain = np.concatenate([b.images for b in iter_batches(images, prep, batch_size=16)])
    assert plain.shape == (len(images), 3, 96, 96)


def test_ood_subspace_matches_the_svd_one():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((400, 30)) @ rng.standard_normal((30, 120)) + 0.1 * rng.standard_normal((400, 120))
    data = data.astype(np.float32)
    fast = _fit_block(data, 16)
    _, _, vt = np.linalg.svd(data - data.mean(axis=0), full_matrices=False)
    from sklearn.covariance import LedoitWolf

    centred = data - data.mean(axis=0)
    reference = BlockGate(data.mean(axis=0), vt[:16], LedoitWolf().fit(centred @ vt[:16].T).precision_)
    np.testing.assert_allclose(fast.distance(data[:50]), reference.distance(data[:50]), rtol=1e-3)


def test_allocator_tuning_reports_what_it_did(monkeypatch):
    monkeypatch.setenv("DERMSIGHT_NO_ALLOCATOR_TUNING", "1")
    assert tune_for_torch() == "disabled"
    monkeypatch.delenv("DERMSIGHT_NO_ALLOCATOR_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100000000000")
    assert tune_for_torch() == "environment"


def test_int8_bundle_gives_the_numbers_it_was_validated_with_on_every_x86_cpu(images):
    """The shipped int8 ensemble, run as the Predictor runs it, against the same graph with its
    quantize/dequantize steps emulated in float (the exact arithmetic the bundle's threshold was
    set on). On an AVX2 CPU without VNNI, ONNX Runtime's default U8S8 kernel saturates 16-bit
    sums and moved risks by up to 0.25 (median 0.02); `session.x64quantprecision` keeps them
    within float rounding (at most 0.006 on 300 shared images, 0.0014 on these 24, against 0.031
    without it on an AMD EPYC). On a VNNI CPU both agree anyway."""
    from dermsight.inference.onnx_session import session_options
    from dermsight.inference.predictor import Predictor
    from dermsight.models.bundle import DEFAULT_BUNDLE

    predictor = Predictor(DEFAULT_BUNDLE)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(predictor.bundle.onnx_path)).graph.node)
    frame = pd.DataFrame({"age": [55.0] * 24, "sex": ["female"] * 24, "site": ["torso"] * 24})
    prepared = predictor.prepare_images([read_image_bytes(path) for path in images[:24]], frame)
    shipped = predictor.score(prepared.inputs, prepared.metadata, prepared.quality)
    emulated_options = session_options()
    emulated_options.add_session_config_entry("session.disable_quant_qdq", "1")
    emulated = ort.InferenceSession(str(optimised_model_path(predictor.bundle.onnx_path)), emulated_options,
                                    providers=["CPUExecutionProvider"])
    stacked = views(prepared.inputs, tuple(predictor.bundle.views))
    n_views = len(predictor.bundle.views)
    logits = emulated.run(["logits"], {"image": stacked.reshape(-1, *prepared.inputs.shape[1:]),
                                       "metadata": np.tile(prepared.metadata.astype(np.float32), (n_views, 1))})[0]
    mean_logits = logits.reshape(n_views, len(prepared.inputs), -1).mean(axis=0)
    exact = softmax(mean_logits / predictor.bundle.temperature, axis=1)[:, predictor.classes.index("MEL")]
    assert np.abs(shipped.probabilities[:, predictor.classes.index("MEL")] - exact).max() < 0.01
