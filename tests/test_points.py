"""``extract --points`` (issue 22): a store of some capture points only. It holds exactly those
arrays, bit for bit the full store's; statistics, fits (streamed and from the moments), the
sweep and the selection's candidates cover spans between them and say so; bad lists are
refused in one line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store.approx.select import SelectOptions, candidate_spans
from rba_store.approx.sweep import sweep_spans
from rba_store.errors import UsageError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.solve import FitOptions, fit_spans, load_fit
from rba_store.stats import compute_block_stats, run_stats
from rba_store.store import Store
from tests.test_approx import run_cli

POINTS = (0, 3, 7, 12)
SMALL = dict(limit=80, batch_size=16, chunk_samples=20, shard_samples=40)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("points")
    run_extraction(plan_extraction(ExtractOptions(points="0,3,7,-1", **SMALL)), root / "p.zarr")
    run_extraction(plan_extraction(ExtractOptions(**SMALL)), root / "all.zarr")
    return root / "p.zarr", root / "all.zarr"


def test_the_store_holds_exactly_the_chosen_points(
    stores: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, full_path = stores
    store, full = Store.open(path), Store.open(full_path)
    arrays = {name for name, _ in zarr.open_group(str(path), mode="r").arrays()}
    assert {a for a in arrays if a.startswith("h")} == {f"h{k}" for k in POINTS}
    assert store.layout.stored_blocks == POINTS and store.layout.n_blocks == 12
    for k in POINTS:
        np.testing.assert_array_equal(store.point(k)[:], full.point(k)[:])
    with pytest.raises(UsageError, match=r"h5 is not stored: this store keeps h0, h3, h7, h12"):
        store.point(5)
    code, out, _ = run_cli(capsys, "info", path, "--json")
    assert code == 0 and json.loads(out)["stored_points"] == list(POINTS)
    code, out, _ = run_cli(capsys, "info", path)
    assert "h0, h3, h7, h12 of h0..h12" in out


def test_statistics_cover_the_stored_points_and_say_so(
    stores: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, full_path = stores
    stats = compute_block_stats(path, max_span=12)
    full = compute_block_stats(full_path, max_span=12)
    ix = np.ix_(POINTS, POINTS)
    np.testing.assert_allclose(stats.cka, full.cka[ix], rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.span_change, full.span_change[ix], rtol=0, atol=1e-10)
    steps = [full.span_change[a, b] for a, b in itertools.pairwise(POINTS)]
    np.testing.assert_allclose(stats.relative_change, steps, rtol=0, atol=1e-10)
    assert stats.labels == list(POINTS) and stats.attrs["stored_points"] == list(POINTS)
    spans = [tuple(c["span"]) for c in stats.candidates(max_span=4)]
    assert spans and set(spans) <= {(0, 3), (3, 7)}  # between stored points, at most 4 blocks
    ds = stats.to_dataset()
    assert ds["point"].values.tolist() == list(POINTS) and ds["block"].values.tolist() == [3, 7, 12]
    code, out, _ = run_cli(capsys, "stats", path)
    assert code == 0
    assert "3 spans between 4 stored points" in out and "keeps h0, h3, h7, h12" in out
    assert " 3:7 " in out


def test_fits_equal_lstsq_and_the_full_store(
    stores: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, full_path = stores
    store = Store.open(path)
    fit_spans(path, FitOptions(spans=((3, 7),), name="s37", source="activations", bias=True))
    fit_spans(full_path, FitOptions(spans=((3, 7),), name="s37", source="activations", bias=True))
    t = load_fit(path, "s37")["T"].values
    x = np.asarray(store.point(3)[:], np.float64).reshape(-1, 64)
    y = np.asarray(store.point(7)[:], np.float64).reshape(-1, 64)
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(t, solution[:-1], rtol=0, atol=1e-8)
    np.testing.assert_allclose(t, load_fit(full_path, "s37")["T"].values, rtol=0, atol=1e-12)
    run_stats(path, max_span=12)
    fit_spans(path, FitOptions(spans=((3, 7), (0, 12)), name="m", source="moments", bias=True))
    np.testing.assert_allclose(load_fit(path, "m-3-7")["T"].values, t, rtol=0, atol=1e-9)
    code, _, err = run_cli(capsys, "fit", path, "--span", "2:7")
    assert code == 2
    assert "keeps only h0, h3, h7, h12 (extracted with --points)" in err and "Traceback" not in err


def test_the_sweep_and_the_selection_use_spans_between_stored_points(
    stores: tuple[Path, Path],
) -> None:
    path, _ = stores
    store = Store.open(path)
    steps = sweep_spans(store)
    assert [k for k, _ in steps] == sorted(k for k, _ in steps) and len(steps) == 2
    for removed, spans in steps:
        assert sum(b - a for a, b in spans) == removed
        assert all(a in POINTS and b in POINTS for a, b in spans)
    spans = candidate_spans(store, SelectOptions(max_span=4))
    assert spans == [(0, 3), (3, 7)]
    with pytest.raises(UsageError, match="--max-span 2 blocks joins two points"):
        candidate_spans(store, SelectOptions(max_span=2))
    with pytest.raises(UsageError, match="shortest span between them has 3 blocks"):
        sweep_spans(store, max_blocks=2)


def test_statistics_during_extraction_solve_the_same_maps(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    _, full_path = stores
    out = tmp_path / "m.zarr"
    options = ExtractOptions(points="0,3,7,12", stats=True, store_activations=False, **SMALL)
    run_extraction(plan_extraction(options), out)
    fit_spans(out, FitOptions(spans=((3, 7),), name="m", source="moments", bias=True))
    fit_spans(full_path, FitOptions(spans=((3, 7),), name="f37", source="activations", bias=True))
    expected = load_fit(full_path, "f37")["T"].values
    np.testing.assert_allclose(load_fit(out, "m")["T"].values, expected, rtol=0, atol=1e-9)


def test_the_extract_summary_names_the_stored_points_in_binary_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.zarr"
    code, stdout, _ = run_cli(
        capsys, "extract", "--limit", "40", "--points", "0,6,12", "--out", out
    )
    assert code == 0
    assert "h0, h6, h12 of h0..h12: 40 x 17 tokens x 64 channels" in stdout
    assert " MiB of " in stdout and " MB" not in stdout  # as info and --dry-run say sizes


@pytest.mark.parametrize(
    ("points", "extra", "message"),
    [
        ("0,99", [], "capture point 99 does not exist in 'rba_digits_vit'"),
        ("5", [], "keeps 1 point; fits and statistics need at least two"),
        ("0,a", [], "is not a list of capture points"),
        ("0,6", ["--mlp-outputs"], "--points stores some of h0..hL, --mlp-outputs"),
    ],
)
def test_bad_point_lists_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], points: str, extra: list[str], message: str
) -> None:
    out = tmp_path / "bad.zarr"
    args = ("extract", "--limit", "20", "--points", points, *extra, "--out", out)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_saved_statistics_answer_spans_counted_in_blocks() -> None:
    from rba_store.stats import covers
    from rba_store.stats.reduce import layout_steps

    assert layout_steps(POINTS, 4) == 1 and layout_steps(POINTS, 7) == 2
    assert layout_steps(tuple(range(13)), 4) == 4  # every point stored: max_span itself
    attrs = {"cka": True, "moment_band": 1, "stored_points": list(POINTS)}
    assert covers(attrs, 5, "auto")  # 0:3, 3:7 and 7:12 are each one stored step
    assert not covers(attrs, 7, "auto")  # 0:7 crosses two


def test_readings_default_to_the_stored_points(stores: tuple[Path, Path]) -> None:
    from rba_store.readings import run_modularity

    path, _ = stores
    curve, _ = run_modularity(path, save=False)
    assert list(curve.points) == list(POINTS)
    with pytest.raises(UsageError, match="h5 is not stored"):
        run_modularity(path, points="0,5", save=False)
