"""One pass answers every span: fits solved from the joint moments that ``stats`` saves, without
reading the activations again (issue 14)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store.cli import main
from rba_store.solve import FitOptions, fit_spans
from rba_store.stats import run_stats
from rba_store.store import Store

SPANS = ((1, 3), (2, 5), (4, 6), (7, 12), (11, 12))  # h0 spans a few directions only: no lstsq


def _rows(store: Path, k: int) -> np.ndarray:
    h = zarr.open_group(str(store), mode="r", use_consolidated=False)[f"h{k}"][:]
    return h.reshape(-1, h.shape[-1]).astype(np.float64)


def _reference(x: np.ndarray, y: np.ndarray, bias: bool, ridge: float) -> np.ndarray:
    """float64 least squares on the rows in memory (ridge as rba-store scales it)."""
    if bias:
        x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    if ridge:
        mu = ridge * np.trace(x.T @ x) / x.shape[1]
        x = np.vstack([x, np.sqrt(mu) * np.eye(x.shape[1])])
        y = np.vstack([y, np.zeros((x.shape[1], y.shape[1]))])
    return np.linalg.lstsq(x, y, rcond=None)[0]


@pytest.fixture
def moments_store(tmp_path: Path, small_store: Path) -> tuple[Path, dict[int, np.ndarray]]:
    """A copy of the small store with saved statistics, its h arrays then moved away."""
    store = Path(shutil.copytree(small_store, tmp_path / "m.zarr"))
    rows = {k: _rows(store, k) for k in range(13)}
    run_stats(store)
    away = tmp_path / "away"
    away.mkdir()
    for k in range(13):
        shutil.move(str(store / f"h{k}"), str(away / f"h{k}"))
    return store, rows


@pytest.mark.parametrize(
    ("bias", "ridge"), [(False, 0.0), (True, 0.0), (True, 1e-3), (False, 1e-2)]
)
def test_fit_from_moments_equals_lstsq_while_the_activations_are_unreadable(
    moments_store: tuple[Path, dict[int, np.ndarray]], bias: bool, ridge: float
) -> None:
    store, rows = moments_store
    with pytest.raises(KeyError):  # the activations really are gone
        Store.open(store).point(3)
    fits = fit_spans(store, FitOptions(spans=SPANS, bias=bias, ridge=ridge))
    for fit in fits:
        a, b = fit.span
        assert fit.diagnostics["source"]["kind"] == "moments"
        assert fit.diagnostics["source"]["stats"] == "tokens-all"
        reference = _reference(rows[a], rows[b], bias, ridge)
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(fit.solution.t, reference, rtol=0, atol=1e-8 * scale)
        if bias:
            expected_bias = rows[b].mean(axis=0) - rows[a].mean(axis=0) @ fit.solution.t
            np.testing.assert_allclose(fit.solution.bias, expected_bias, atol=1e-8 * scale)


def test_moments_fit_equals_the_streaming_fit_and_falls_back(
    tmp_path: Path, small_store: Path
) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "s.zarr"))
    streamed = fit_spans(store, FitOptions(spans=SPANS, name="streamed"))
    assert all(f.diagnostics["source"]["kind"] == "activations" for f in streamed)
    run_stats(store)
    from_moments = fit_spans(store, FitOptions(spans=SPANS, name="moments"))
    for s, m in zip(streamed, from_moments, strict=True):
        assert m.diagnostics["source"]["kind"] == "moments"
        np.testing.assert_allclose(m.solution.t, s.solution.t, rtol=0, atol=1e-9)
        assert m.diagnostics["rows"] == s.diagnostics["rows"]
        assert m.diagnostics["train"]["relative_mse"] == pytest.approx(
            s.diagnostics["train"]["relative_mse"], rel=1e-9
        )
    # other rows than the statistics cover: streamed, and it says so
    (limited,) = fit_spans(store, FitOptions(spans=((2, 5),), selection=_limit(20), name="l"))
    assert limited.diagnostics["source"]["kind"] == "activations"
    (held,) = fit_spans(store, FitOptions(spans=((2, 5),), holdout=0.2, name="h"))
    assert held.diagnostics["source"]["kind"] == "activations"


def _limit(n: int):
    from rba_store.store import SampleSelection

    return SampleSelection(limit=n)


def test_evaluate_auto_reads_each_activation_array_at_most_once(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "e.zarr"))
    reads: dict[int, set[tuple[int, int]]] = {}
    real = Store.read_points

    def counting(self: Store, points: list[int], start: int, stop: int) -> list[np.ndarray]:
        for k in points:
            assert (start, stop) not in reads.setdefault(k, set()), f"h{k} read twice"
            reads[k].add((start, stop))
        return real(self, points, start, stop)

    monkeypatch.setattr(Store, "read_points", counting)
    assert main(["evaluate", str(store), "--auto", "--max-blocks", "4"]) == 0
    assert sorted(reads) == list(range(13))  # every array read once (the statistics' pass)
    assert all(len(r) == 3 for r in reads.values())  # its 3 shards, once each


@pytest.mark.gpu
def test_statistics_on_cupy_equal_numpy(small_store: Path) -> None:
    from rba_store.solve._backend import gpu_available
    from rba_store.stats import compute_block_stats

    if not gpu_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    on_cpu = compute_block_stats(small_store, backend="numpy")
    on_gpu = compute_block_stats(small_store, backend="cupy")
    assert on_cpu.moments is not None and on_gpu.moments is not None
    scale = float(np.abs(on_cpu.moments.m2).max())
    np.testing.assert_allclose(on_gpu.moments.m2, on_cpu.moments.m2, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(on_gpu.cka, on_cpu.cka, rtol=0, atol=1e-10)
    np.testing.assert_allclose(on_gpu.relative_change, on_cpu.relative_change, rtol=1e-12)


def test_stats_refuse_cupy_without_a_gpu(small_store: Path) -> None:
    from rba_store.errors import UsageError
    from rba_store.solve._backend import gpu_available
    from rba_store.stats import compute_block_stats

    if gpu_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UsageError, match="--backend cupy"):
        compute_block_stats(small_store, backend="cupy")


def _extract(out: Path, *extra: str) -> int:
    args = ["extract", "--out", str(out), "--limit", "50", "--batch-size", "16"]
    return main([*args, "--chunk-samples", "10", "--shard-samples", "20", *extra])


def test_statistics_during_extraction_equal_extract_then_stats(tmp_path: Path) -> None:
    """``extract --stats`` (and ``--no-activations``) give the statistics and maps of
    extract-then-stats within 1e-8."""
    plain, during, only = tmp_path / "plain.zarr", tmp_path / "during.zarr", tmp_path / "only.zarr"
    assert _extract(plain) == 0
    assert _extract(during, "--stats") == 0
    assert _extract(only, "--stats", "--no-activations") == 0
    reference, _ = run_stats(plain)
    for store in (during, only):
        opened = Store.open(store)
        assert opened.list_analyses("stats") == ["tokens-all"]
        streamed, reused = run_stats(opened)  # what 'rba-store stats' finds: reused, not redone
        assert reused and streamed.attrs["computed"] == "during extraction"
        for name in ("br", "relative_change", "cosine", "norm", "span_change"):
            np.testing.assert_allclose(
                getattr(streamed, name), getattr(reference, name), rtol=1e-8, equal_nan=True
            )
        np.testing.assert_allclose(streamed.cka, reference.cka, rtol=0, atol=1e-8, equal_nan=True)
        maps = fit_spans(opened, FitOptions(spans=SPANS, bias=True))
        want = fit_spans(plain, FitOptions(spans=SPANS, bias=True, name=f"ref-{store.stem}"))
        for got, ref in zip(maps, want, strict=True):
            assert got.diagnostics["source"]["kind"] == "moments"
            np.testing.assert_allclose(got.solution.t, ref.solution.t, rtol=0, atol=1e-8)
    opened = Store.open(only)
    assert not opened.holds_activations
    assert not any((only / "h3").rglob("c/*"))  # no activation was written
    assert main(["validate", str(only)]) == 0
    with pytest.raises(Exception, match="holds no activations"):
        fit_spans(opened, FitOptions(spans=((2, 5),), holdout=0.2, name="held"))


def test_no_activations_is_refused_without_stats_or_when_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    assert _extract(out, "--no-activations") == 2
    assert not out.exists()
