"""Modularity: time and peak RSS of the modularity curve at N, 2N and 4N samples.

One labelled synthetic store of 4N samples (64 channels like the embedded default, 5 tokens so
that reading is small beside the n² neighbour search; 4 points, 13 with ``full``; N = 4000,
8000 with ``full``) is written once; each size is its first N·f samples (``--limit``), measured
in a fresh child process (its own peak RSS). The exact k-NN is n² work (one GEMM per tile and
a partial sort), so time should grow 4x per doubling once the fixed costs (interpreter, imports,
reading) are small; memory should grow only by what is kept per sample (the points go one after
the other): one point's unit vectors (n x c float64, in the shard parts and stacked: about
2·n·c·8 bytes) and the neighbours (n x k indices and similarities), the tiles being fixed.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from typing import Any

import numpy as np

from benchmarks._child import run_in_child
from benchmarks._plots import line_plot
from benchmarks._results import Context, Figures, Section, fmt, table
from benchmarks._synthetic import write_store

K = 10
N_CLASSES = 10


def labelled_synthetic_store(ctx: Context, name: str, n: int, d: int, tokens: int, points: int):  # type: ignore[no-untyped-def]
    """A synthetic store (see ``benchmarks._synthetic``) with labels 0..9 in turn."""
    from rba_store.store import LABEL, Store

    shard = ctx.pick(smoke=32, quick=512, full=1024)
    path = write_store(
        ctx.work / name,
        n,
        d,
        tokens=tokens,
        n_points=points,
        shard_samples=shard,
        chunk_samples=shard // 4,
    )
    Store.open(path, "r+").array(LABEL)[:] = np.arange(n, dtype=np.int64) % N_CLASSES
    return path


def modularity_child(store: str, n_samples: int) -> dict[str, Any]:
    """The modularity curve of every point on the first ``n_samples`` samples (not saved)."""
    from rba_store.readings.modularity import run_modularity
    from rba_store.store import SampleSelection

    # warm-up on a few samples: lazy imports and the first Dask graph are not the n² work
    run_modularity(store, k=K, selection=SampleSelection(limit=64), backend="numpy", save=False)
    start = time.perf_counter()
    run_modularity(
        store, k=K, selection=SampleSelection(limit=n_samples), backend="numpy", save=False
    )
    return {"seconds": time.perf_counter() - start}


def idle_child(store: str, n_samples: int) -> dict[str, Any]:
    """The same imports and an opened store, no work: the child's own fixed memory."""
    from rba_store.readings.modularity import run_modularity  # noqa: F401
    from rba_store.store import Store

    Store.open(store)
    return {"seconds": 0.0}


def run(ctx: Context) -> Section:
    base = ctx.pick(smoke=64, quick=4000, full=8000)
    d, tokens, points = ctx.pick(smoke=(16, 5, 4), quick=(64, 5, 4), full=(64, 5, 13))
    factors = (1, 2, 4)
    repeats = ctx.pick_repeats(smoke=1, quick=3, full=3)
    store = labelled_synthetic_store(ctx, "modularity.zarr", base * factors[-1], d, tokens, points)
    try:
        idle = run_in_child(idle_child, ctx.work, store=str(store), n_samples=base)
        runs = {
            f: [
                run_in_child(modularity_child, ctx.work, store=str(store), n_samples=base * f)
                for _ in range(repeats)
            ]
            for f in factors
        }
    finally:
        shutil.rmtree(store, ignore_errors=True)
    figures = Figures("modularity")
    seconds = [statistics.median(r["seconds"] for r in runs[f]) for f in factors]
    rss = [max(r["peak_rss_mb"] for r in runs[f]) for f in factors]
    figures.add("idle_child_rss_mb", idle["peak_rss_mb"], "MB")
    rows = []
    for i, f in enumerate(factors):
        n = base * f
        kept_mb = (2 * n * d * 8 + 2 * n * K * 16) / 2**20
        figures.add(f"seconds_n{n}", seconds[i], "s")
        figures.add(f"peak_rss_mb_n{n}", rss[i], "MB")
        figures.add(f"us_per_pair_n{n}", 1e6 * seconds[i] / (n * n * points), "µs")
        exponent = None
        if i:
            exponent = math.log2(seconds[i] / seconds[i - 1])
            figures.add(f"time_exponent_to_n{n}", exponent, "exponent")
            figures.add(f"rss_growth_mb_to_n{n}", rss[i] - rss[i - 1], "MB")
        rows.append(
            [
                n,
                fmt(seconds[i]),
                "—" if exponent is None else f"{exponent:.2f}",
                fmt(1e9 * seconds[i] / (n * n * points)),
                fmt(rss[i]),
                fmt(rss[i] - idle["peak_rss_mb"]),
                fmt(kept_mb),
            ]
        )
    figures.add("rss_ratio_4n", rss[-1] / rss[0], "ratio")
    sizes = [base * f for f in factors]
    line_plot(
        ctx.plots / "modularity.png",
        "samples N",
        [
            ("time (s)", {"modularity": (sizes, seconds)}),
            ("peak RSS (MB)", {"modularity": (sizes, rss)}),
        ],
        title="Modularity: time ~ N², memory ~ flat",
        logx=True,
    )
    header = [
        "samples N",
        "s",
        "time exponent (log2 of the ratio per doubling)",
        "ns per pair and point",
    ]
    header += ["peak RSS MB", "over the idle child", "vectors + neighbours kept (model), MB"]
    markdown = "\n\n".join(
        [
            f"**What is measured:** `run_modularity` (k = {K}, class token, every one of {points} "
            f"points, NumPy, not saved) on the first N, 2N, 4N samples of one labelled synthetic "
            f"store ({tokens} tokens x {d} channels, {N_CLASSES} classes), each in a fresh "
            f"process after a warm-up on 64 samples; median of {repeats}. Exact k-NN is n² pairs "
            "per point: a time exponent of 2 per doubling. The idle child (same imports, the "
            "store opened, no work) has a peak "
            f"RSS of {idle['peak_rss_mb']:.0f} MB. The last column is what the model of the "
            "memory says grows with N: one point's unit vectors twice (shard parts and the "
            "stacked copy, 2·n·c·8 bytes) and the neighbours (2·n·k·16 bytes); the tiles "
            "(1024 x 1024 float64 and their candidates) are the same at every N.",
            table(header, rows),
            "![modularity](plots/modularity.png)",
        ]
    )
    return Section("modularity", figures.results, markdown, ["modularity.png"])
