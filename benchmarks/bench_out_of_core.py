"""Out of core: ``fit`` on a store larger than the memory the process may use, same T.

The store repeats the first M samples of a synthetic generator k times, so its least-squares T is
exactly the T of those M samples: ``numpy.linalg.lstsq`` on the M samples held in memory is the
reference. The fit runs in a child process whose address space is capped with ``RLIMIT_AS``
(``ulimit -v``): no cgroup is needed, and the cap is robust because the child first does a tiny
fit (so every thread, its stack and its malloc arena exist: zarr's event loop and codec threads,
Dask's pool, BLAS), runs with ``MALLOC_ARENA_MAX=2`` (glibc otherwise reserves 64 MB of address
space per thread arena, which counts against ``RLIMIT_AS`` but is never resident), and only then
caps its address space at ``max(limit, baseline + headroom)``. As a control, the child then asks
for one buffer the size of the store's raw data, which the cap must refuse.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._child import run_in_child
from benchmarks._results import Context, Figures, Section, at_most, fmt, table
from benchmarks._synthetic import read_rows, stored_bytes, write_store

TOKENS = 197
T_DIFF_TARGET = 1e-9
MB = 2**20


def _vm_status() -> dict[str, int]:
    """VmSize, VmPeak, VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmSize", "VmPeak", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def limited_fit_child(
    store: str, warm_store: str, limit: int, headroom: int, raw_bytes: int
) -> dict[str, Any]:
    """Warm up, cap the address space, check that the cap refuses the raw store, fit."""
    from rba_store.solve import FitOptions, fit_spans

    def options(name: str) -> FitOptions:
        return FitOptions(spans=((0, 1),), backend="numpy", name=name, overwrite=True)

    fit_spans(warm_store, options("warm-up"))
    base = _vm_status()
    cap = max(limit, base["VmSize"] + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    try:
        np.empty(raw_bytes, dtype=np.uint8)  # untouched: costs address space, not memory
        refused = False
    except MemoryError:
        refused = True
    start = time.perf_counter()
    (fit,) = fit_spans(store, options("out-of-core"))
    seconds = time.perf_counter() - start
    end = _vm_status()
    return {
        "seconds": seconds,
        "t": fit.solution.t,
        "rows": fit.solution.n_rows,
        "cap": cap,
        "in_memory_refused": refused,
        "baseline_vm": base["VmSize"],
        "baseline_rss": base["VmRSS"],
        "vm_peak": end["VmPeak"],
        "rss_peak": end["VmHWM"],
    }


def _reference(store: Path, period: int) -> np.ndarray:
    """float64 ``numpy.linalg.lstsq`` on the store's first ``period`` samples, in memory."""
    x = read_rows(store, 0, period).astype(np.float64)
    y = read_rows(store, 1, period).astype(np.float64)
    return np.linalg.lstsq(x, y, rcond=None)[0]


def run(ctx: Context) -> Section:
    d = ctx.pick(smoke=64, quick=384, full=384)
    period = ctx.pick(smoke=16, quick=256, full=512)
    store_target = ctx.pick(smoke=40 * MB, quick=2 * 2**30, full=6 * 2**30)
    limit = ctx.pick(smoke=0, quick=2**30, full=2 * 2**30)
    headroom = ctx.pick(smoke=192 * MB, quick=256 * MB, full=256 * MB)
    raw_per_sample = 2 * TOKENS * d * 4  # h0 and h1, float32
    n_samples = math.ceil(1.15 * store_target / raw_per_sample / period) * period
    raw = n_samples * raw_per_sample
    store = ctx.work / "out-of-core.zarr"
    warm = ctx.work / "out-of-core-warm.zarr"
    try:
        started = time.perf_counter()
        write_store(store, n_samples, d, period=period)
        write_s = time.perf_counter() - started
        write_store(warm, 4 * 32, d, shard_samples=32, chunk_samples=8, seed=1)
        size = stored_bytes(store)
        reference = _reference(store, period)
        env = {"MALLOC_ARENA_MAX": "2"}
        out = run_in_child(
            limited_fit_child,
            ctx.work,
            env=env,
            store=str(store),
            warm_store=str(warm),
            limit=limit,
            headroom=headroom,
            raw_bytes=raw,
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(warm, ignore_errors=True)
    diff = float(np.abs(out["t"] - reference).max())
    figures = Figures("out_of_core")
    gb = 2**30
    figures.add("store_gb", size / gb, "GB")
    figures.add("store_raw_gb", raw / gb, "GB")
    figures.add("address_space_limit_gb", out["cap"] / gb, "GB")
    figures.add("store_over_limit", size / out["cap"], "ratio")
    figures.add("baseline_vm_mb", out["baseline_vm"] / MB, "MB")
    figures.add("baseline_rss_mb", out["baseline_rss"] / MB, "MB")
    figures.add("peak_rss_mb", out["rss_peak"] / MB, "MB")
    figures.add("peak_vm_mb", out["vm_peak"] / MB, "MB")
    figures.add("in_memory_refused", float(out["in_memory_refused"]), "bool")
    figures.add("fit_seconds", out["seconds"], "s")
    figures.add("fit_rows_per_s", out["rows"] / out["seconds"], "rows/s")
    figures.add("t_max_abs_diff", diff, "abs", at_most(T_DIFF_TARGET))
    rows = [
        ["store (compressed on disk)", f"{fmt(size / gb)} GB ({n_samples} samples, D = {d})"],
        ["store (raw activations)", f"{fmt(raw / gb)} GB"],
        ["address-space cap (RLIMIT_AS)", f"{fmt(out['cap'] / gb)} GB"],
        ["store ÷ cap", fmt(size / out["cap"], 2)],
        [
            "baseline after warm-up: VmSize / RSS",
            f"{out['baseline_vm'] // MB} / {out['baseline_rss'] // MB} MB",
        ],
        [
            "peak during the fit: VmPeak / RSS (VmHWM)",
            f"{out['vm_peak'] // MB} / {out['rss_peak'] // MB} MB",
        ],
        [
            "one buffer of the raw store size refused by the cap",
            "yes" if out["in_memory_refused"] else "NO",
        ],
        ["fit time / rows per s", f"{fmt(out['seconds'])} s / {fmt(out['rows'] / out['seconds'])}"],
        ["writing the store", f"{fmt(write_s)} s"],
        ["max abs(T - T_lstsq of the first M samples in memory)", f"{diff:.1e}"],
    ]
    markdown = "\n\n".join(
        [
            f"**What is measured:** `fit` (span 0:1, float64) of a store that repeats M = {period} "
            "synthetic samples, in a child process whose address space is capped with "
            "`RLIMIT_AS` after a warm-up (see `bench_out_of_core.py`); T is compared with "
            "float64 `numpy.linalg.lstsq` on the M samples in memory (the same least-squares "
            "problem). The store is read through the page cache: the cap limits the process, "
            "not the kernel's file cache.",
            table(["", "value"], rows),
        ]
    )
    return Section("out_of_core", figures.results, markdown)
