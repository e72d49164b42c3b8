"""``extract --tokens random:K`` (issue 22): exactly K tokens plus the prefix per sample, the
same positions after a SIGKILL and resume and with two workers, maps equal to lstsq."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store.cli import main
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.solve import FitOptions, fit_spans, load_fit
from rba_store.store import TOKEN_POSITIONS, Store
from tests.test_approx import run_cli
from tests.test_resilience import assert_same_store, cli_process, wait_for_shards

K = 4
SMALL = ["--limit", "100", "--batch-size", "16", "--chunk-samples", "10", "--shard-samples", "20"]


def _positions(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")[TOKEN_POSITIONS][:])


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tokens")
    options = dict(limit=100, batch_size=16, chunk_samples=10, shard_samples=20)
    run_extraction(
        plan_extraction(ExtractOptions(tokens=f"random:{K}", **options)), root / "r.zarr"
    )
    run_extraction(plan_extraction(ExtractOptions(**options)), root / "all.zarr")
    return root / "r.zarr", root / "all.zarr"


def test_a_store_holds_the_prefix_and_k_drawn_tokens(sampled: tuple[Path, Path]) -> None:
    path, full_path = sampled
    store, full = Store.open(path), Store.open(full_path)
    positions = _positions(path)
    assert positions.shape == (100, 1 + K)
    assert (positions[:, 0] == 0).all()  # the class token first
    drawn = positions[:, 1:]
    assert (np.diff(drawn, axis=1) > 0).all() and drawn.min() >= 1 and drawn.max() <= 16
    assert len({tuple(row) for row in drawn}) > 50  # drawn per sample, not one pattern
    for k in (0, 5, 12):  # the stored tokens are those of the full residual stream
        h, h_full = np.asarray(store.point(k)[:]), np.asarray(full.point(k)[:])
        assert h.shape == (100, 1 + K, 64)
        np.testing.assert_array_equal(h, np.take_along_axis(h_full, positions[..., None], 1))
    assert store.description["token_sampling"]["k"] == K


def test_maps_fitted_on_the_sampled_rows_equal_lstsq(sampled: tuple[Path, Path]) -> None:
    path, _ = sampled
    store = Store.open(path)
    fit_spans(path, FitOptions(spans=((3, 6),), tokens=f"random:{K}", name="r36", bias=True))
    ds = load_fit(path, "r36")
    x = np.asarray(store.point(3)[:], np.float64).reshape(-1, 64)
    y = np.asarray(store.point(6)[:], np.float64).reshape(-1, 64)
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(ds["T"].values, solution[:-1], atol=1e-8, rtol=0)
    np.testing.assert_allclose(ds["bias"].values, solution[-1], atol=1e-8, rtol=0)


def test_positions_survive_a_sigkill_and_two_workers(
    sampled: tuple[Path, Path], tmp_path: Path
) -> None:
    reference, _ = sampled
    killed = tmp_path / "killed.zarr"
    args = ["extract", "--out", killed, "--tokens", f"random:{K}", *SMALL]
    process = cli_process(*args)
    wait_for_shards(process, killed, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)  # closes its pipes
    assert Store.open(killed).completed_shards().sum() < 5
    assert main([str(a) for a in args]) == 0
    np.testing.assert_array_equal(_positions(killed), _positions(reference))
    assert_same_store(killed, reference)

    parallel = tmp_path / "parallel.zarr"
    for index in (1, 0):
        argv = ["extract", "--out", parallel, "--tokens", f"random:{K}", *SMALL]
        assert main([str(a) for a in [*argv, "--num-workers", 2, "--worker-index", index]]) == 0
    np.testing.assert_array_equal(_positions(parallel), _positions(reference))
    assert_same_store(parallel, reference)


@pytest.mark.parametrize(
    ("tokens", "words"),
    [
        ("random:0", "K must be at least 1"),
        ("random:x", "write random:K"),
        ("random:17", "pass K <= 16"),
        ("some", "use all, cls, last or random:K"),
    ],
)
def test_bad_token_choices(
    tokens: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "extract", "--out", tmp_path / "s.zarr", "--tokens", tokens)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()
