"""A serial breakdown of one extraction: each step alone in the main thread, nothing overlapped."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks._extract_timing import load, shard_batches
from rba_store import store as rs
from rba_store.extract import ExtractionPlan, shard_buffer


@dataclass(frozen=True)
class Breakdown:
    """Seconds of each step of one extraction done serially."""

    load_s: float
    capture_s: float
    copy_s: float
    write_s: float

    @property
    def total_s(self) -> float:
        return self.load_s + self.capture_s + self.copy_s + self.write_s


@contextmanager
def timed(totals: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the ``with`` block to ``totals[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - start


def profile(plan: ExtractionPlan, out: Path) -> Breakdown:
    """Do what one extraction does, step by step with nothing overlapping, and time each step."""
    totals: dict[str, float] = {}
    try:
        store = rs.Store.create(out, plan.description, plan.layout)
        for shard_idx, ranges in enumerate(shard_batches(plan)):
            first, last = plan.layout.shard_rows(shard_idx)
            buffer = shard_buffer(plan, shard_idx)
            for start, stop in ranges:
                with timed(totals, "load"):
                    x = load(plan, start, stop)
                with timed(totals, "capture"):
                    captured = plan.capture(x)
                with timed(totals, "copy"):
                    rows = slice(start - first, stop - first)
                    for k, point in enumerate(captured.points):
                        buffer[rs.h_name(k)][rows] = point.cpu().numpy()
                    buffer[rs.FEATURES][rows] = captured.features.cpu().numpy()
            with timed(totals, "write"):
                for name, values in buffer.items():
                    store.array(name)[first:last] = values
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return Breakdown(totals["load"], totals["capture"], totals["copy"], totals["write"])
