"""Probe: the whole diffused-redundancy grid ÷ one plain read of the store.

A labelled synthetic store shaped like the embedded default (13 points x 17 tokens x 64 channels;
``full``: 384 channels, ViT-S wide) and a smaller evaluation store of the same "model". Timed in
this process, median of the repeats:
  - read: every shard of every h_k read and decompressed with the same task layout, nothing else;
  - moments: the one pass over the training rows (joint moments of [class token | one-hot]);
  - grid: every probe of the default grid (7 fractions x 3 seeds of random subsets and
    projections, top and bottom principal components, the full layer) of every point, from the
    moments, scored on the evaluation rows (already in memory);
  - probe: ``run_probe`` end to end (moments, evaluation rows read, grid; not saved).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._results import Context, Figures, Section, fmt, table
from benchmarks.bench_modularity import N_CLASSES, labelled_synthetic_store
from benchmarks.bench_stats import read_all
from rba_store.readings.probe import (
    FRACTIONS,
    KINDS,
    RIDGE,
    SEEDS,
    PointSystem,
    eval_store_rows,
    probe_grid,
    run_probe,
    train_moments,
)
from rba_store.store import LABEL, Store


def _median(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(ctx: Context) -> Section:
    n, n_eval = ctx.pick(smoke=(96, 48), quick=(4000, 1000), full=(4000, 1000))
    d, tokens, points = ctx.pick(smoke=(16, 5, 4), quick=(64, 17, 13), full=(384, 17, 13))
    repeats = ctx.pick_repeats(smoke=1, quick=3, full=3)
    train = labelled_synthetic_store(ctx, "probe-train.zarr", n, d, tokens, points)
    evaluation = labelled_synthetic_store(ctx, "probe-eval.zarr", n_eval, d, tokens, points)
    try:
        store = Store.open(train)
        every = list(range(points))
        indices = np.arange(n)
        labels = np.asarray(store.array(LABEL)[:], dtype=np.int64)
        read_s, _ = _median(lambda: read_all(train), repeats)
        moments_s, moments = _median(
            lambda: train_moments(store, indices, labels, N_CLASSES, every, "cls"), repeats
        )
        rows = eval_store_rows(store, evaluation, every, "cls")

        def grid() -> None:
            for i, width in enumerate(p.n_channels for p in store.layout.points):
                system = PointSystem.from_moments(moments[i], width)
                probe_grid(system, rows.vectors[i], rows.labels, FRACTIONS, SEEDS, RIDGE, i)

        grid_s, _ = _median(grid, repeats)
        whole_s, _ = _median(
            lambda: run_probe(train, eval_store=evaluation, backend="numpy", save=False), repeats
        )
    finally:
        shutil.rmtree(train, ignore_errors=True)
        shutil.rmtree(evaluation, ignore_errors=True)
    n_probes = points * (1 + len(FRACTIONS) * (2 * SEEDS + 2))
    figures = Figures("probe")
    figures.add("read_seconds", read_s, "s")
    figures.add("moments_seconds", moments_s, "s")
    figures.add("grid_seconds", grid_s, "s")
    figures.add("probe_seconds", whole_s, "s")
    figures.add("probe_over_read", whole_s / read_s, "ratio")
    figures.add("moments_over_read", moments_s / read_s, "ratio")
    figures.add("grid_over_read", grid_s / read_s, "ratio")
    figures.add("ms_per_probe", 1e3 * grid_s / n_probes, "ms")
    raw_mb = store.layout.sample_bytes() * n / 2**20
    header = ["", "seconds", "÷ plain read"]
    table_rows = [
        ["plain read of every h_k", fmt(read_s), "1"],
        [
            "moments of [class token | one-hot] (the one pass)",
            fmt(moments_s),
            fmt(moments_s / read_s),
        ],
        [f"grid: {n_probes} probes from the moments, scored", fmt(grid_s), fmt(grid_s / read_s)],
        [
            "`run_probe` end to end (+ evaluation rows read)",
            fmt(whole_s),
            f"**{whole_s / read_s:.2f}**",
        ],
    ]
    markdown = "\n\n".join(
        [
            f"**What is measured:** the probe grid on a labelled synthetic store of {n} samples "
            f"({points} points x {tokens} tokens x {d} channels, float32, {fmt(raw_mb)} MB raw), "
            f'scored on a store of {n_eval} samples of the same "model"; median of {repeats}. '
            f"Grid: {len(FRACTIONS)} fractions x {SEEDS} seeds of random subsets and Gaussian "
            f"projections, top and bottom principal components, and all channels, for each of "
            f"{len(KINDS)} kinds and {points} points ({n_probes} ridge solves, "
            f"{1e3 * grid_s / n_probes:.2f} ms each): the training rows are read once, by the "
            "moments.",
            table(header, table_rows),
        ]
    )
    return Section("probe", figures.results, markdown, [])
