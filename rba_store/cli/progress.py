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
from typing import Any


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
    return f"ETA {elapsed * (total - done) / done:,.0f} s"


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
                f"{self.counted / elapsed:,.1f} {self.unit}/s{extra}, "
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


class CandidateProgress:
    """``select``'s progress: the step, the candidate and batch being tried, rate and ETA of
    the step (the number of steps is not known in advance). A rich bar on a terminal; plain
    lines (at most one every interval, across steps) otherwise."""

    def __init__(self, label: str = "select") -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.label, self.plain = label, plain_lines()
        self.interval = _interval()
        self.last = time.perf_counter()
        self.step, self.step_start = 0, self.last
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=self.plain or not console.is_terminal,
        )
        self.task = self.progress.add_task(label, total=1)

    def __enter__(self) -> CandidateProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(
        self, step: int, candidate: int, candidates: int, batch: int, batches: int
    ) -> None:
        now = time.perf_counter()
        if step != self.step:  # the first report of a step: its rate is not known yet
            self.step, self.step_start = step, now
            if self.plain:
                return
        done, total = (batch - 1) * candidates + candidate, candidates * batches
        where = f"{self.label} step {step}: candidate {candidate}/{candidates}" + (
            f", batch {batch}/{batches}" if batches > 1 else ""
        )
        if not self.plain:
            self.progress.update(self.task, description=where, completed=done, total=total)
            return
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.step_start, 1e-9)
        print(
            f"rba-store: {where} ({100 * done / total:.0f}% of the step), "
            f"{done / elapsed:,.1f} candidate-batches/s, step {_eta(done, total, elapsed)}",
            file=sys.stderr,
            flush=True,
        )


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
