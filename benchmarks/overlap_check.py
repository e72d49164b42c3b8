"""Would reading the next shard while multiplying this one speed up ``fit``? (issue 22, item 3)

A synthetic store (197 tokens x D = 768, float32, blosc-lz4, about 100k rows) is fitted for
span 0:1 four ways, alternating, ``--repeats`` times each (medians):
  - fit:        ``fit_spans`` as it is: one Dask task per shard, as many at once as cores, each
                reading then multiplying with ``cores // tasks`` BLAS threads;
  - serial:     one loop, read shard k then multiply it (BLAS on every core): no overlap;
  - prefetch:   the same loop, a reader thread reading shard k+1 while shard k is multiplied
                (BLAS on every core): the overlap the issue asks about;
  - prefetch-1: as prefetch, BLAS on cores - 1 threads (one core left to the reader).
and the parts alone: ``read`` (every shard read and decompressed, nothing else) and ``products``
(the normal equations of every shard already in memory, BLAS on every core).

    python -m benchmarks.overlap_check [--repeats N] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks._synthetic import write_store
from rba_store.solve import FitOptions, fit_spans
from rba_store.solve.normal_eq import NormalEquations
from rba_store.store import Store

D = 768
N_SAMPLES = 512  # 100,864 rows


def _shards(store: Store) -> list[tuple[int, int]]:
    return [store.layout.shard_rows(k) for k in range(store.layout.n_shards)]


def _accumulate(x: np.ndarray, y: np.ndarray, ne: NormalEquations | None) -> NormalEquations:
    part = NormalEquations.from_chunk(x.reshape(-1, D), y.reshape(-1, D))
    return part if ne is None else ne.merge(part)


def serial(store: Store) -> None:
    ne = None
    for start, stop in _shards(store):
        ne = _accumulate(*store.read_points([0, 1], start, stop), ne)


def prefetch(store: Store, blas_threads: int) -> None:
    """Read shard k+1 in a second thread while shard k is multiplied."""
    ranges = _shards(store)
    ne = None
    with ThreadPoolExecutor(1) as reader, threadpool_limits(blas_threads, user_api="blas"):
        pending = reader.submit(store.read_points, [0, 1], *ranges[0])
        for k in range(len(ranges)):
            x, y = pending.result()
            if k + 1 < len(ranges):
                pending = reader.submit(store.read_points, [0, 1], *ranges[k + 1])
            ne = _accumulate(x, y, ne)


def read_only(store: Store) -> None:
    for start, stop in _shards(store):
        store.read_points([0, 1], start, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant [3]")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [a temp dir]")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        path = write_store(Path(work) / "overlap.zarr", N_SAMPLES, D)
        store = Store.open(path)
        in_memory = [store.read_points([0, 1], *r) for r in _shards(store)]

        def products() -> None:
            ne = None
            for x, y in in_memory:
                ne = _accumulate(x, y, ne)

        options = FitOptions(spans=((0, 1),), backend="numpy", overwrite=True)
        variants: dict[str, Callable[[], object]] = {
            "fit": lambda: fit_spans(path, options),
            "serial": lambda: serial(store),
            "prefetch": lambda: prefetch(store, cores),
            "prefetch-1": lambda: prefetch(store, max(1, cores - 1)),
            "read": lambda: read_only(store),
            "products": products,
        }
        for fn in variants.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rows = N_SAMPLES * 197
    base = statistics.median(times["fit"])
    print(f"{rows:,} rows x D = {D}, {len(in_memory)} shards, {cores} cores")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:11s} {median:6.3f} s  ÷ fit {median / base:.2f}  (runs: {values})")


if __name__ == "__main__":
    main()
