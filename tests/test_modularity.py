"""Modularity curves: exact block-wise k-NN, Q equal to networkx's, the same on every scheduler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask
import numpy as np
import pytest

from rba_store.cli import main
from rba_store.dask_compute import compute
from rba_store.readings.knn import knn_block, knn_brute_force, unit_rows
from rba_store.readings.modularity import (
    MODULARITY,
    ModularityCurve,
    curve_marks,
    knn_graph,
    modularity,
    modularity_spans,
    run_modularity,
    undirected_edges,
)
from rba_store.store import SampleSelection, Store
from tests._readings import labelled_store, stored_labels, stored_vectors
from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def store4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """95 labelled samples in 4 shards (the last ragged), 4 points, 4 classes."""
    return labelled_store(tmp_path_factory.mktemp("modularity") / "four-shards.zarr")


def networkx_q(u: np.ndarray, v: np.ndarray, w: np.ndarray, labels: np.ndarray) -> float:
    nx = pytest.importorskip("networkx")
    graph = nx.Graph()
    graph.add_nodes_from(range(len(labels)))
    graph.add_weighted_edges_from(zip(u.tolist(), v.tolist(), w.tolist(), strict=True))
    communities = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    return float(nx.algorithms.community.modularity(graph, communities, weight="weight"))


@pytest.mark.parametrize("tokens", ["cls", "mean"])
def test_blockwise_knn_of_a_sharded_store_equals_brute_force(store4: Path, tokens: str) -> None:
    store = Store.open(store4)
    assert store.layout.n_shards >= 3
    indices = np.arange(store.layout.n_samples)
    per_point, _ = knn_graph(store, indices, [0, 1, 2, 3], 7, tokens, "numpy", block_rows=16)
    for point, (idx, sim, constant) in enumerate(compute(dask.delayed(list)(per_point))):
        expected_idx, expected_sim = knn_brute_force(stored_vectors(store4, point, tokens), 7)
        assert not constant
        np.testing.assert_array_equal(idx, expected_idx)
        np.testing.assert_allclose(sim, expected_sim, rtol=0, atol=1e-12)


def test_ties_go_to_the_lower_index_whatever_the_tiles() -> None:
    x = np.random.default_rng(1).normal(size=(60, 5))
    x[10:20] = x[3]  # eleven identical rows: cosine 1 between them
    expected = knn_brute_force(x, 6)
    unit = unit_rows(x)
    for tile in (4, 7, 60):
        parts = [
            knn_block(unit, s, min(s + tile, 60), 6, "numpy", tile) for s in range(0, 60, tile)
        ]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), expected[0])


def test_q_equals_networkx_on_the_same_weighted_graph(store4: Path) -> None:
    labels = stored_labels(store4)
    for point in range(4):
        idx, sim = knn_brute_force(stored_vectors(store4, point), 5)
        u, v, w = undirected_edges(idx, sim)
        assert len(w) < 5 * len(labels)  # some pairs are linked both ways: one edge each
        assert abs(modularity(u, v, w, labels) - networkx_q(u, v, w, labels)) < 1e-9
    rng = np.random.default_rng(0)  # any weighted graph and partition, not only k-NN graphs
    u, v = rng.integers(0, 40, 200), rng.integers(0, 40, 200)
    keep = u < v
    keys = np.unique(u[keep] * 40 + v[keep])
    u, v = keys // 40, keys % 40
    w, labels = rng.uniform(0.1, 2.0, len(u)), rng.integers(0, 3, 40)
    assert abs(modularity(u, v, w, labels) - networkx_q(u, v, w, labels)) < 1e-9


def test_curve_rises_is_saved_reused_and_the_json_is_as_specified(
    store4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(store4, store)
    assert main(["modularity", str(store), "--k", "5", "--json", "--plots", str(tmp_path)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {"k", "tokens", "points"} <= payload.keys()
    assert payload["k"] == 5 and payload["tokens"] == "cls"
    assert [p["point"] for p in payload["points"]] == ["h0", "h1", "h2", "h3"]
    assert all(set(p) >= {"point", "modularity"} for p in payload["points"])
    q = [p["modularity"] for p in payload["points"]]
    assert q[-1] > q[0] + 0.1  # classes separate with depth
    assert (tmp_path / "modularity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Store.open(store).has_analysis(MODULARITY, "tokens-cls-k5")
    digest = tree_digest(store)
    assert main(["modularity", str(store), "--k", "5"]) == 0
    assert "reused the saved modularity/tokens-cls-k5" in capsys.readouterr().out
    assert tree_digest(store) == digest


def test_the_same_curve_locally_and_on_a_distributed_cluster(store4: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local, _ = run_modularity(store4, k=6, backend="numpy", save=False, block_rows=32)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        remote, _ = run_modularity(
            store4,
            k=6,
            backend="numpy",
            save=False,
            block_rows=32,
            scheduler=cluster.scheduler_address,
        )
    np.testing.assert_allclose(remote.modularity, local.modularity, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(remote.n_edges, local.n_edges)


@pytest.mark.gpu
def test_the_same_curve_on_cupy(store4: Path) -> None:
    from rba_store.solve._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    on_cpu, _ = run_modularity(store4, k=6, backend="numpy", save=False, block_rows=16)
    on_gpu, _ = run_modularity(store4, k=6, backend="cupy", save=False, block_rows=16)
    np.testing.assert_allclose(on_gpu.modularity, on_cpu.modularity, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(on_gpu.n_edges, on_cpu.n_edges)
    indices = np.arange(95)
    per_point, _ = knn_graph(Store.open(store4), indices, [3], 6, "cls", "cupy", block_rows=16)
    ((idx, sim, _),) = compute(dask.delayed(list)(per_point))
    expected_idx, expected_sim = knn_brute_force(stored_vectors(store4, 3), 6)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sim, expected_sim, rtol=0, atol=1e-10)


def test_limit_points_and_mean_tokens(store4: Path) -> None:
    curve, _ = run_modularity(
        store4,
        k=4,
        tokens="mean",
        selection=SampleSelection(limit=40),
        points="1,-1",
        save=False,
    )
    assert curve.points == [1, 3] and curve.n_samples == 40
    assert curve.attrs["name"] == "tokens-mean-k4-limit40-points1-3"
    idx, sim = knn_brute_force(stored_vectors(store4, 3, "mean")[:40], 4)
    u, v, w = undirected_edges(idx, sim)
    assert curve.modularity[1] == pytest.approx(modularity(u, v, w, stored_labels(store4)[:40]))


def test_plateaus_and_drops_are_marked_and_ranked() -> None:
    q = np.array([np.nan, 0.2, 0.5, 0.505, 0.45, 0.8])
    marks = curve_marks([0, 1, 2, 3, 4, 5], q, plateau=0.02)
    assert [m["kind"] for m in marks] == [None, "rise", "plateau", "drop", "rise"]
    curve = ModularityCurve([0, 1, 2, 3, 4, 5], q, np.zeros(6), 10, {"k": 3, "tokens": "cls"})
    assert [c["span"] for c in curve.candidates()] == [[3, 4], [2, 3]]
    assert [(a, b) for _, a, b in curve.span_gains(2)][:3] == [(3, 4), (2, 4), (2, 3)]


def test_modularity_spans_prefilter_for_select(store4: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(store4, store)
    spans = modularity_spans(store, top=3, max_span=2)
    assert len(spans) == 3 and all(1 <= b - a <= 2 for a, b in spans)
    curve = ModularityCurve.from_dataset(
        Store.open(store).read_analysis(MODULARITY, "tokens-cls-k10")
    )
    gains = {(a, b): g for g, a, b in curve.span_gains(2)}
    assert [gains[s] for s in spans] == sorted(gains.values())[:3]


def test_select_candidates_by_modularity(store4: Path, tmp_path: Path) -> None:
    from rba_store.approx.select import SelectOptions, candidate_spans
    from rba_store.errors import UsageError

    store = tmp_path / "store.zarr"
    shutil.copytree(store4, store)
    options = SelectOptions(candidates=2, candidates_by="modularity", max_span=3)
    assert candidate_spans(Store.open(store), options) == modularity_spans(store, 2, 3)
    with pytest.raises(UsageError, match="--candidates-by modularity ranks --candidates K"):
        SelectOptions(candidates_by="modularity").check(3)
