"""Joint moments kept on a band of spans (issue 19, item 4): the blocks equal the in-memory
co-moment matrix's, CKA on the band and off it (further passes) equals the full CKA, fits inside
the band read no activations, memory refusals are one line and touch nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from rba_store.cli import main
from rba_store.solve import FitOptions, fit_spans
from rba_store.stats import compute_block_stats, memory, run_stats
from rba_store.stats.moments import band_pairs, cka_from_moments, point_columns
from rba_store.stats.result import BlockStats
from rba_store.store import STATS, Store
from tests.conftest import tree_digest

N_POINTS = 13  # the embedded default: 12 blocks


def _joint_rows(store: Path) -> tuple[np.ndarray, list[int]]:
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    points = [group[f"h{k}"][:].astype(np.float64) for k in range(N_POINTS)]
    rows = [p.reshape(-1, p.shape[-1]) for p in points]
    return np.concatenate(rows, axis=1), [r.shape[1] for r in rows]


@pytest.fixture(scope="module")
def in_memory(small_store: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    z, widths = _joint_rows(small_store)
    zc = z - z.mean(axis=0)
    return z.mean(axis=0), zc.T @ zc, widths


def test_band_blocks_equal_the_full_in_memory_co_moment_matrix(
    small_store: Path, in_memory: tuple[np.ndarray, np.ndarray, list[int]]
) -> None:
    mean, m2, widths = in_memory
    stats = compute_block_stats(small_store, max_span=2, cka_pairs="band")
    assert stats.moments is not None and stats.attrs["moment_band"] == 2
    assert stats.moments.pairs == band_pairs(N_POINTS, 2)
    cols = point_columns(widths)
    scale = float(np.abs(m2).max())
    np.testing.assert_allclose(stats.moments.mean, mean, rtol=1e-12, atol=1e-12)
    for a, b in stats.moments.pairs:
        expected = m2[cols[a], cols[b]]
        np.testing.assert_allclose(stats.moments.block(a, b), expected, atol=1e-11 * scale)
    assert not stats.moments.covers(0, 3)

    full_cka = cka_from_moments(m2, widths)
    for a in range(N_POINTS):
        for b in range(N_POINTS):
            if abs(a - b) <= 2:
                np.testing.assert_allclose(stats.cka[a, b], full_cka[a, b], rtol=1e-9)
            else:
                assert np.isnan(stats.cka[a, b])
    assert stats.attrs["cka_pairs"] == "band"


def test_off_band_cka_in_further_passes_equals_the_in_memory_cka(
    small_store: Path,
    in_memory: tuple[np.ndarray, np.ndarray, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, m2, widths = in_memory
    band = memory.stats_memory(widths, 17, 20, 4, 2, workers=2)
    full = memory.stats_memory(widths, 17, 20, 4, None, workers=2)
    room = band.peak + (full.peak - band.peak) // 3  # the band fits, every pair does not
    monkeypatch.setattr(memory, "available_memory", lambda: room)
    stats = compute_block_stats(small_store, max_span=2, cka_pairs="all")
    assert stats.attrs["moment_band"] == 2 and stats.attrs["cka_pairs"] == "all"
    np.testing.assert_allclose(stats.cka, cka_from_moments(m2, widths), rtol=1e-9)


def test_auto_keeps_every_pair_for_small_models(small_store: Path) -> None:
    stats = compute_block_stats(small_store)
    assert stats.attrs["moment_band"] is None and stats.attrs["cka_pairs"] == "all"
    assert stats.moments is not None and len(stats.moments.pairs) == N_POINTS * (N_POINTS + 1) // 2
    assert np.isfinite(np.diag(stats.cka)).sum() >= N_POINTS - 1


def _hide_activations(store: Path, away: Path) -> None:
    away.mkdir()
    for k in range(N_POINTS):
        shutil.move(str(store / f"h{k}"), str(away / f"h{k}"))


def test_fits_inside_the_band_read_no_activations_outside_stream_or_refuse(
    tmp_path: Path, small_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "b.zarr"))
    rows, widths = _joint_rows(store)
    cols = point_columns(widths)
    run_stats(store, max_span=2, cka_pairs="band")
    _hide_activations(store, tmp_path / "away")
    (fit,) = fit_spans(store, FitOptions(spans=((4, 6),), source="moments"))
    assert fit.diagnostics["source"]["kind"] == "moments"
    expected = np.linalg.lstsq(rows[:, cols[4]], rows[:, cols[6]], rcond=None)[0]
    np.testing.assert_allclose(fit.solution.t, expected, atol=1e-8)

    digest = tree_digest(store)
    code = main(["fit", str(store), "--span", "2:6", "--from", "moments"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "outside the band" in err and "--from auto" in err
    assert tree_digest(store) == digest

    shutil.rmtree(store)  # activations back: auto streams the span outside the band
    store = Path(shutil.copytree(small_store, tmp_path / "b2.zarr"))
    run_stats(store, max_span=2, cka_pairs="band")
    fits = fit_spans(store, FitOptions(spans=((4, 6), (2, 6))))
    kinds = {f.span: f.diagnostics["source"]["kind"] for f in fits}
    assert kinds == {(4, 6): "moments", (2, 6): "activations"}
    expected = np.linalg.lstsq(rows[:, cols[2]], rows[:, cols[6]], rcond=None)[0]
    np.testing.assert_allclose(fits[1].solution.t, expected, atol=1e-8)


def test_heldout_moments_on_the_band(tmp_path: Path, small_store: Path) -> None:
    """stats --holdout on a band: fit --holdout from moments equals streaming the rows."""
    store = Path(shutil.copytree(small_store, tmp_path / "h.zarr"))
    run_stats(store, holdout=0.2, holdout_seed=1, max_span=2, cka_pairs="band")
    options = FitOptions(spans=((3, 5),), holdout=0.2, holdout_seed=1, name="m")
    (from_moments,) = fit_spans(store, options)
    (streamed,) = fit_spans(
        store, FitOptions(**{**options.__dict__, "source": "activations", "name": "s"})
    )
    assert from_moments.diagnostics["heldout"]["source"]["from"] == "moments"
    np.testing.assert_allclose(from_moments.solution.t, streamed.solution.t, atol=1e-8)
    for key in ("relative_mse", "r2"):
        assert from_moments.diagnostics["heldout"][key] == pytest.approx(
            streamed.diagnostics["heldout"][key], rel=1e-7
        )


def test_statistics_saved_as_the_whole_matrix_are_still_read(
    tmp_path: Path, small_store: Path, in_memory: tuple[np.ndarray, np.ndarray, list[int]]
) -> None:
    """Statistics written before the band (``moment_m2``, the whole (p, p) matrix)."""
    mean, m2, widths = in_memory
    store = Path(shutil.copytree(small_store, tmp_path / "old.zarr"))
    rows, _ = _joint_rows(store)
    stats = compute_block_stats(store)
    ds = stats.to_dataset().drop_vars(["moment_blocks", "moment_mean", "pair_a", "pair_b"])
    ds["moment_mean"] = ("feature", mean)
    ds["moment_m2"] = (("feature", "feature_b"), m2)
    for key in ("moment_band", "cka_pairs"):
        ds.attrs.pop(key)
    ds.attrs["name"] = "tokens-all"
    Store.open(store, "r+").write_analysis(STATS, "tokens-all", ds)

    reread, reused = run_stats(store)
    assert reused and reread.moments is not None and reread.band is None
    cols = point_columns(widths)
    np.testing.assert_allclose(reread.moments.block(2, 9), m2[cols[2], cols[9]], rtol=1e-12)
    _hide_activations(store, tmp_path / "away")
    (fit,) = fit_spans(store, FitOptions(spans=((1, 9),), source="moments"))
    expected = np.linalg.lstsq(rows[:, cols[1]], rows[:, cols[9]], rcond=None)[0]
    np.testing.assert_allclose(fit.solution.t, expected, atol=1e-8)


def test_saved_band_layout_reads_back_with_xarray(tmp_path: Path, small_store: Path) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "x.zarr"))
    stats, _ = run_stats(store, max_span=1, cka_pairs="band")
    ds = xr.open_zarr(str(store), group="stats/tokens-all", consolidated=False)
    assert ds["moment_blocks"].dims == ("pair", "channel", "channel_b")
    i = int(np.flatnonzero((ds["pair_a"].values == 3) & (ds["pair_b"].values == 4))[0])
    assert stats.moments is not None
    np.testing.assert_array_equal(ds["moment_blocks"][i].values, stats.moments.block(3, 4))
    again = BlockStats.from_dataset(ds.load())
    np.testing.assert_array_equal(again.cka, stats.cka)


def test_memory_refusal_is_one_line_and_touches_nothing(
    tmp_path: Path,
    small_store: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "r.zarr"))
    digest = tree_digest(store)
    monkeypatch.setenv("RBA_STORE_MEMORY_GIB", "0.05")
    code = main(["stats", str(store)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "GiB" in err or "MiB" in err
    assert "--no-cka" in err and "fit" in err
    assert tree_digest(store) == digest


def test_dry_run_says_what_it_takes_and_writes_nothing(
    tmp_path: Path, small_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "d.zarr"))
    digest = tree_digest(store)
    assert main(["stats", str(store), "--dry-run", "--cka-pairs", "band", "--max-span", "2"]) == 0
    out = capsys.readouterr().out
    assert "spans of at most 2 blocks" in out and "per partial" in out
    assert tree_digest(store) == digest


def test_memory_figures_from_the_configuration_alone(capsys: pytest.CaptureFixture[str]) -> None:
    memory.main(["--blocks", "24", "--width", "1024", "--tokens", "197"])
    out = capsys.readouterr().out
    assert "115 of 325 pairs" in out  # ViT-L/16, band 4: 25 + 24 + 23 + 22 + 21 blocks
    assert memory.n_band_pairs(33, None) == 561 and memory.n_band_pairs(33, 4) == 155


def test_bfloat16_store_round_trip(tmp_path: Path, small_store: Path) -> None:
    """bfloat16 values kept as their 16 bits (uint16): every reader gets torch's bfloat16 of
    the float32 activations, exactly; stats and fits run on them."""
    import torch

    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
    from rba_store.store.layout import decode_values, encode_values

    values = np.array([1.0, -2.5e-3, 3.14159, 65504.0, 1e-40, np.inf, -np.inf, np.nan], np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    got = decode_values(encode_values(values, "bfloat16"), "bfloat16")
    np.testing.assert_array_equal(got, expected)

    out = tmp_path / "bf16.zarr"
    options = ExtractOptions(
        limit=50, batch_size=16, chunk_samples=10, shard_samples=20, dtype="bfloat16", stats=True
    )
    run_extraction(plan_extraction(options), out)
    group = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert group["h5"].dtype == np.uint16 and group["h5"].attrs["rba_store_dtype"] == "bfloat16"
    reference = zarr.open_group(str(small_store), mode="r", use_consolidated=False)
    for k in (0, 5, 12):
        rounded = torch.from_numpy(reference[f"h{k}"][:]).to(torch.bfloat16).float().numpy()
        (read,) = Store.open(out).read_points([k], 0, 50)
        assert read.dtype == np.float32
        np.testing.assert_array_equal(read, rounded)
    streamed, reused = run_stats(out)  # saved during extraction from the very stored values
    recomputed = compute_block_stats(out)
    assert reused
    np.testing.assert_allclose(streamed.cka, recomputed.cka, rtol=1e-9)
    (fit,) = fit_spans(out, FitOptions(spans=((3, 5),), source="activations"))
    x = decode_values(group["h3"][:], "bfloat16").reshape(-1, 64).astype(np.float64)
    y = decode_values(group["h5"][:], "bfloat16").reshape(-1, 64).astype(np.float64)
    np.testing.assert_allclose(fit.solution.t, np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-8)
    assert main(["validate", str(out)]) == 0
