"""Issue 22: the ETA of ``select`` and ``evaluate`` is an honest estimate from early on."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from rba_store.approx.evaluate import LaterVariants, evaluate_variants, identity_variant
from rba_store.approx.network import SplitNetwork
from rba_store.approx.outlook import SelectOutlook, blocks_after, overlaps, units_after
from rba_store.approx.select import SelectOptions
from rba_store.approx.surgery import SpanMap, Work, WorkTracker
from rba_store.cli.progress import WorkEta, WorkProgress
from tests.conftest import plain_progress_on_a_clock

Span = tuple[int, int]
N_VAL = 16


def _network(n_blocks: int = 12) -> SplitNetwork:
    model = nn.Module()
    model.blocks = nn.Sequential(*[nn.Identity() for _ in range(n_blocks)])
    model.embed_dim = 8
    return SplitNetwork(model)


def _spans(n_blocks: int = 12, max_span: int = 2) -> list[Span]:
    return [(a, a + k) for k in range(1, max_span + 1) for a in range(n_blocks - k + 1)]


def test_units_after_counts_what_the_network_runs() -> None:
    net = _network().with_map(SpanMap((4, 6))).with_map(SpanMap((8, 9)))
    taken = [m.occupied for m in net.maps]
    for point in (0, 4, 6, 7, 9, 12):
        assert units_after(12, taken, point) == blocks_after(net, point)


def _select(keep: list[int], leads: dict[int, list[int]]) -> tuple[list[Work], float]:
    """A greedy selection of 3 of 12 blocks (spans of 1-2 blocks), as ``select_spans`` reports
    it: step k keeps its candidate ``keep[k]``, and candidates ``leads[k]`` lead in turn (from
    the first). The reports, and the true total (the work done, then the test table of the
    path taken)."""
    reports: list[Work] = []
    tracker = WorkTracker(reports.append)
    options = SelectOptions(max_blocks=3, max_span=2, time_budget=0)
    spans = _spans()
    outlook = SelectOutlook(tracker, N_VAL, options, 3, 0.0, spans)
    net, removed, path = _network(), 0, []
    outlook.step(net, spans, before=blocks_after(net, 0) * N_VAL)
    tracker.report("the original", cost=blocks_after(net, 0) * N_VAL)
    for step, kept in enumerate(keep):
        trials = [s for s in spans if s[1] - s[0] <= 3 - removed and not overlaps(s, net.maps)]
        outlook.step(net, trials)
        leader = trials[0]
        for i, (_, b) in enumerate(trials):
            leader = trials[i] if i in leads[step] else leader
            outlook.leading(leader, trials[i + 1 :])
            first = blocks_after(net, 0) if i == 0 else 0
            tracker.report(f"step {step + 1}", cost=(blocks_after(net, b) + first) * N_VAL)
        net = net.with_map(SpanMap(trials[kept]))
        removed += trials[kept][1] - trials[kept][0]
        path.append(removed)
    table = (13 + 2 * sum(13 - r for r in path)) * (N_VAL + 1)  # the variants of each step
    return reports, tracker.cost_done + table


@pytest.mark.parametrize(
    ("keep", "leads", "exact_from"),
    [
        ([16, 0], {0: [0, 16], 1: [0]}, 17),  # 4:6, chosen late (as on ViT-B), then one block
        ([0, 0, 0], {0: [0], 1: [0], 2: [0]}, None),  # one block at a time
        ([16, 3], {0: [0, 16], 1: [0, 3]}, 17),
        ([3, 0, 0], {0: [0, 3], 1: [0], 2: [0]}, None),
    ],
)
def test_select_estimate_is_within_2x_of_the_work_really_left(
    keep: list[int], leads: dict[int, list[int]], exact_from: int | None
) -> None:
    reports, total = _select(keep, leads)
    ratios = []
    for k, work in enumerate(reports[:-1]):
        estimate, truth = work.cost_total - work.cost_done, total - work.cost_done
        ratios.append(estimate / truth)
        if exact_from is not None and k >= 1 + exact_from:  # the span kept leads
            assert estimate == pytest.approx(truth), (k, work)
    assert min(ratios) >= 0.5 and max(ratios) <= 2.0, ratios
    assert reports[-1].cost_total - reports[-1].cost_done == pytest.approx(
        total - reports[-1].cost_done
    )


def test_select_says_what_its_estimate_assumes() -> None:
    reports, _ = _select([16, 0], {0: [0, 16], 1: [0]})
    assert reports[0].assumed == "2-3 steps, then the test table"
    assert reports[2].assumed == "2-3 steps (0:1 leading), then the test table"
    assert reports[20].assumed == "2 steps (4:6 leading), then the test table"


def test_a_measured_rate_leaves_out_the_setup() -> None:
    eta = WorkEta()
    assert eta(Work("loading the model", 0, 0), now=0.0) is None  # no work known yet
    assert Work("loading the model", 0, 0).fraction == 0
    assert eta(Work("the maps", 0, 100), now=28.0) is None  # setup: no cost done
    assert eta(Work("model 1/2", 10, 100), now=30.0) == pytest.approx(90 / 5)  # 10 units in 2 s


def test_a_first_pass_gives_the_eta_until_a_rate_is_measured() -> None:
    eta = WorkEta()
    assert eta(Work("loading the model", 0, 100), now=0.0) is None
    # timed on one input (2 s, fixed): 0.1 s per unit, until the batches measure a rate
    assert eta(Work("timed", 0, 100, 2.0, 5.0, unit_seconds=0.1), now=30.0) == pytest.approx(15)
    # the first unit of work carries the warm-up: still the first pass's 0.1 s per unit
    first = Work("model 1/3", 10, 100, 2.0, 5.0, unit_seconds=0.1)
    assert eta(first, now=33.0) == pytest.approx(90 * 0.1 + 5)
    # then 20 units in 4 s: 0.2 s per unit
    assert eta(Work("model 2/3", 30, 100, 2.0, 5.0), now=37.0) == pytest.approx(70 * 0.2 + 5)


def test_the_timing_budgets_count_in_the_share_done(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain_progress_on_a_clock(monkeypatch, 10.0)
    with WorkProgress("evaluate:") as progress:
        progress(Work("model 1/2", 50, 100, 0, 20))
        progress(Work("model 2/2", 100, 100, 0, 20))  # all evaluated; 20 s of timing to come
        progress(Work("timing model 1/2", 100, 100, 10, 10))
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].endswith("model 2/2 (50% done), 20 s so far, ETA 20 s"), lines[1]
    assert lines[2].endswith("timing model 1/2 (75% done), 30 s so far, ETA 10 s"), lines[2]


def test_evaluate_knows_its_whole_work_before_making_the_later_variants(
    small_store: Path,
) -> None:
    reports: list[Work] = []
    made_after: list[int] = []

    def make() -> list:
        made_after.append(len(reports))
        return [identity_variant([(3, 4)])]

    later = LaterVariants([1], make)
    evaluate_variants(
        small_store, [identity_variant([(2, 3)])], later=later, progress=reports.append
    )
    before = reports[: made_after[0]]
    assert before[-1].what == "the maps of 1 more variants"
    assert before[-1].unit_seconds is not None and before[-1].unit_seconds > 0
    assert before[-1].seconds_left > 0  # the timing budgets
    # the total known before the variants are made is the work really done
    assert before[-1].cost_total == pytest.approx(reports[-1].cost_done)
    assert reports[-1].cost_done == pytest.approx(reports[-1].cost_total)
