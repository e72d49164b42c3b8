"""Extraction time ÷ bare forward time, for the same model, batches and data (issue 2).

Every case is planned once with :func:`rba_store.extract.plan_extraction`, then measured
``REPEATS`` times, alternating an extraction (``run_extraction`` into a temporary store) with a
reference pass over the very same batches: ``plan.source.load`` then a plain ``model(x)`` under
``torch.inference_mode``. The order flips on every repetition (E R, R E, E R) so that drift of a
noisy machine hits both sides alike; the table gives medians.

Extraction loads its data too, so the fair ratio is ``extract / (load + forward)``; the ratio
against the forward pass alone is the stricter one. The target is a ratio of at most 1.15.

``--profile`` adds a serial breakdown of one extraction's work, each step timed alone in the
main thread: loading, the capturing forward pass, copying into the shard buffer (with the cast to
the store dtype) and writing the shards with zarr.

Run from the repository root::

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_extract --quick --json bench.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rba_store import schema
from rba_store.extract import ExtractionPlan, ExtractOptions, plan_extraction, run_extraction
from rba_store.info import store_info

TARGET_RATIO = 1.15
REPEATS = 3
VIT_TINY = "vit_tiny_patch16_224"
VIT_TINY_LIMIT = {True: 256, False: None}  # quick: 256 samples; full: the whole train split


@dataclass(frozen=True)
class Case:
    """One extraction configuration to measure."""

    name: str
    model: str | None
    limit: int | None
    batch_size: int
    codec: str = "blosc-zstd"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return f"{self.name} {self.dtype} {self.codec}"

    def options(self) -> ExtractOptions:
        return ExtractOptions(
            model=self.model,
            data="digits",
            limit=self.limit,
            batch_size=self.batch_size,
            codec=self.codec,
            dtype=self.dtype,
        )


def make_cases(quick: bool) -> list[Case]:
    """The embedded default and vit_tiny at 224 px, compressed and not, plus vit_tiny float16."""
    vit_limit = VIT_TINY_LIMIT[quick]
    return [
        Case("default", None, None, 64, "blosc-zstd"),
        Case("default", None, None, 64, "none"),
        Case("vit_tiny", VIT_TINY, vit_limit, 32, "blosc-zstd"),
        Case("vit_tiny", VIT_TINY, vit_limit, 32, "none"),
        Case("vit_tiny", VIT_TINY, vit_limit, 32, "blosc-zstd", "float16"),
    ]


# -- timing -------------------------------------------------------------------------------------


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
    """One extraction into a temporary store, and what the store took on disk."""

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


def time_extraction(plan: ExtractionPlan) -> ExtractionRun:
    """Extract into a fresh temporary store (removed afterwards); the library's own timing."""
    with tempfile.TemporaryDirectory(prefix="rba-bench-") as tmp:
        out = Path(tmp) / "store"
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


# -- one case -----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """Every run of one case and the figures derived from their medians."""

    case: Case
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

    @property
    def compression_ratio(self) -> float | None:
        return self.extractions[-1].compression_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "case": asdict(self.case),
            "n_samples": self.n_samples,
            "shard_samples": self.shard_samples,
            "n_shards": self.n_shards,
            "extract_s": self.extract_s,
            "load_forward_s": self.load_forward_s,
            "forward_s": self.forward_s,
            "ratio": self.ratio,
            "ratio_forward": self.ratio_forward,
            "bytes_per_image": self.bytes_per_image,
            "compression_ratio": self.compression_ratio,
            "loadavg_1m": self.loadavg_1m,
            "runs": {
                "extract_s": [r.seconds for r in self.extractions],
                "load_s": [r.load_s for r in self.references],
                "forward_s": [r.forward_s for r in self.references],
            },
        }


def measure(case: Case, plan: ExtractionPlan, repeats: int = REPEATS) -> CaseResult:
    """Alternate extractions and reference passes, flipping their order every repetition."""
    ranges = batch_ranges(plan)
    warm_up(plan, ranges)
    extractions: list[ExtractionRun] = []
    references: list[ReferenceRun] = []
    steps: list[Callable[[], None]] = [
        lambda: extractions.append(time_extraction(plan)),
        lambda: references.append(time_reference(plan, ranges)),
    ]
    for rep in range(repeats):
        order = steps if rep % 2 == 0 else steps[::-1]
        for step in order:
            step()
    return CaseResult(
        case,
        plan.layout.n_samples,
        plan.layout.shard_samples,
        plan.layout.n_shards,
        extractions,
        references,
        os.getloadavg()[0],
    )


# -- serial breakdown (--profile) ---------------------------------------------------------------


@dataclass(frozen=True)
class Breakdown:
    """One extraction's work done serially in the main thread, each step timed alone."""

    case: Case
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


def _buffer(plan: ExtractionPlan, first: int, last: int) -> dict[str, np.ndarray]:
    """A shard buffer like the extractor's: every array's rows ``[first, last)``."""
    layout, rows = plan.layout, last - first
    buffer = {
        schema.h_name(k): np.empty((rows, p.n_tokens, p.n_channels), layout.dtype)
        for k, p in enumerate(layout.points)
    }
    buffer[schema.FEATURES] = np.empty((rows, layout.n_features), layout.dtype)
    buffer[schema.LABEL] = plan.source.labels[first:last]
    buffer[schema.SAMPLE_ID] = np.asarray(plan.source.sample_ids[first:last], dtype=str)
    return buffer


def profile(case: Case, plan: ExtractionPlan) -> Breakdown:
    """Do what one extraction does, step by step with nothing overlapping, and time each step."""
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rba-bench-") as tmp:
        group = schema.create_store(Path(tmp) / "store", plan.description, plan.layout)
        for shard_idx, ranges in enumerate(shard_batches(plan)):
            first, last = plan.layout.shard_rows(shard_idx)
            buffer = _buffer(plan, first, last)
            for start, stop in ranges:
                with timed(totals, "load"):
                    x = load(plan, start, stop)
                with timed(totals, "capture"):
                    captured = plan.capture(x)
                with timed(totals, "copy"):
                    rows = slice(start - first, stop - first)
                    for k, point in enumerate(captured.points):
                        buffer[schema.h_name(k)][rows] = point.cpu().numpy()
                    buffer[schema.FEATURES][rows] = captured.features.cpu().numpy()
            with timed(totals, "write"):
                for name, values in buffer.items():
                    group[name][first:last] = values
    return Breakdown(case, totals["load"], totals["capture"], totals["copy"], totals["write"])


# -- report -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cpu",
        "loadavg": list(os.getloadavg()),
    }


def _model_label(case: Case) -> str:
    return "default (embedded)" if case.model is None else case.model


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_table(results: Sequence[CaseResult]) -> str:
    header = (
        "| model | samples | batch | shards | dtype | codec | extract s | load+fwd s | fwd s "
        "| ratio (load+fwd) | ratio (fwd) | KiB/image | compression |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        c = r.case
        lines.append(
            f"| {_model_label(c)} | {r.n_samples} | {c.batch_size} | "
            f"{r.n_shards} x {r.shard_samples} | {c.dtype} | {c.codec} | {r.extract_s:.2f} | "
            f"{r.load_forward_s:.2f} | {r.forward_s:.2f} | **{r.ratio:.2f}** | "
            f"{r.ratio_forward:.2f} | {r.bytes_per_image / 1024:.1f} | "
            f"{_fmt_ratio(r.compression_ratio)} |"
        )
    return "\n".join(lines)


def breakdown_table(breakdowns: Sequence[Breakdown]) -> str:
    header = "| model | dtype | codec | load s | capture s | copy s | write s | serial sum s |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for b in breakdowns:
        c = b.case
        lines.append(
            f"| {_model_label(c)} | {c.dtype} | {c.codec} | {b.load_s:.2f} | {b.capture_s:.2f} "
            f"| {b.copy_s:.2f} | {b.write_s:.2f} | {b.total_s:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_extract",
        description="Extraction time ÷ bare forward time (median of alternating runs).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="vit_tiny on 256 samples instead of all 1437"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--profile", action="store_true", help="also time each step of an extraction serially"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine()
    results: list[CaseResult] = []
    breakdowns: list[Breakdown] = []
    for case in make_cases(args.quick):
        plan = plan_extraction(case.options())
        results.append(measure(case, plan))
        if args.profile:
            breakdowns.append(profile(case, plan))
        elapsed = time.perf_counter() - started
        print(f"measured {case.label} ({elapsed:.0f} s so far)", flush=True)
    info["loadavg_after"] = list(os.getloadavg())
    report = [
        f"machine: {info['cpus']} CPUs, torch {info['torch']} with {info['torch_threads']} "
        f"threads; load average {info['loadavg'][0]:.2f} before, "
        f"{info['loadavg_after'][0]:.2f} after",
        "",
        results_table(results),
    ]
    if breakdowns:
        report += ["", breakdown_table(breakdowns)]
    print("\n".join(report))
    if args.json is not None:
        payload = {
            "benchmark": "extract",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "repeats": REPEATS,
            "target_ratio": TARGET_RATIO,
            "machine": info,
            "seconds": time.perf_counter() - started,
            "results": [r.to_json() for r in results],
            "breakdown": [asdict(b) | {"total_s": b.total_s} for b in breakdowns],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
