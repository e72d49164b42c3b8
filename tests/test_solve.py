"""The streaming solver: equal to float64 lstsq in memory, whatever the chunking and merge order."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from rba_store.cli import main
from rba_store.errors import NonFiniteError, UsageError
from rba_store.solve import (
    FitOptions,
    NormalEquations,
    export_safetensors,
    fit_spans,
    load_fit,
    solve,
)
from rba_store.solve._backend import gpu_available, to_numpy
from rba_store.store.selection import SampleSelection
from tests.conftest import tree_digest


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def synthetic(n: int = 997, d_in: int = 24, d_out: int = 16, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) + rng.normal(size=d_in) * 5  # a large mean, as in a ViT
    t_true = rng.normal(size=(d_in, d_out))
    y = x @ t_true + 0.01 * rng.normal(size=(n, d_out)) + 3.0
    return x, y, t_true


def accumulate(x: np.ndarray, y: np.ndarray, bounds: list[int], xp, order=None) -> NormalEquations:  # type: ignore[no-untyped-def]
    parts = [
        NormalEquations.from_chunk(xp.asarray(x[a:b]), xp.asarray(y[a:b]), xp)
        for a, b in itertools.pairwise(bounds)
    ]
    order = order or list(range(len(parts)))
    total = parts[order[0]]
    for i in order[1:]:
        total = total.merge(parts[i])
    return total


def test_plain_least_squares_equals_lstsq(xp) -> None:  # type: ignore[no-untyped-def]
    x, y, t_true = synthetic()
    solution = solve(accumulate(x, y, [0, 100, 550, 997], xp))
    reference = np.linalg.lstsq(x, y, rcond=None)[0]
    assert solution.method == "cholesky" and solution.rank == 24
    assert rel_err(solution.t, reference) <= 1e-8
    assert not solution.bias.any()
    assert rel_err(solution.t, t_true) < 0.05  # recovers the map (up to the bias it cannot fit)


def test_bias_equals_lstsq_with_a_column_of_ones(xp) -> None:  # type: ignore[no-untyped-def]
    x, y, t_true = synthetic()
    solution = solve(accumulate(x, y, [0, 997], xp), bias=True)
    reference = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    assert rel_err(solution.t, reference[:-1]) <= 1e-8
    np.testing.assert_allclose(solution.bias, reference[-1], rtol=1e-8)
    assert rel_err(solution.t, t_true) < 1e-3 and np.allclose(solution.bias, 3.0, atol=0.05)


def test_ridge_equals_the_closed_form(xp) -> None:  # type: ignore[no-untyped-def]
    x, y, _ = synthetic()
    solution = solve(accumulate(x, y, [0, 500, 997], xp), ridge=0.05)
    a = x.T @ x
    lam = 0.05 * np.trace(a) / a.shape[0]
    reference = np.linalg.solve(a + lam * np.eye(a.shape[0]), x.T @ y)
    assert rel_err(solution.t, reference) <= 1e-10
    assert solution.ridge_added == pytest.approx(lam)


def test_rank_deficient_x_takes_the_fallback_minimum_norm(xp) -> None:  # type: ignore[no-untyped-def]
    x, y, _ = synthetic()
    x = np.c_[x, x[:, :5]]  # duplicated channels
    solution = solve(accumulate(x, y, [0, 400, 997], xp))
    reference = np.linalg.lstsq(x, y, rcond=None)[0]  # the minimum-norm solution
    assert solution.method == "eigh-pinv" and solution.rank == 24
    assert "singular (rank 24 of 29" in solution.notes[0]
    assert rel_err(solution.t, reference) <= 1e-8


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 996), max_size=8, unique=True),
    order_seed=st.integers(0, 2**16),
)
def test_any_chunking_and_merge_order_give_the_same_t(cuts: list[int], order_seed: int) -> None:
    x, y, _ = synthetic(seed=1)
    bounds = [0, *sorted(cuts), 997]
    order = list(np.random.default_rng(order_seed).permutation(len(bounds) - 1))
    solution = solve(accumulate(x, y, bounds, np, order))
    reference = np.linalg.lstsq(x, y, rcond=None)[0]
    assert rel_err(solution.t, reference) <= 1e-8


def test_float32_gemm_costs_little_accuracy() -> None:
    x, y, _ = synthetic()
    f64 = solve(accumulate(x, y, [0, 997], np), bias=True)
    ne32 = NormalEquations.from_chunk(x, y, np, gemm_dtype="float32")
    f32 = solve(ne32, bias=True, gemm_dtype="float32")
    measured = rel_err(f32.t, f64.t)
    assert 1e-12 < measured < 1e-4  # measurably different, still accurate
    assert f64.gemm_error is None and f32.gemm_error is not None
    assert measured < f32.gemm_error < 1000 * measured


# -- on a store ---------------------------------------------------------------------------------


def rows(store: Path, k: int, idx: np.ndarray | None = None, cls: bool = False) -> np.ndarray:
    h = zarr.open_group(str(store), mode="r", use_consolidated=False)[f"h{k}"][:].astype(np.float64)
    if idx is not None:
        h = h[idx]
    if cls:
        h = h[:, :1]
    return h.reshape(-1, h.shape[-1])


@pytest.fixture()
def store(tmp_path: Path, small_store: Path) -> Path:
    copy = tmp_path / "fit.zarr"
    shutil.copytree(small_store, copy)
    return copy


def test_fit_from_store_equals_lstsq_on_rows_in_memory(store: Path) -> None:
    fits = fit_spans(store, FitOptions(spans=((5, 6), (4, 6), (8, 11)), backend="numpy"))
    for fit in fits:
        a, b = fit.span
        reference = np.linalg.lstsq(rows(store, a), rows(store, b), rcond=None)[0]
        assert fit.solution.method == "cholesky"
        assert rel_err(fit.solution.t, reference) <= 1e-8
        assert fit.diagnostics["rows"] == 50 * 17
        x, y = rows(store, a), rows(store, b)
        direct = np.sum((x @ reference - y) ** 2) / np.sum(y**2)
        assert fit.diagnostics["train"]["relative_mse"] == pytest.approx(direct, rel=1e-6)
    ds = xr.open_zarr(store, group="fits/4-6")
    assert ds["T"].dims == ("channel_in", "channel_out") and ds["T"].shape == (64, 64)
    np.testing.assert_array_equal(ds["T"].values, fits[1].solution.t)
    assert ds.attrs["span"] == [4, 6] and ds.attrs["options"]["bias"] is False
    assert not ds["bias"].values.any()


def test_float32_fit_reports_its_expected_error(tmp_path: Path, small_store: Path) -> None:
    """On real activations the reported error bounds the measured change of T, not loosely."""
    spans = ((0, 1), (3, 6), (8, 11), (10, 11))
    fits = {}
    for gemm in ("float64", "float32"):
        for ridge in (0.0, 100.0):  # badly conditioned (1e4-1e6; h0 singular); well (about 1.2)
            copy = tmp_path / f"{gemm}-{ridge}.zarr"
            shutil.copytree(small_store, copy)
            options = FitOptions(spans=spans, gemm_dtype=gemm, ridge=ridge)
            for fit in fit_spans(copy, options):
                fits[gemm, ridge, fit.span] = fit
    checked = set()
    for (gemm, ridge, span), f64 in fits.items():
        if gemm == "float32":
            continue
        assert "gemm_expected_relative_error" not in f64.diagnostics
        f32 = fits["float32", ridge, span]
        expected = f32.diagnostics["gemm_expected_relative_error"]
        saved = load_fit(tmp_path / f"float32-{ridge}.zarr", f32.name)
        assert saved.attrs["gemm_expected_relative_error"] == expected
        warned = [n for n in f32.diagnostics["notes"] if n.startswith("--gemm float32")]
        if span == (0, 1) and not ridge:  # h0 is singular: float32 T is meaningless
            assert expected == "inf" and len(warned) == 1
            continue
        measured = rel_err(f32.solution.t, f64.solution.t)
        assert measured < expected < 1000 * measured, (span, ridge, measured, expected)
        assert len(warned) == (1 if expected > 1e-6 else 0), (span, ridge, expected)
        checked.add(expected > 1e-6)
        if warned:
            assert f"expected relative error of T about {expected:.2g}" in warned[0]
    assert checked == {True, False}  # both sides of the 1e-6 threshold were exercised


def test_bias_cls_and_limit_options(store: Path) -> None:
    (fit,) = fit_spans(
        store,
        FitOptions(
            spans=((7, 9),),
            tokens="cls",
            bias=True,
            selection=SampleSelection(limit=40),
            ridge=1e-3,
        ),
    )
    x, y = rows(store, 7, np.arange(40), cls=True), rows(store, 9, np.arange(40), cls=True)
    xc, yc = x - x.mean(0), y - y.mean(0)
    a = xc.T @ xc
    lam = 1e-3 * np.trace(a) / 64
    t = np.linalg.solve(a + lam * np.eye(64), xc.T @ yc)
    assert fit.name == "7-9-cls-bias-ridge0.001"
    assert rel_err(fit.solution.t, t) <= 1e-8
    np.testing.assert_allclose(fit.solution.bias, y.mean(0) - x.mean(0) @ t, rtol=1e-7, atol=1e-9)


def test_holdout_diagnostics_match_a_direct_computation(store: Path) -> None:
    (fit,) = fit_spans(store, FitOptions(spans=((5, 6),), holdout=0.2, holdout_seed=7))
    held = np.sort(np.random.default_rng(7).choice(np.arange(50), size=10, replace=False))
    kept = np.setdiff1d(np.arange(50), held)
    t = np.linalg.lstsq(rows(store, 5, kept), rows(store, 6, kept), rcond=None)[0]
    assert rel_err(fit.solution.t, t) <= 1e-8
    x, y = rows(store, 5, held), rows(store, 6, held)
    report = fit.diagnostics["heldout"]
    pred = x @ t

    def cosine(a: np.ndarray) -> float:
        return float(
            np.mean(np.sum(a * y, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(y, axis=1)))
        )

    assert report["rows"] == 170
    assert report["relative_mse"] == pytest.approx(np.sum((pred - y) ** 2) / np.sum(y**2), rel=1e-9)
    assert report["r2"] == pytest.approx(
        1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean(0)) ** 2), rel=1e-9
    )
    assert report["cosine"] == pytest.approx(cosine(pred), rel=1e-9)
    assert report["identity"]["relative_mse"] == pytest.approx(
        np.sum((x - y) ** 2) / np.sum(y**2), rel=1e-9
    )
    assert report["identity"]["cosine"] == pytest.approx(cosine(x), rel=1e-9)
    assert report["relative_mse"] < report["identity"]["relative_mse"]  # T beats dropping the block


def test_eval_store_gives_held_out_rows(store: Path, tmp_path: Path) -> None:
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

    test_store = tmp_path / "test.zarr"
    run_extraction(plan_extraction(ExtractOptions(split="test", limit=20)), test_store)
    (fit,) = fit_spans(store, FitOptions(spans=((2, 3),), eval_store=str(test_store)))
    assert fit.diagnostics["heldout"]["rows"] == 20 * 17
    assert fit.diagnostics["heldout"]["source"]["kind"] == "eval_store"


def test_existing_fit_is_reused_refused_or_overwritten(store: Path) -> None:
    (first,) = fit_spans(store, FitOptions(spans=((1, 2),)))
    (same,) = fit_spans(store, FitOptions(spans=((1, 2),), bias=False))  # as evaluate --auto does
    assert same.reused and not first.reused
    np.testing.assert_array_equal(same.solution.t, first.solution.t)
    assert same.diagnostics["rows"] == first.diagnostics["rows"]
    with pytest.raises(UsageError, match=r"fit '1-2' already exists .*other options.*--overwrite"):
        fit_spans(store, FitOptions(spans=((1, 2),), name="1-2", ridge=1e-3))
    (again,) = fit_spans(store, FitOptions(spans=((1, 2),), name="1-2", bias=True, overwrite=True))
    assert xr.open_zarr(store, group="fits/1-2").attrs["options"]["bias"] is True
    assert again.name == "1-2"


def test_safetensors_export(store: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    (fit,) = fit_spans(store, FitOptions(spans=((3, 5),), bias=True))
    path = export_safetensors(store, fit.name, tmp_path / "t.safetensors")
    tensors = load_file(str(path))
    np.testing.assert_array_equal(tensors["T"], fit.solution.t)
    np.testing.assert_array_equal(tensors["bias"], fit.solution.bias)


def test_distributed_fit_equals_local(store: Path) -> None:
    distributed = pytest.importorskip("distributed")
    options = FitOptions(spans=((5, 6), (2, 4)), holdout=0.2, overwrite=True)
    local = fit_spans(store, options)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        remote = fit_spans(
            store, FitOptions(**{**options.__dict__, "scheduler": cluster.scheduler_address})
        )
    for a, b in zip(local, remote, strict=True):
        assert rel_err(b.solution.t, a.solution.t) <= 1e-10
        assert b.diagnostics["heldout"]["r2"] == pytest.approx(
            a.diagnostics["heldout"]["r2"], rel=1e-10
        )


def test_nan_in_activations_names_block_and_samples(store: Path) -> None:
    h5 = zarr.open_group(str(store), mode="r+", use_consolidated=False)["h5"]
    block = h5[20:40]
    block[3, 2, 1] = np.nan
    block[11, 0, 0] = np.inf
    h5[20:40] = block
    with pytest.raises(NonFiniteError, match=r"h5 holds NaN or Inf in samples 23\.\.31"):
        fit_spans(store, FitOptions(spans=((5, 6),)))
    assert "fits" not in zarr.open_group(str(store), mode="r", use_consolidated=False)


def test_backend_choice() -> None:
    from rba_store.solve._backend import get_xp

    assert get_xp("numpy") is np
    if not gpu_available():
        assert get_xp("auto") is np
        with pytest.raises(UsageError, match="--backend cupy needs"):
            get_xp("cupy")
    assert isinstance(to_numpy(np.ones(2)), np.ndarray)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_fit_json_and_auto(
    store: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_cli(capsys, "fit", store, "--auto", "2", "--holdout", "0.2", "--json")
    assert code == 2 and "run 'rba-store stats" in err
    assert run_cli(capsys, "stats", store)[0] == 0
    code, out, err = run_cli(
        capsys,
        "fit",
        store,
        "--auto",
        "2",
        "--holdout",
        "0.2",
        "--json",
        "--export",
        tmp_path / "x",
    )
    assert code == 0, err
    report = json.loads(out)
    stats = json.loads(run_cli(capsys, "stats", store, "--json")[1])
    assert [r["span"] for r in report] == [c["span"] for c in stats["candidates"][:2]]
    for r in report:
        assert {"rows", "condition_number", "rank", "train", "heldout"} <= set(r)
        assert r["heldout"]["identity"]["r2"] <= 1
        assert (tmp_path / "x" / f"{r['name']}.safetensors").is_file()
    code, out, _ = run_cli(capsys, "fit", store, "--span", "9:10", "--holdout", "0.3")
    assert code == 0
    assert "held-out relative MSE" in out and "identity relative MSE" in out and "fits/9-10" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--span", "5:3"], "span 5:3 is out of range"),
        (["--span", "0:99"], "span 0:99 is out of range for"),
        (["--span", "0:13"], "(12 blocks): pass a:b with 0 <= a < b <= 12"),
        (["--span", "five"], "--span 'five' is not of the form a:b"),
        (["--span", "1:2", "--backend", "cupy"], "--backend cupy needs"),
        (["--span", "1:2", "--limit", "3"], "only 51 rows to fit h1 with 64 channels"),
        (["--span", "1:2", "--holdout", "1.5"], "--holdout 1.5 is out of range"),
        (["--span", "1:2", "--ridge", "-1"], "--ridge -1.0 is invalid"),
        (["--span", "5:6", "--name", "nan-test"], "h5 holds NaN or Inf in samples 23..23"),
        ([], "no span to fit"),
    ],
)
def test_cli_bad_input_writes_nothing(
    store: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    if "nan-test" in args:
        h5 = zarr.open_group(str(store), mode="r+", use_consolidated=False)["h5"]
        block = h5[20:40]
        block[3, 0, 0] = np.nan
        h5[20:40] = block
    if "--backend" in args and gpu_available():
        pytest.skip("a GPU is visible here")
    before = tree_digest(store)
    code, _, err = run_cli(capsys, "fit", store, *args)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert tree_digest(store) == before
