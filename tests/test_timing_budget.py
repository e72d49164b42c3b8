"""Issue 22, item 4: images/s timed on a small fixed budget, and honest progress with an ETA."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from rba_store.approx.evaluate import evaluate_variants, identity_variant
from rba_store.approx.select import SelectOptions, select_spans
from rba_store.approx.surgery import (
    TIMED_PASSES,
    Work,
    WorkTracker,
    expected_timing_seconds,
    measure_throughput,
    timing_batch,
)
from rba_store.cli.progress import LineProgress, WorkEta, WorkProgress, format_rate
from tests.conftest import plain_progress_on_a_clock
from tests.test_approx import run_cli


class Slow(torch.nn.Module):
    """A fake model that takes ``seconds_per_input`` per input (sleeping)."""

    def __init__(self, seconds_per_input: float) -> None:
        super().__init__()
        self.seconds_per_input = seconds_per_input
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        time.sleep(self.seconds_per_input * len(x))
        return x


# 1. the timing budget
def test_timing_stays_within_the_budget_on_a_slow_model() -> None:
    model = Slow(0.01)
    x = torch.ones(64, 3)
    budget = 0.5
    batch = timing_batch(budget, 0.01, len(x))
    assert batch == 8  # a warm-up and 5 passes of 8 inputs at 10 ms each fill 0.48 s
    start = time.perf_counter()
    result = measure_throughput(model, x[:batch], budget)
    took = time.perf_counter() - start
    assert took <= budget + 0.15 and result.seconds <= budget + 0.15
    assert 1 <= result.passes <= TIMED_PASSES and len(model.calls) == result.passes + 1
    assert result.images_per_s == pytest.approx(100, rel=0.3)  # 1 / 10 ms
    assert expected_timing_seconds(budget, batch, 0.01) == pytest.approx(0.48)


def test_a_pass_longer_than_the_budget_is_timed_once() -> None:
    model = Slow(0.2)
    result = measure_throughput(model, torch.ones(1, 3), budget_s=0.1)
    assert len(model.calls) == 1 and result.passes == 1 and result.batch == 1
    assert result.images_per_s == pytest.approx(5, rel=0.3)


def test_no_budget_means_no_timing() -> None:
    model = Slow(0.01)
    result = measure_throughput(model, torch.ones(4, 3), budget_s=0)
    assert result.images_per_s is None and not model.calls


def test_evaluate_times_each_variant_within_its_budget(small_store: Path) -> None:
    report = evaluate_variants(small_store, [identity_variant([(2, 3)])], time_budget=0.3)
    timing = report["timing"]
    assert timing["seconds"] <= 2 * (0.3 + 0.1)  # two models, a little slack each
    assert "at most 0.3 s per variant" in timing["how"] and timing["batch"] >= 1
    assert all(v["images_per_s"] > 0 for v in report["variants"])
    untimed = evaluate_variants(small_store, [identity_variant([(2, 3)])], time_budget=0)
    assert untimed["timing"]["seconds"] == 0
    assert all(v["images_per_s"] is None for v in untimed["variants"])


def test_time_budget_option(small_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        capsys, "evaluate", small_store, "--identity", "2:3", "--time-budget", "-1"
    )
    assert code == 2 and err.count("\n") == 1 and "--time-budget -1.0 is invalid" in err
    code, out, err = run_cli(
        capsys, "evaluate", small_store, "--identity", "2:3", "--time-budget", "0"
    )
    assert code == 0, err
    assert "img/s: not timed (--time-budget 0)" in out
    assert out.splitlines()[2].split()[-1] == "-"  # the original's img/s
    code, out, err = run_cli(capsys, "evaluate", small_store, "--identity", "2:3")
    assert code == 0, err
    assert "img/s: timed after the evaluation" in out and "at most 1 s per variant" in out


# 2. the ETA
def _synthetic_schedule() -> tuple[list[tuple[float, float, float]], float]:
    """7 models of 13, 12, 12, 11, 11, 10, 10 cost units on 4 batches, about 2 s of work per 13
    units (the first 3x slower, the others +-30%), then 7 timings of 1 s: (time, cost done,
    fixed seconds done) after each unit."""
    costs = [13, 12, 12, 11, 11, 10, 10]
    noise = itertools.cycle([1.3, 0.7, 1.0, 1.2, 0.8])
    now, cost, fixed, ticks = 0.0, 0.0, 0.0, []
    for batch in range(4):
        for i, c in enumerate(costs):
            now += 2.0 * c / 13 * (3.0 if batch == i == 0 else next(noise))
            cost += c
            ticks.append((now, cost, fixed))
    for _ in costs:
        now += 1.0
        fixed += 1.0
        ticks.append((now, cost, fixed))
    return ticks, now


def test_weighted_eta_is_within_2x_of_the_truth() -> None:
    ticks, end = _synthetic_schedule()
    total_cost = ticks[-1][1]
    eta = WorkEta()
    checked = 0
    for now, cost, fixed in ticks:
        left_fixed = 7.0 - fixed
        estimate = eta(Work("x", cost, total_cost, fixed, left_fixed), now)
        truth = end - now
        if estimate is None:
            continue
        assert truth / 2 <= estimate <= 2 * truth + 1e-9, (now, estimate, truth)
        checked += 1
    assert checked == len(ticks) - 1  # known from the second report on


def test_eta_is_unknown_until_a_rate_is_measured() -> None:
    eta = WorkEta()
    assert eta(Work("x", 1.0, 10.0), now=5.0) is None  # the first report: no rate yet
    assert eta(Work("x", 2.0, 10.0), now=6.0) == pytest.approx(8.0)
    assert eta(Work("x", 10.0, 10.0, 0.0, 3.0), now=7.0) == pytest.approx(3.0)


# 3. progress lines
def test_slow_rates_are_never_printed_as_zero() -> None:
    assert format_rate(1, 40, "model-batches") == "40 s per model-batch"
    assert format_rate(3, 20, "samples") == "0.15 samples/s"
    assert format_rate(500, 2, "tasks") == "250 tasks/s"
    assert "0.0" not in format_rate(1, 1e6, "samples")


def test_progress_lines_never_say_zero_per_second(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain_progress_on_a_clock(monkeypatch, 40.0)
    lines = LineProgress("evaluate", 14, "model-batches")
    for _ in range(3):
        lines.advance(1)
    with WorkProgress("evaluate:") as progress:
        tracker = WorkTracker(progress, cost_total=91.0)
        tracker.seconds_left = 7.0
        for i in range(1, 8):
            tracker.report(f"model {i}/7", cost=13.0)
    err = capsys.readouterr().err
    assert "0.0" not in err and "40 s per model-batch" in err
    work_lines = [line for line in err.splitlines() if "evaluate: model" in line]
    assert len(work_lines) == 7 and "ETA ?" in work_lines[0]
    assert "ETA 0 s" not in work_lines[1] and "% done" in work_lines[1]
    assert work_lines[-1].endswith("ETA 7 s")  # the timing budgets still to come


def test_select_reports_an_estimate_of_its_work(small_store: Path, tmp_path: Path) -> None:
    import shutil

    store = Path(shutil.copytree(small_store, tmp_path / "s.zarr"))
    reports: list[Work] = []
    options = SelectOptions(max_blocks=2, max_span=1, time_budget=0.1)
    selection = select_spans(store, options, progress=reports.append)
    assert reports and all(w.cost_done <= w.cost_total for w in reports)
    assert all(" step" in w.assumed and "test table" in w.assumed for w in reports[2:])
    assert [w.what for w in reports[:2]] == ["loading the model", "the maps of 12 candidate spans"]
    assert [w.what for w in reports[2:4]] == ["the original on the validation split"] * 2
    assert reports[4].what.startswith("step 1: candidate 1/")
    assert all(w.stage_left is not None and w.stage_left >= 0 for w in reports[2:])
    assert reports[-1].stage_left == pytest.approx(0)  # the last candidate of the last step
    assert len(selection.steps) <= 2


def test_select_lines_give_the_step_eta_and_the_estimate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain_progress_on_a_clock(monkeypatch, 10.0)
    assumed = "2-3 steps (4:6 leading), then the test table"
    with WorkProgress("select") as progress:
        for i in range(1, 4):  # 10 s per candidate of 10 units; 20 units left in the step
            work = Work(f"step 1: candidate {i}/5", 10.0 * i, 200.0, 0, 3.0, assumed, 50 - 10 * i)
            progress(work)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("rba-store: select step 1: candidate 1/5 (about 5% done)")
    assert lines[0].endswith("so far, step ETA ?, ETA ?")  # no rate yet
    # 30 s so far, 170 units left at 1 unit/s and 3 s of timing: 15% of the time is done
    assert "candidate 3/5 (about 15% done), 30 s so far" in lines[-1]
    assert lines[-1].endswith(f"step ETA 20 s, ETA 2 min 53 s (assuming {assumed})"), lines[-1]
