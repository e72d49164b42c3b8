"""Scaling: time and peak RSS of ``fit`` and the statistics at N, 2N, 4N and 8N samples.

One synthetic store of 8N samples (4 capture points, 197 tokens) is written once; each size is
its first N·k samples (``--limit``), with N a whole number of shards (at least as many shards as
cores, so parallelism is already saturated at N). Each measurement runs in a fresh child process
(its own peak RSS). Time should grow linearly (ratio 2 per doubling), memory not at all.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks._child import run_in_child
from benchmarks._plots import line_plot
from benchmarks._results import Context, Figures, Section, at_most, fmt, table
from benchmarks._synthetic import write_store

RSS_RATIO_TARGET = 1.1
TOKENS = 197
FIXED_MMAP = "fit, fixed mmap threshold"
FIXED_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def fit_child(store: str, n_samples: int) -> dict[str, Any]:
    """``fit`` of span 0:1 on the first ``n_samples`` samples."""
    from rba_store.solve import FitOptions, fit_spans
    from rba_store.store.selection import SampleSelection

    options = FitOptions(
        spans=((0, 1),),
        selection=SampleSelection(limit=n_samples),
        backend="numpy",
        name=f"scaling-{n_samples}",
        overwrite=True,
    )
    start = time.perf_counter()
    fit_spans(store, options)
    return {"seconds": time.perf_counter() - start}


def stats_child(store: str, n_samples: int) -> dict[str, Any]:
    """All block statistics (with CKA) on the first ``n_samples`` samples (not saved)."""
    from rba_store.stats import compute_block_stats
    from rba_store.store.selection import SampleSelection

    start = time.perf_counter()
    compute_block_stats(store, selection=SampleSelection(limit=n_samples))
    return {"seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class Variant:
    """What is measured in the child, with which environment, at which multiples of N."""

    name: str
    child: Callable[..., dict[str, Any]]
    factors: tuple[int, ...]
    env: dict[str, str] = field(default_factory=dict)
    target: bool = True  # the RSS ratio carries the target


def _plot(
    ctx: Context,
    base: int,
    variants: list[Variant],
    seconds: dict[str, list[float]],
    rss: dict[str, list[float]],
) -> None:
    def series(values: dict[str, list[float]]) -> dict[str, tuple[list[int], list[float]]]:
        return {v.name: ([base * f for f in v.factors], values[v.name]) for v in variants}

    line_plot(
        ctx.plots / "scaling.png",
        "samples N",
        [("time (s)", series(seconds)), ("peak RSS (MB)", series(rss))],
        title="Scaling: time linear in N, memory flat",
        logx=True,
    )


def _label(factor: int) -> str:
    return "n" if factor == 1 else f"{factor}n"


def run(ctx: Context) -> Section:
    d, n_points, base = ctx.pick(smoke=(32, 4, 8), quick=(192, 4, 256), full=(192, 4, 1024))
    shard = ctx.pick(smoke=4, quick=64, full=128)
    base = max(base, shard * (os.cpu_count() or 1))
    repeats = ctx.pick_repeats(smoke=1, quick=1, full=3)
    factors = ctx.pick(smoke=(1, 2), quick=(1, 2, 4, 8), full=(1, 2, 4, 8))
    tokens = ctx.pick(smoke=17, quick=TOKENS, full=TOKENS)
    variants = [
        Variant("fit", fit_child, factors),
        Variant("stats", stats_child, factors),
    ]
    if ctx.size != "smoke":  # diagnostic: glibc's dynamic mmap threshold off (see the analysis)
        variants.append(
            Variant(FIXED_MMAP, fit_child, (factors[0], factors[-1]), FIXED_MMAP_ENV, False)
        )
    store = write_store(
        ctx.work / "scaling.zarr",
        base * factors[-1],
        d,
        tokens=tokens,
        n_points=n_points,
        shard_samples=shard,
        chunk_samples=shard // 4 or 1,
    )
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for _ in range(repeats):
            for factor in factors:
                for v in (v for v in variants if factor in v.factors):
                    n = base * factor
                    result = run_in_child(v.child, ctx.work, v.env, store=str(store), n_samples=n)
                    runs.setdefault((v.name, factor), []).append(result)
    finally:
        shutil.rmtree(store, ignore_errors=True)

    figures = Figures("scaling")
    seconds = {
        v.name: [statistics.median(r["seconds"] for r in runs[(v.name, f)]) for f in v.factors]
        for v in variants
    }
    rss = {
        v.name: [max(r["peak_rss_mb"] for r in runs[(v.name, f)]) for f in v.factors]
        for v in variants
    }
    rows = []
    for v in variants:
        key = v.name.split(" ")[0] if v.target else "fit_fixed_mmap"
        for i, f in enumerate(v.factors):
            n, label = base * f, _label(f)
            figures.add(f"{key}_seconds_{label}", seconds[v.name][i], "s")
            figures.add(f"{key}_peak_rss_mb_{label}", rss[v.name][i], "MB")
            figures.add(f"{key}_rows_per_s_{label}", n * tokens / seconds[v.name][i], "rows/s")
            previous = None
            if i:
                previous = seconds[v.name][i] / seconds[v.name][i - 1]
                step = f"{_label(v.factors[i - 1])}_to_{label}"
                figures.add(f"{key}_time_ratio_{step}", previous, "ratio")
            rows.append(
                [
                    v.name,
                    n,
                    n * tokens,
                    n // shard,
                    fmt(seconds[v.name][i]),
                    "—" if previous is None else fmt(previous, 2),
                    fmt(1e6 * seconds[v.name][i] / n),
                    fmt(rss[v.name][i]),
                    fmt(rss[v.name][i] / rss[v.name][0], 3),
                ]
            )
        ratio = rss[v.name][-1] / rss[v.name][0]
        target = at_most(RSS_RATIO_TARGET) if v.target else None
        figures.add(f"{key}_rss_ratio_{_label(v.factors[-1])}", ratio, "ratio", target)
    _plot(ctx, base, variants, seconds, rss)
    header = ["what", "samples", "rows", "shards", "s", "x previous", "µs/sample", "peak RSS MB"]
    markdown = "\n\n".join(
        [
            f"**What is measured:** `fit` (span 0:1, D = {d}) and all block statistics with CKA "
            f"(`compute_block_stats`, {n_points} points of {tokens} tokens x {d} channels, "
            f"p = {n_points * d}) on the first N, 2N, 4N, 8N samples of one synthetic store "
            f"(shards of {shard} samples), each in a fresh process; median of {repeats}. "
            "Linear time is ratio 2 per doubling; flat memory is a peak RSS ratio ≤ 1.1 from N "
            f"to 8N. *{FIXED_MMAP}* is a diagnostic: the same fit with "
            "`MALLOC_MMAP_THRESHOLD_=131072`, which turns off glibc's dynamic mmap threshold "
            "(no target).",
            table([*header, "RSS ÷ RSS(N)"], rows),
            "![scaling](plots/scaling.png)",
        ]
    )
    return Section("scaling", figures.results, markdown, ["scaling.png"])
