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
    scale = float(np.abs(on_cpu.moments.blocks).max())
    np.testing.assert_allclose(
        on_gpu.moments.blocks, on_cpu.moments.blocks, rtol=0, atol=1e-10 * scale
    )
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


def _sample_rows(store: Path, k: int, samples: np.ndarray) -> np.ndarray:
    h = zarr.open_group(str(store), mode="r", use_consolidated=False)[f"h{k}"][:][samples]
    return h.reshape(-1, h.shape[-1]).astype(np.float64)


def _heldout_figures(fit) -> dict[str, float]:
    held = fit.diagnostics["heldout"]
    return {
        "relative_mse": held["relative_mse"],
        "r2": held["r2"],
        "identity_relative_mse": held["identity"]["relative_mse"],
        "identity_r2": held["identity"]["r2"],
    }


def test_heldout_error_from_the_heldout_moments_while_the_activations_are_unreadable(
    tmp_path: Path, small_store: Path
) -> None:
    """``stats --holdout F --seed S`` keeps the held-out samples' moments apart: ``fit --holdout
    F --seed S`` then solves from the other rows and reports exact held-out error, reading
    nothing; the same statistics answer a fit of all rows too."""
    from rba_store.store.selection import split_holdout

    store = Path(shutil.copytree(small_store, tmp_path / "h.zarr"))
    streamed_copy = Path(shutil.copytree(small_store, tmp_path / "streamed.zarr"))
    n = Store.open(store).layout.n_samples
    fit_idx, held_idx = split_holdout(np.arange(n), 0.25, 3)
    split_stats, _ = run_stats(store, holdout=0.25, holdout_seed=3)
    plain, _ = run_stats(streamed_copy)
    assert split_stats.attrs["name"] == "tokens-all-holdout0.25-seed3"
    assert split_stats.moments is not None and split_stats.heldout is not None
    tokens = Store.open(store).layout.points[0].n_tokens
    assert split_stats.heldout.n == len(held_idx) * tokens
    assert split_stats.moments.n == len(fit_idx) * tokens
    np.testing.assert_allclose(split_stats.cka, plain.cka, rtol=0, atol=1e-10, equal_nan=True)
    np.testing.assert_allclose(split_stats.br, plain.br, rtol=1e-10)
    for k in range(13):
        shutil.move(str(store / f"h{k}"), str(tmp_path / f"away-h{k}"))

    options = FitOptions(spans=SPANS, bias=True, holdout=0.25, holdout_seed=3)
    fits = fit_spans(store, options)
    streamed = fit_spans(streamed_copy, options)  # plain stats: no split, so it streams
    for fit, ref in zip(fits, streamed, strict=True):
        a, b = fit.span
        assert fit.diagnostics["source"]["kind"] == "moments"
        assert ref.diagnostics["heldout"]["source"]["from"] == "activations"
        assert fit.diagnostics["heldout"]["source"] == {
            "kind": "holdout",
            "fraction": 0.25,
            "samples": len(held_idx),
            "from": "moments",
            "stats": "tokens-all-holdout0.25-seed3",
        }
        x, y = _sample_rows(streamed_copy, a, fit_idx), _sample_rows(streamed_copy, b, fit_idx)
        reference = _reference(x, y, bias=True, ridge=0.0)
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(fit.solution.t, reference, rtol=0, atol=1e-8 * scale)
        got, want = _heldout_figures(fit), _heldout_figures(ref)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-8, abs=1e-12), key
        assert fit.diagnostics["heldout"]["rows"] == len(held_idx) * tokens
        assert fit.diagnostics["heldout"]["cosine"] is None  # per row: not in the moments
    (whole,) = fit_spans(store, FitOptions(spans=((2, 5),), name="all-rows"))
    assert whole.diagnostics["source"]["stats"] == "tokens-all-holdout0.25-seed3"
    x, y = (
        _sample_rows(streamed_copy, 2, np.arange(n)),
        _sample_rows(streamed_copy, 5, np.arange(n)),
    )
    np.testing.assert_allclose(whole.solution.t, _reference(x, y, False, 0.0), atol=1e-8)
    with pytest.raises(KeyError):  # another split: it streams, and the arrays are gone
        fit_spans(store, FitOptions(spans=((2, 5),), holdout=0.25, holdout_seed=4, name="s4"))


def test_eval_store_heldout_error_from_its_saved_moments(tmp_path: Path, small_store: Path) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "fit.zarr"))
    other = Path(shutil.copytree(small_store, tmp_path / "eval.zarr"))
    options = FitOptions(spans=((2, 5), (4, 6)), eval_store=str(other), name="e")
    streamed = fit_spans(store, options)
    run_stats(store)
    run_stats(other)
    moments = fit_spans(store, FitOptions(spans=((2, 5), (4, 6)), eval_store=str(other), name="m"))
    for fit, ref in zip(moments, streamed, strict=True):
        assert fit.diagnostics["heldout"]["source"]["from"] == "moments"
        assert ref.diagnostics["heldout"]["source"]["from"] == "activations"
        got, want = _heldout_figures(fit), _heldout_figures(ref)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-8, abs=1e-12), key


def test_fit_from_option(tmp_path: Path, small_store: Path, capsys: pytest.CaptureFixture) -> None:
    """``--from moments`` never reads the activations (refused when no statistics cover the
    rows); ``--from activations`` always streams them (cosines included)."""
    store = Path(shutil.copytree(small_store, tmp_path / "f.zarr"))
    args = ["fit", str(store), "--span", "2:5", "--holdout", "0.25", "--seed", "3"]
    assert main([*args, "--from", "moments"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--from moments" in err and "--holdout 0.25 --seed 3" in err
    assert Store.open(store).list_analyses("fits") == []
    assert main(["stats", str(store), "--holdout", "0.25", "--seed", "3"]) == 0
    assert "kept apart: 'fit --holdout 0.25 --seed 3'" in capsys.readouterr().out
    assert main([*args, "--from", "moments", "--name", "m"]) == 0
    out = capsys.readouterr().out
    assert "solved from the joint moments saved with stats/tokens-all-holdout0.25-seed3" in out
    assert "cosine —" in out and "from the moments in stats/" in out
    assert main([*args, "--from", "activations", "--name", "a", "--json"]) == 0
    import json

    (streamed,) = json.loads(capsys.readouterr().out)
    assert streamed["source"] == {"kind": "activations"}
    assert streamed["heldout"]["source"]["from"] == "activations"
    assert 0 < streamed["heldout"]["cosine"] <= 1
    assert main(["stats", str(store), "--holdout", "0.25", "--no-cka"]) == 2
    assert "--no-cka" in capsys.readouterr().err


def test_statistics_with_holdout_during_extraction(tmp_path: Path) -> None:
    """``extract --stats --holdout F --holdout-seed S --no-activations``: the held-out moments of
    extract-then-``stats --holdout F --seed S``, and the same fits and held-out error."""
    plain, only = tmp_path / "plain.zarr", tmp_path / "only.zarr"
    assert _extract(plain) == 0
    split = ["--holdout", "0.2", "--holdout-seed", "1"]
    assert _extract(only, "--stats", "--no-activations", *split) == 0
    reference, _ = run_stats(plain, holdout=0.2, holdout_seed=1)
    streamed, reused = run_stats(only, holdout=0.2, holdout_seed=1)
    assert reused and streamed.attrs["computed"] == "during extraction"
    assert streamed.heldout is not None and reference.heldout is not None
    scale = float(np.abs(reference.heldout.blocks).max())
    np.testing.assert_allclose(
        streamed.heldout.blocks, reference.heldout.blocks, atol=1e-10 * scale
    )
    options = FitOptions(spans=SPANS, holdout=0.2, holdout_seed=1)
    for got, want in zip(fit_spans(only, options), fit_spans(plain, options), strict=True):
        assert got.diagnostics["heldout"]["source"]["from"] == "moments"
        np.testing.assert_allclose(got.solution.t, want.solution.t, rtol=0, atol=1e-8)
        assert _heldout_figures(got) == pytest.approx(_heldout_figures(want), rel=1e-8)
    assert _extract(tmp_path / "x.zarr", *split) == 2  # --holdout without --stats
    assert _extract(tmp_path / "y.zarr", "--stats", "--holdout", "1.5") == 2
    assert not (tmp_path / "y.zarr").exists()
