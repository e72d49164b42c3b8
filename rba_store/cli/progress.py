"""Progress on stderr: a rich bar for extraction, Dask's bar for the analyses (terminals only)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any


class ProgressBar:
    """A rich progress bar on stderr (images/s, MB/s, ETA); silent when stderr is not a terminal."""

    def __init__(self, total: int, done: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.enabled = console.is_terminal
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
        rate = f"{self.samples / elapsed:,.0f} img/s {self.nbytes / elapsed / 2**20:,.1f} MB/s"
        self.progress.update(self.task, advance=samples, rate=rate)


def dask_progress() -> Any:
    """A Dask progress bar on stderr for the local scheduler, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr)
