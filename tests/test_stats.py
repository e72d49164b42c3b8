"""Block statistics: equal to a direct in-memory float64 computation, whatever the chunking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from rba_store import store as rs
from rba_store.cli import main
from rba_store.errors import IncompleteStoreError, UsageError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.stats import SampleSelection, compute_block_stats, run_stats
from rba_store.stats.moments import Moments
from tests.conftest import tree_digest

RTOL = 1e-9


def stored_points(
    store: Path, idx: np.ndarray | None = None, cls: bool = False
) -> list[np.ndarray]:
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    n_points = rs.StoreLayout.from_attrs(group.attrs["rba_store"]["layout"]).n_blocks + 1
    points = [group[rs.h_name(k)][:].astype(np.float64) for k in range(n_points)]
    if idx is not None:
        points = [p[idx] for p in points]
    return [p[:, :1] for p in points] if cls else points


def sample_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from centred Gram matrices (sample space): independent of the feature-space formula."""
    k, l_ = x @ x.T, y @ y.T
    h = np.eye(len(x)) - 1.0 / len(x)
    kc, lc = h @ k @ h, h @ l_ @ h
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


def direct_stats(points: list[np.ndarray]) -> dict[str, np.ndarray]:
    def sq(a: np.ndarray) -> np.ndarray:
        return np.sum(a * a, axis=(1, 2))

    steps = range(1, len(points))
    rows = [p.reshape(-1, p.shape[-1]) for p in points]
    cosine = []
    for b in steps:
        u, v = rows[b - 1], rows[b]
        cosine.append(
            np.mean(np.sum(u * v, 1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)))
        )
    return {
        "br": np.array([-np.mean(sq(points[b] - points[b - 1])) for b in steps]),
        "relative_change": np.array(
            [np.mean(sq(points[b] - points[b - 1]) / sq(points[b - 1])) for b in steps]
        ),
        "cosine": np.array(cosine),
        "norm": np.array([np.mean(np.sqrt(sq(p))) for p in points]),
    }


def assert_rel(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)


@pytest.fixture(scope="session")
def rechunked_store(tmp_path_factory: pytest.TempPathFactory, small_store: Path) -> Path:
    """The same 50 samples as small_store, with chunks (7) and shards (14) that do not divide 50."""
    out = tmp_path_factory.mktemp("stores") / "rechunked.zarr"
    options = ExtractOptions(limit=50, batch_size=16, chunk_samples=7, shard_samples=14)
    run_extraction(plan_extraction(options), out)
    return out


@pytest.fixture(scope="session")
def cls_store(tmp_path_factory: pytest.TempPathFactory, default_weights: Path) -> Path:
    out = tmp_path_factory.mktemp("stores") / "cls16.zarr"
    options = ExtractOptions(
        limit=40, tokens="cls", dtype="float16", shard_samples=16, chunk_samples=8
    )
    run_extraction(plan_extraction(options), out)
    return out


def test_every_statistic_equals_the_in_memory_computation(small_store: Path) -> None:
    stats = compute_block_stats(small_store)
    points = stored_points(small_store)
    expected = direct_stats(points)
    for key in ("br", "relative_change", "cosine", "norm"):
        assert_rel(getattr(stats, key), expected[key])
    rows = [p.reshape(-1, p.shape[-1]) for p in points]
    for i in (0, 3, 12):
        for j in (0, 5, 12):
            assert stats.cka[i, j] == pytest.approx(sample_space_cka(rows[i], rows[j]), rel=RTOL)
    np.testing.assert_allclose(np.diag(stats.cka), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(stats.cka, stats.cka.T)
    assert stats.n_samples == 50 and stats.n_rows == 50 * 17


def test_chunking_does_not_change_the_result(small_store: Path, rechunked_store: Path) -> None:
    a = compute_block_stats(small_store)
    b = compute_block_stats(rechunked_store)
    for key in ("br", "relative_change", "cosine", "norm", "cka", "span_change"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-12, equal_nan=True)


def test_class_token_statistics(small_store: Path) -> None:
    stats = compute_block_stats(small_store, tokens="cls")
    points = stored_points(small_store, cls=True)
    expected = direct_stats(points)
    for key in ("br", "relative_change", "cosine", "norm"):
        assert_rel(getattr(stats, key), expected[key])
    assert stats.n_rows == 50
    # h0's class token is the same for every sample: zero variance, no CKA (not a fake 0 or 1)
    assert np.isnan(stats.cka[0]).all()
    np.testing.assert_allclose(np.diag(stats.cka)[1:], 1.0, rtol=1e-12)
    rows = [p[:, 0] for p in points]
    assert stats.cka[4, 9] == pytest.approx(sample_space_cka(rows[4], rows[9]), rel=RTOL)


def test_float16_cls_store_uses_the_stored_values(cls_store: Path) -> None:
    stats = compute_block_stats(cls_store, tokens="cls")
    expected = direct_stats(stored_points(cls_store))
    for key in ("br", "relative_change", "cosine", "norm"):
        assert_rel(getattr(stats, key), expected[key])


def test_limit_and_seeded_sample(small_store: Path) -> None:
    limited = compute_block_stats(small_store, selection=SampleSelection(limit=13))
    assert_rel(limited.br, direct_stats(stored_points(small_store, np.arange(13)))["br"])
    sampled = compute_block_stats(small_store, selection=SampleSelection(sample=17, seed=3))
    idx = np.sort(np.random.default_rng(3).choice(np.arange(50), size=17, replace=False))
    assert_rel(
        sampled.relative_change, direct_stats(stored_points(small_store, idx))["relative_change"]
    )


def test_moments_merge_is_exact_in_any_order() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(loc=50.0, size=(301, 6))  # a large mean: naive raw moments would cancel badly
    parts = [Moments.from_rows(z[a:b]) for a, b in ((0, 1), (1, 120), (120, 121), (121, 301))]
    left = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    tree = parts[3].merge(parts[1]).merge(parts[0].merge(parts[2]))
    zc = z - z.mean(0)
    for merged in (left, tree):
        assert merged.n == 301
        np.testing.assert_allclose(merged.mean, z.mean(0), rtol=1e-13)
        np.testing.assert_allclose(merged.m2, zc.T @ zc, rtol=1e-10)


def test_saved_under_stats_and_reused(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    stats, reused = run_stats(store, tokens="cls")
    assert not reused
    ds = xr.open_zarr(store, group="stats/tokens-cls")  # a plain call: consolidated again
    np.testing.assert_array_equal(ds["br"].values, stats.br)
    assert ds["cka"].dims == ("point", "point_b") and ds.attrs["tokens"] == "cls"

    def no_recompute(*args: object, **kwargs: object) -> None:
        raise AssertionError("saved statistics should have been reused")

    monkeypatch.setattr("rba_store.stats.compute_block_stats", no_recompute)
    again, reused = run_stats(store, tokens="cls")
    assert reused
    np.testing.assert_array_equal(again.cka, stats.cka)
    with pytest.raises(UsageError, match=r"already exist .* with other options"):
        run_stats(store, tokens="cls", name="tokens-cls", selection=SampleSelection(limit=5))


def test_distributed_cluster_gives_the_local_result(small_store: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local = compute_block_stats(small_store)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        remote = compute_block_stats(small_store, scheduler=cluster.scheduler_address)
    for key in ("br", "relative_change", "cosine", "norm", "cka"):
        np.testing.assert_allclose(getattr(remote, key), getattr(local, key), rtol=1e-12)


def test_incomplete_store_is_refused_unless_allowed(small_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "partial.zarr"
    shutil.copytree(small_store, store)
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    group["ledger/shards"][1] = 0
    with pytest.raises(
        IncompleteStoreError, match=r"2/3 shards \(30/50 samples\).*--allow-incomplete"
    ):
        compute_block_stats(store)
    stats = compute_block_stats(store, allow_incomplete=True)
    idx = np.r_[0:20, 40:50]
    assert stats.n_samples == 30
    assert_rel(stats.br, direct_stats(stored_points(store, idx))["br"])


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_table_and_plots(
    small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    code, out, err = run_cli(capsys, "stats", store, "--json", "--plots", tmp_path / "plots")
    assert code == 0, err
    report = json.loads(out)
    assert [b["block"] for b in report["blocks"]] == list(range(1, 13))
    assert len(report["cka"]) == 13 and report["cka"][4][4] == pytest.approx(1.0)
    best = report["candidates"][0]
    assert best["score"] == min(c["score"] for c in report["candidates"])
    a, b = best["span"]
    assert 0 <= a < b <= 12
    for png in ("block_change.png", "cka.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    code, out, _ = run_cli(capsys, "stats", store)
    assert code == 0 and "reused the saved stats/tokens-all" in out and "candidate spans" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}"], "is not an rba-store store"),
        (["{partial}"], "is incomplete: 2/3 shards (30/50 samples)"),
        (["{cls}", "--tokens", "all"], "holds the class token only"),
        (["{store}", "--limit", "51"], "--limit 51 is out of range"),
        (["{store}", "--limit", "5", "--sample", "5"], "exclude each other"),
        (["{store}", "--name", "../escape"], "name '../escape' is not valid"),
        (["{store}", "--scheduler", "tcp://127.0.0.1:1"], "cannot connect to the Dask scheduler"),
    ],
)
def test_cli_bad_input(
    small_store: Path,
    cls_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    partial = tmp_path / "partial.zarr"
    shutil.copytree(small_store, partial)
    zarr.open_group(str(partial), mode="r+", use_consolidated=False)["ledger/shards"][1] = 0
    digests = {p: tree_digest(p) for p in (small_store, cls_store, partial)}
    names = {"tmp": tmp_path, "partial": partial, "cls": cls_store, "store": small_store}
    code, _, err = run_cli(capsys, "stats", *[a.format(**names) for a in args])
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert {p: tree_digest(p) for p in digests} == digests


def test_without_cka_the_other_statistics_are_unchanged(small_store: Path) -> None:
    full = compute_block_stats(small_store)
    light = compute_block_stats(small_store, cka=False)
    assert np.isnan(light.cka).all()
    for key in ("br", "relative_change", "cosine", "norm", "span_change"):
        np.testing.assert_array_equal(getattr(light, key), getattr(full, key))
