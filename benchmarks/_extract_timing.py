"""Timing one extraction case: alternating extractions and bare reference passes.

A reference pass runs the very same batches as the extraction (``plan.source.load`` then a plain
``model(x)`` under ``torch.inference_mode``), so the two differ only by what extraction adds:
capturing every block, copying into shard buffers, compressing and writing.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rba_store.extract import ExtractionPlan, run_extraction
from rba_store.store.info import store_info


@dataclass(frozen=True)
class ReferenceRun:
    """One reference pass: seconds spent loading the batches and running the bare model."""

    load_s: float
    forward_s: float

    @property
    def total_s(self) -> float:
        return self.load_s + self.forward_s


@dataclass(frozen=True)
class ExtractionRun:
    """One extraction into a scratch store, and what the store took on disk."""

    seconds: float
    bytes_stored: int
    compression_ratio: float | None


def shard_batches(plan: ExtractionPlan) -> list[list[tuple[int, int]]]:
    """Every shard's batches as extraction runs them: ``batch_size`` samples, within the shard."""
    layout, size = plan.layout, plan.options.batch_size
    batches: list[list[tuple[int, int]]] = []
    for shard_idx in range(layout.n_shards):
        first, last = layout.shard_rows(shard_idx)
        batches.append([(start, min(start + size, last)) for start in range(first, last, size)])
    return batches


def batch_ranges(plan: ExtractionPlan) -> list[tuple[int, int]]:
    """All batches ``(start, stop)`` in extraction order."""
    return [batch for shard in shard_batches(plan) for batch in shard]


def load(plan: ExtractionPlan, start: int, stop: int) -> torch.Tensor:
    return plan.source.load(start, stop, plan.preprocess).to(plan.options.device)


def time_reference(plan: ExtractionPlan, ranges: Sequence[tuple[int, int]]) -> ReferenceRun:
    """Load every batch and run the bare model on it, timing the two apart."""
    model = plan.loaded.module
    load_s = forward_s = 0.0
    with torch.inference_mode():
        for start, stop in ranges:
            t0 = time.perf_counter()
            x = load(plan, start, stop)
            t1 = time.perf_counter()
            model(x)
            t2 = time.perf_counter()
            load_s += t1 - t0
            forward_s += t2 - t1
    return ReferenceRun(load_s, forward_s)


def time_extraction(plan: ExtractionPlan, out: Path) -> ExtractionRun:
    """Extract into ``out`` (replaced if present); the library's own timing."""
    result = run_extraction(plan, out, overwrite=True)
    if result.samples_written != plan.layout.n_samples:
        raise RuntimeError(f"extraction wrote {result.samples_written} samples, not all")
    info = store_info(out)
    return ExtractionRun(result.seconds, info["bytes_stored"], info["compression_ratio"])


def warm_up(plan: ExtractionPlan, ranges: Sequence[tuple[int, int]]) -> None:
    """One untimed full batch through the bare model and the capture (allocator, kernels)."""
    x = load(plan, *ranges[0])
    with torch.inference_mode():
        plan.loaded.module(x)
    plan.capture(x)


@dataclass
class Timings:
    """Every run of one case; medians of them."""

    n_samples: int
    shard_samples: int
    n_shards: int
    extractions: list[ExtractionRun]
    references: list[ReferenceRun]
    loadavg_1m: float  # after the case; this run alone makes it about 2, more means competition

    @property
    def extract_s(self) -> float:
        return statistics.median(r.seconds for r in self.extractions)

    @property
    def load_forward_s(self) -> float:
        return statistics.median(r.total_s for r in self.references)

    @property
    def forward_s(self) -> float:
        return statistics.median(r.forward_s for r in self.references)

    @property
    def ratio(self) -> float:
        """Extraction ÷ (load + forward): the fair ratio."""
        return self.extract_s / self.load_forward_s

    @property
    def ratio_forward(self) -> float:
        """Extraction ÷ forward alone: the strict ratio."""
        return self.extract_s / self.forward_s

    @property
    def bytes_per_image(self) -> float:
        return self.extractions[-1].bytes_stored / self.n_samples


def measure(plan: ExtractionPlan, repeats: int, out: Path, keep: bool = False) -> Timings:
    """Alternate extractions (into ``out``) and reference passes, flipping their order every
    repetition; the last store is kept when ``keep``, else removed."""
    ranges = batch_ranges(plan)
    warm_up(plan, ranges)
    extractions: list[ExtractionRun] = []
    references: list[ReferenceRun] = []
    steps: list[Callable[[], None]] = [
        lambda: extractions.append(time_extraction(plan, out)),
        lambda: references.append(time_reference(plan, ranges)),
    ]
    for rep in range(repeats):
        for step in steps if rep % 2 == 0 else steps[::-1]:
            step()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    layout = plan.layout
    return Timings(
        layout.n_samples,
        layout.shard_samples,
        layout.n_shards,
        extractions,
        references,
        os.getloadavg()[0],
    )
