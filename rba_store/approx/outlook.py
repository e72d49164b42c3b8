"""How much work a greedy selection (``rba-store select``) still has, for its progress and ETA.

Cost units, as in :class:`rba_store.approx.surgery.Work`: one block (or map, or the stem and
head together) run on one input. What is done is counted exactly; what is left is estimated:
the step under way is known exactly, the later steps are not (how many blocks each removes is
only known once it is chosen), and the test table follows them.
"""

from __future__ import annotations

from typing import Any

from rba_store.approx.surgery import SpanMap, WorkTracker

Span = tuple[int, int]


def blocks_after(net: Any, point: int) -> int:
    """Cost units per input of running ``net`` from ``point`` on (blocks, plus the head)."""
    return sum(1 for _ in net.steps(point)) + 1


def occupied(span: Span, fold: bool = False) -> Span:
    """The points a map of ``span`` needs untouched: (a-1, b] when folded into block a."""
    a, b = span
    return (a - 1, b) if fold and a >= 1 else (a, b)


def overlaps(span: Span, chosen: list[SpanMap], fold: bool = False) -> bool:
    """Whether a candidate needs a point a chosen map removed (a folded one needs block a)."""
    return _overlaps(occupied(span, fold), [m.occupied for m in chosen])


def _overlaps(span: Span, taken: list[Span]) -> bool:
    a, b = span
    return any(a < end and start < b for start, end in taken)


def units_after(n_blocks: int, taken: list[Span], point: int) -> int:
    """:func:`blocks_after` of a network whose maps occupy ``taken``, without building it."""
    shorter = sum(b - a - 1 for a, b in taken if a >= point)
    return n_blocks - point - shorter + 1


class SelectOutlook:
    """The work a selection still has, as ``tracker``'s total: the step under way (exactly),
    the later steps (an estimate), then the test table of every step (the same cost per input
    as the validation split; its model takes ``setup_s`` to rebuild, and each variant is timed
    within the budget).

    How many blocks each step will remove is not known until it is chosen: the estimate is the
    mean of two paths. One keeps the candidate that leads this step, then removes one block
    per step; the other removes the longest span that fits (``max_span``) at every step, this
    one included while a span longer than the leader is still to be tried. Each later step of
    a path tries the candidates that will really be open then (not overlapping the spans
    removed before it, within the blocks left), and removes the middle one of those of its
    length."""

    def __init__(
        self,
        tracker: WorkTracker,
        n_val: int,
        options: Any,
        limit: int,
        setup_s: float,
        candidates: list[Span],
    ) -> None:
        self.tracker, self.n_val, self.options = tracker, n_val, options
        self.limit, self.setup_s = limit, setup_s
        self.candidates = candidates  # what every step tries (twice each with --maps both)
        self.history: list[int] = []  # blocks removed after each step so far

    def step(self, net: Any, trial_spans: list[Span], before: float = 0.0) -> None:
        """A step starts, trying ``trial_spans`` (after ``before`` cost units still to run)."""
        self.n_blocks = net.n_blocks
        self.taken = [m.occupied for m in net.maps]
        self.removed = sum(m.span[1] - m.span[0] for m in net.maps)
        if self.removed > (self.history[-1] if self.history else 0):
            self.history.append(self.removed)
        self.spans = trial_spans
        cost = self.step_cost(self.taken, trial_spans)
        self.tracker.stage_end = self.tracker.cost_done + before + cost
        self.leading(None, trial_spans)

    def step_cost(self, taken: list[Span], spans: list[Span]) -> float:
        """A step's cost: the pass to every point, then each candidate from its end."""
        tries = sum(units_after(self.n_blocks, taken, b) for _, b in spans)
        return (units_after(self.n_blocks, taken, 0) + tries) * self.n_val

    def open(self, taken: list[Span], removed: int) -> list[Span]:
        """The candidates a step tries after ``taken`` (``removed`` blocks gone)."""
        left, fold = self.limit - removed, self.options.fold
        return [
            s
            for s in self.candidates
            if s[1] - s[0] <= left and not _overlaps(occupied(s, fold), taken)
        ]

    def path(self, span: Span | None, length: int, spans: list[Span]) -> tuple[float, list[int]]:
        """The later steps' cost if this step keeps ``span`` (None: one of ``length`` blocks
        of ``spans``) and each later step removes ``length`` blocks (or the longest span open):
        their cost, and the blocks removed after each step of the path, this one first."""
        taken, removed = list(self.taken), self.removed
        cost, removed_after = 0.0, []
        while True:
            if span is None:
                if not spans:
                    break
                size = min(length, max(b - a for a, b in spans))
                same = [s for s in spans if s[1] - s[0] == size]
                span = same[len(same) // 2]
            taken.append(occupied(span, self.options.fold))
            removed += span[1] - span[0]
            removed_after.append(removed)
            spans = self.open(taken, removed)
            if not spans:
                break
            cost += self.step_cost(taken, spans)
            span = None
        return cost, removed_after

    def leading(self, span: Span | None, untried: list[Span]) -> None:
        """``span`` leads the step (None: none yet); ``untried``: the spans still to try."""
        kinds = 1 if self.options.maps == "identity" else 2  # a variant, and its identity
        full = self.n_blocks + 1  # the original's cost per input
        longest = max(self.options.max_span, 1)
        size = 0 if span is None else span[1] - span[0]
        longer = [s for s in untried if s[1] - s[0] > size]  # one of them may lead yet
        paths = [
            self.path(span, 1, self.spans),
            self.path(None, longest, longer) if longer else self.path(span, longest, []),
        ]
        future = table = 0.0
        steps: list[int] = []
        for cost, removed_after in paths:
            path = self.history + removed_after
            future += cost / len(paths)
            table += (full + kinds * sum(full - r for r in path)) * (self.n_val + 1) / len(paths)
            steps.append(len(path))
        tracker = self.tracker
        assert tracker.stage_end is not None
        tracker.cost_total = tracker.stage_end + future + table
        variants = 1 + kinds * sum(steps) / len(steps)
        tracker.seconds_left = variants * self.options.time_budget + self.setup_s
        fewest, most = min(steps), max(steps)
        count = f"{fewest}" if fewest == most else f"{fewest}-{most}"
        lead = "" if span is None else f" ({span[0]}:{span[1]} leading)"
        tracker.assumed = f"{count} step{'' if most == 1 else 's'}{lead}, then the test table"
