"""Progress on stderr: a rich bar on a terminal; plain lines with rate and ETA otherwise.

In a batch job or a log file (stderr not a terminal), or with ``--verbose``, long commands print
one line every ``$RBA_STORE_PROGRESS_SECONDS`` seconds (default 10), e.g.
``rba-store: extract 512/1077 samples (48%), 320 img/s, 12.3 MB/s, ETA 2 s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rba_store.approx.surgery import Work


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("RBA_STORE_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def plain_lines() -> bool:
    """Whether progress is printed as plain lines (stderr not a terminal, or ``--verbose``)."""
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    return verbose or not sys.stderr.isatty()


def _eta(done: float, total: float, elapsed: float) -> str:
    if done <= 0 or total <= done:
        return "ETA 0 s" if total <= done else "ETA ?"
    return f"ETA {duration(elapsed * (total - done) / done)}"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 01 min``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 90:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_rate(count: float, elapsed: float, unit: str) -> str:
    """``12 samples/s``, ``0.25 samples/s``, or ``40 s per sample`` when slower than 1 every
    10 s: never a rate that rounds to 0 while work is being done."""
    rate = count / max(elapsed, 1e-9)
    if rate >= 10:
        return f"{rate:,.0f} {unit}/s"
    if rate >= 0.1:
        return f"{rate:.2g} {unit}/s"
    if count <= 0:
        return f"? {unit}/s"
    one = unit[:-2] if unit.endswith(("ches", "shes", "sses")) else unit.removesuffix("s")
    return f"{duration(elapsed / count)} per {one}"


class LineProgress:
    """``advance(n)``: prints ``label done/total unit (pct), rate, ETA`` at most every interval."""

    def __init__(self, label: str, total: int, unit: str, done: int = 0) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, done
        self.start = self.last = time.perf_counter()
        self.counted = 0  # advanced in this run (the rate ignores what was done before)
        self.interval = _interval()

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.counted += n
        now = time.perf_counter()
        if now - self.last >= self.interval:  # no line for a command shorter than that
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            pct = 100 * self.done / max(self.total, 1)
            print(
                f"rba-store: {self.label} {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{format_rate(self.counted, elapsed, self.unit)}{extra}, "
                f"{_eta(self.counted, self.counted + self.total - self.done, elapsed)}",
                file=sys.stderr,
                flush=True,
            )


class ProgressBar:
    """Extraction progress: a rich bar (images/s, MB/s, ETA) on a terminal, plain lines else."""

    def __init__(self, total: int, done: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.lines = LineProgress(label, total, "samples", done) if plain_lines() else None
        self.enabled = console.is_terminal and self.lines is None
        self.start = time.perf_counter()
        self.samples = self.nbytes = 0
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )
        self.task = self.progress.add_task(label, total=total, completed=done, rate="")

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, samples: int, nbytes: int) -> None:
        self.samples += samples
        self.nbytes += nbytes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        mb_s = self.nbytes / elapsed / 2**20
        if self.lines is not None:
            self.lines.advance(samples, f", {mb_s:,.1f} MB/s")
            return
        rate = f"{self.samples / elapsed:,.0f} img/s {mb_s:,.1f} MB/s"
        self.progress.update(self.task, advance=samples, rate=rate)


class WorkEta:
    """Remaining seconds of cost-weighted work (:class:`rba_store.approx.surgery.Work`): the
    cost left at the rate measured so far (time spent on work of fixed duration left out), plus
    the fixed-duration work still to come. Until a rate is measured, the work's own
    ``unit_seconds`` (from a first pass), else None.

    The rate is measured from the last report before any cost was done (what came before, and
    setup reported without cost, took a time that says nothing of the rate), and from the
    second mark once two units of work have been done after it: the first unit carries the
    warm-up (first forward passes, loading), which would inflate the estimate; with
    ``unit_seconds`` known, the first unit alone gives no rate."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []  # time, cost, fixed seconds
        self.rate: float | None = None  # cost per second
        self.prior: float | None = None  # seconds per unit, before a rate is measured

    def seconds_for(self, cost: float) -> float | None:
        """Seconds that ``cost`` units take at the rate measured so far (or the prior)."""
        if self.rate is not None:
            return cost / self.rate
        return None if self.prior is None else cost * self.prior

    def __call__(self, work: Work, now: float) -> float | None:
        if work.cost_total <= 0:
            return None  # setting up: the work is not known yet
        left = max(work.cost_total - work.cost_done, 0.0)
        mark = (now, work.cost_done, work.seconds_done)
        self.prior = work.unit_seconds if work.unit_seconds is not None else self.prior
        if len(self.marks) == 1 and work.cost_done == self.marks[0][1]:
            self.marks[0] = mark  # nothing done since: the rate starts here
        elif not self.marks or (len(self.marks) == 1 and work.cost_done > self.marks[0][1]):
            self.marks.append(mark)  # the first report, and the first with cost done after it
        base = self.marks[1] if len(self.marks) > 1 and mark[1] > self.marks[1][1] else None
        start, cost_start, fixed_start = base or self.marks[0]
        cost = work.cost_done - cost_start
        busy = (now - start) - (work.seconds_done - fixed_start)
        if cost > 0 and busy > 0 and (base is not None or self.prior is None):
            self.rate = cost / busy  # with a prior, the first unit's warm-up is not a rate
        if left == 0:
            return work.seconds_left
        seconds = self.seconds_for(left)
        return None if seconds is None else seconds + work.seconds_left


class WorkProgress:
    """Progress of ``evaluate`` and ``select`` (``label``, e.g. ``evaluate:``, is put before
    what is being done): what is being done (model i/n, step and candidate i/n, timing), the
    share of the time done (of the cost-weighted work until an ETA is known), and an ETA from
    the rate of that work (an estimate, saying what it assumes, when the total is: select's
    later steps). A rich bar on a terminal; plain lines (at most one every interval)
    otherwise."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.label, self.plain = label, plain_lines()
        self.interval = _interval()
        self.start = self.last = time.perf_counter()
        self.eta = WorkEta()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
            disable=self.plain or not console.is_terminal,
        )
        self.task = self.progress.add_task(label, total=1.0, eta="")

    def __enter__(self) -> WorkProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, work: Work) -> None:
        now = time.perf_counter()
        left = self.eta(work, now)
        eta = eta_text(left, work)
        if work.stage_left is not None and work.assumed:
            stage = self.eta.seconds_for(work.stage_left)
            eta = f"step ETA {'?' if stage is None else duration(stage)}, {eta}"
        where = f"{self.label} {work.what}"
        elapsed = now - self.start
        share = work.fraction if left is None else elapsed / max(elapsed + left, 1e-9)
        if not self.plain:
            self.progress.update(self.task, description=where, completed=share, eta=eta)
            return
        if now - self.last < self.interval:
            return
        self.last = now
        done = f"{'about ' if work.assumed else ''}{100 * share:.0f}% done"
        print(
            f"rba-store: {where} ({done}), {duration(elapsed)} so far, {eta}",
            file=sys.stderr,
            flush=True,
        )


def eta_text(eta: float | None, work: Work) -> str:
    if eta is None:
        return "ETA ?"
    if work.assumed:
        return f"ETA {duration(eta)} (assuming {work.assumed})"
    return f"ETA {duration(eta)}"


def step_progress(label: str, unit: str = "steps") -> Any:
    """A ``progress(done, total)`` callback printing plain lines, or None on a terminal."""
    if not plain_lines():
        return None
    state: dict[str, LineProgress] = {}

    def report(done: int, total: int) -> None:
        lines = state.setdefault("lines", LineProgress(label, total, unit))
        lines.advance(done - lines.done)

    return report


def dask_progress(label: str = "tasks") -> Any:
    """Dask's progress bar on a terminal; plain lines (tasks done, rate, ETA) otherwise."""
    if plain_lines():
        return _DaskLines(label)
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar as DaskBar

    return DaskBar(out=sys.stderr)


def _dask_callback() -> type:
    from dask.callbacks import Callback

    return Callback


class _DaskLines:
    """A Dask callback that prints plain progress lines for the local scheduler."""

    def __init__(self, label: str) -> None:
        self.label = label
        callback = _dask_callback()
        outer = self

        class Lines(callback):  # type: ignore[misc, valid-type]
            def _start_state(self, dsk: Any, state: Any) -> None:
                outer.lines = LineProgress(
                    outer.label,
                    len(state["ready"])
                    + len(state["waiting"])
                    + len(state["running"])
                    + len(state["finished"]),
                    "tasks",
                )

            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
                outer.lines.advance(1)

        self.callback = Lines()

    def __enter__(self) -> _DaskLines:
        self.callback.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.callback.__exit__(*exc)
