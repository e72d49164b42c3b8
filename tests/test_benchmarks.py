"""The benchmark suite runs end to end (tiny sizes) and writes well-formed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks._report import update_results
from benchmarks._results import BENCHMARKS, Result, at_least
from benchmarks.suite import main, parse_args

REAL_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


@pytest.mark.slow
def test_smoke_suite_writes_wellformed_results(tmp_path: Path) -> None:
    real_before = REAL_RESULTS.read_bytes() if REAL_RESULTS.exists() else None
    out = tmp_path / "results"
    json_path = tmp_path / "bench.json"
    args = ["--smoke", "--results-dir", str(out), "--json", str(json_path), "--work", str(tmp_path)]
    assert main(args) == 0

    payload = json.loads(json_path.read_text())
    machine = payload["machine"]
    assert isinstance(machine, dict)
    assert {"cpu", "cores", "memory_gb", "gpu", "python", "versions", "blas"} <= machine.keys()
    results = payload["results"]
    assert results
    for r in results:
        assert r["benchmark"] in BENCHMARKS
        assert isinstance(r["metric"], str) and r["metric"]
        assert isinstance(r["value"], float) and math.isfinite(r["value"])
        assert isinstance(r["unit"], str) and r["unit"]
        if "target" in r:
            (kind,) = r["target"]
            assert kind in ("min", "max")
            assert math.isfinite(r["target"][kind])
    ran = {r["benchmark"] for r in results}
    assert ran >= {"solver", "scaling", "out_of_core", "extract", "stats", "moments"}
    metrics = {(r["benchmark"], r["metric"]): r for r in results}
    # figures that carry one of the targets
    assert metrics[("solver", "fit_t_max_abs_err_d64")]["target"] == {"max": 1e-6}
    assert metrics[("out_of_core", "t_max_abs_diff")]["target"] == {"max": 1e-9}
    assert metrics[("scaling", "fit_rss_ratio_2n")]["target"] == {"max": 1.1}
    assert any(r["benchmark"] == "extract" and r.get("target") == {"max": 1.15} for r in results)
    assert any(r["benchmark"] == "stats" and r.get("target") == {"max": 1.3} for r in results)
    assert metrics[("stats", "ratio_n64")]["target"] == {"max": 2.5}  # with CKA (issue 22)
    assert metrics[("moments", "moments_syrk_ratio_default")]["target"] == {"min": 0.7}
    assert machine["rates"]["syrk_f64_gflops"] > 0 and machine["rates"]["gemm_f64_gflops"] > 0

    markdown = (out / "RESULTS.md").read_text()
    for name in ("summary", *BENCHMARKS):
        assert f"<!-- generated: {name} -->" in markdown
    if "gpu" not in ran:
        assert "skipped: no GPU" in markdown
    assert "met" in markdown
    for png in ("solver.png", "scaling.png", "extract.png", "stats.png", "moments.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = REAL_RESULTS.read_bytes() if REAL_RESULTS.exists() else None
    assert after == real_before, "the smoke run must not touch benchmarks/RESULTS.md"


@pytest.mark.slow
def test_smoke_moments_reports_every_variant(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    out = tmp_path / "results"
    args = ["--smoke", "--only", "moments", "--results-dir", str(out), "--json", str(json_path)]
    assert main([*args, "--work", str(tmp_path)]) == 0
    metrics = {r["metric"]: r["value"] for r in json.loads(json_path.read_text())["results"]}
    for variant in ("plain", "stats", "no_activations"):
        assert metrics[f"ratio_{variant}_default"] > 0
    assert metrics["product_flops_ratio_default"] > 0 and metrics["syrk_f64_gflops_default"] > 0
    assert metrics["moments_gflops_default"] > 0 and metrics["moments_syrk_ratio_default"] > 0
    assert "stats_extra_ms_per_image_default" in metrics and "product_share_default" in metrics
    # the embedded default: 17 tokens, p = 13 points x 64 channels
    assert "| default (embedded) | 16 | 17 x 832 |" in (out / "RESULTS.md").read_text()


def test_update_results_keeps_hand_written_text(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Results\n\n<!-- generated: solver -->\nold\n<!-- end generated: solver -->\n\n"
        "# Analysis\n\nwritten by hand\n"
    )
    update_results(path, {"solver": "new solver", "summary": "the summary", "stats": "stats"})
    text = path.read_text()
    assert "old" not in text and "new solver" in text and "written by hand" in text
    assert text.index("the summary") < text.index("new solver") < text.index("stats")
    assert text.index("stats") < text.index("# Analysis")
    update_results(path, {"solver": "newer"})
    assert "the summary" in path.read_text() and "newer" in path.read_text()


def test_results_are_validated() -> None:
    with pytest.raises(ValueError, match="not finite"):
        Result("solver", "x", float("nan"), "s")
    with pytest.raises(ValueError, match="not one of"):
        Result("nope", "x", 1.0, "s")
    assert Result("solver", "x", 0.8, "ratio", at_least(0.7)).to_json()["target"] == {"min": 0.7}


def test_only_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--only", "solver,gpu"]).only == ["solver", "gpu"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "solver,nope"])
    assert "unknown benchmark(s) nope" in capsys.readouterr().err


def test_a_child_reports_its_own_peak_rss_not_its_parents(tmp_path: Path) -> None:
    """``ru_maxrss`` keeps the parent's resident size across fork and exec; VmHWM does not."""
    import numpy as np

    from benchmarks._child import baseline, run_in_child

    held = np.ones(2**26)  # 512 MiB resident in this (the parent) process
    result = run_in_child(baseline, tmp_path)
    assert held[-1] == 1.0
    assert 0 < result["peak_rss_mb"] < 256


def test_a_capped_solver_store_repeats_its_samples_a_whole_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else the store's least-squares map is not the in-memory methods' (T error 2e-4 at 1M
    rows, measured before the fix)."""
    from benchmarks import bench_solver
    from benchmarks._results import Context

    monkeypatch.setattr(bench_solver, "available_bytes", lambda: 2 * 10**9)
    ctx = Context("full", tmp_path, tmp_path)
    for d in (384, 768, 1024):
        n_store, n_mem = bench_solver.n_samples_for(ctx, d)
        assert n_mem < n_store and n_store % n_mem == 0
        assert n_store * bench_solver.TOKENS >= 1_000_000


def test_product_flops_count_one_triangle() -> None:
    """The FLOPs a user needs: syrk's rows·p·(p+1) for every pair, not a GEMM's 2·rows·p²."""
    from benchmarks.bench_moments import pair_flops
    from rba_store.stats.moments import band_pairs

    widths = [64] * 13
    assert pair_flops(17, widths, band_pairs(13, None)) == 17 * 832 * 833
    assert pair_flops(5, [3, 4], ((0, 1),)) == 2 * 5 * 3 * 4


def test_machine_reference_rates_are_measured() -> None:
    from benchmarks._machine import blas_rates, summary

    rates = blas_rates(512, 64)
    assert rates["shape"] == [512, 64]
    assert rates["syrk_f64_gflops"] > 0 and rates["gemm_f64_gflops"] > 0
    machine = {
        "cpu": "cpu",
        "cores": 2,
        "memory_gb": 1.0,
        "gpu": None,
        "python": "3",
        "versions": {},
        "blas": [],
        "rates": rates,
        "loadavg": [0.0],
    }
    assert "syrk" in summary(machine) and "GFLOP/s" in summary(machine)
