"""GPU (only when CuPy sees a CUDA device): the CuPy solver against the GPU's own float64 GEMM
rate, host-to-device transfer overlap, and ``torch.linalg.lstsq`` on the GPU.

For each width D, a synthetic store (197 tokens, float32, blosc-lz4) is fitted for span 0:1, each
measurement in a fresh child process:
  - fit:       ``fit_spans(..., backend="cupy")`` end to end (after an untimed fit of one shard);
  - gemm:      XᵀX and XᵀY in float64 on the same rows already on the GPU (fastest of 3);
  - transfer:  the rows in pinned host memory, chunk by chunk: host-to-device copies alone, the
               fit's per-chunk work (cast, centre, two GEMMs) alone, and both pipelined on two
               streams; overlap = (copy + compute - pipelined) ÷ min(copy, compute), 1 = perfect;
  - torch_gpu32 / torch_gpu64: ``torch.linalg.lstsq`` on the GPU, rows copied from host memory
               (the copy is timed: the rows start in RAM, as for the CPU alternatives).
T errors are against float64 ``numpy.linalg.lstsq`` on the CPU.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np

from benchmarks._child import run_in_child
from benchmarks._results import Context, Figures, Section, at_least, at_most, fmt, table
from benchmarks._synthetic import read_rows, write_store
from benchmarks.bench_solver import T_ERROR_TARGET, lstsq_child

TOKENS = 197
GPU_LIMIT_RATIO_TARGET = 0.7  # CuPy fit ÷ the GPU's own float64 GEMM rate, for D >= 384


def unavailable() -> str | None:
    """Why the GPU benchmark cannot run here, or None when it can."""
    from rba_store.solve._backend import gpu_available

    if not gpu_available():
        return "skipped: no GPU (CuPy with a visible CUDA device is needed)"
    return None


# -- child processes ----------------------------------------------------------------------------


def cupy_fit_child(store: str) -> dict[str, Any]:
    """rba-store's fit with the CuPy backend, after one untimed fit of the first shard."""
    import cupy

    from rba_store.solve import FitOptions, fit_spans
    from rba_store.store import Store
    from rba_store.store.selection import SampleSelection

    def options(name: str, selection: SampleSelection) -> FitOptions:
        return FitOptions(
            spans=((0, 1),), selection=selection, backend="cupy", name=name, overwrite=True
        )

    shard = Store.open(store).layout.shard_samples
    fit_spans(store, options("gpu-warm-up", SampleSelection(limit=shard)))
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    (fit,) = fit_spans(store, options("gpu", SampleSelection()))
    cupy.cuda.Device().synchronize()
    seconds = time.perf_counter() - start
    pool = cupy.get_default_memory_pool().total_bytes()
    return {"seconds": seconds, "t": fit.solution.t, "gpu_pool_mb": pool / 2**20}


def gemm_child(store: str, repeats: int = 3) -> dict[str, Any]:
    """XᵀX and XᵀY in float64 on rows already on the GPU (fastest of ``repeats``)."""
    import cupy

    x = cupy.asarray(read_rows(store, 0), dtype=cupy.float64)
    y = cupy.asarray(read_rows(store, 1), dtype=cupy.float64)
    times = []
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        x.T @ x
        x.T @ y
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times)}


def transfer_child(store: str, chunk_rows: int) -> dict[str, Any]:
    """Copies alone, per-chunk work alone, and both pipelined on two streams."""
    import cupy
    import cupyx

    from rba_store.solve.normal_eq import NormalEquations

    x32, y32 = read_rows(store, 0), read_rows(store, 1)
    n_chunks = max(1, len(x32) // chunk_rows)
    d = x32.shape[1]
    host = [cupyx.empty_pinned((chunk_rows, d), np.float32) for _ in range(2 * n_chunks)]
    for i in range(n_chunks):
        np.copyto(host[2 * i], x32[i * chunk_rows : (i + 1) * chunk_rows])
        np.copyto(host[2 * i + 1], y32[i * chunk_rows : (i + 1) * chunk_rows])
    buffers = [cupy.empty((chunk_rows, d), cupy.float32) for _ in range(4)]  # 2 slots x (x, y)
    copy_stream = cupy.cuda.Stream(non_blocking=True)
    compute_stream = cupy.cuda.Stream(non_blocking=True)

    def copies() -> None:
        for i in range(n_chunks):
            buffers[0].set(host[2 * i], stream=copy_stream)
            buffers[1].set(host[2 * i + 1], stream=copy_stream)
        copy_stream.synchronize()

    def compute() -> None:
        with compute_stream:
            for _ in range(n_chunks):
                NormalEquations.from_chunk(buffers[0], buffers[1], cupy)
        compute_stream.synchronize()

    def pipelined() -> None:
        freed: list[Any] = [None, None]
        for i in range(n_chunks):
            slot = i % 2
            if freed[slot] is not None:
                copy_stream.wait_event(freed[slot])
            bx, by = buffers[2 * slot], buffers[2 * slot + 1]
            bx.set(host[2 * i], stream=copy_stream)
            by.set(host[2 * i + 1], stream=copy_stream)
            copied = cupy.cuda.Event()
            copied.record(copy_stream)
            compute_stream.wait_event(copied)
            with compute_stream:
                NormalEquations.from_chunk(bx, by, cupy)
            done = cupy.cuda.Event()
            done.record(compute_stream)
            freed[slot] = done
        compute_stream.synchronize()

    def best(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    copy_s, compute_s, pipelined_s = best(copies), best(compute), best(pipelined)
    return {
        "copy_s": copy_s,
        "compute_s": compute_s,
        "pipelined_s": pipelined_s,
        "bytes": 2 * n_chunks * chunk_rows * d * 4,
    }


def torch_gpu_child(store: str, dtype: str) -> dict[str, Any]:
    """``torch.linalg.lstsq`` on the GPU; the copy of the rows from host memory is timed."""
    import torch

    x32, y32 = read_rows(store, 0), read_rows(store, 1)
    device, tdtype = torch.device("cuda"), getattr(torch, dtype)
    warm = 4 * x32.shape[1]
    xw = torch.from_numpy(x32[:warm]).to(device, tdtype)
    torch.linalg.lstsq(xw, torch.from_numpy(y32[:warm]).to(device, tdtype))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    x = torch.from_numpy(x32).to(device, tdtype)
    y = torch.from_numpy(y32).to(device, tdtype)
    t = torch.linalg.lstsq(x, y).solution
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "t": t.double().cpu().numpy(),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


# -- the benchmark ------------------------------------------------------------------------------


def _width(ctx: Context, d: int, figures: Figures) -> list[list[object]]:
    n_samples = ctx.pick(smoke=24, quick=512, full=2000)
    rows = n_samples * TOKENS
    store = write_store(ctx.work / f"gpu-d{d}.zarr", n_samples, d)
    try:
        fit = run_in_child(cupy_fit_child, ctx.work, store=str(store))
        gemm = run_in_child(gemm_child, ctx.work, store=str(store))
        transfer = run_in_child(transfer_child, ctx.work, store=str(store), chunk_rows=4096)
        torch32 = run_in_child(torch_gpu_child, ctx.work, store=str(store), dtype="float32")
        torch64 = run_in_child(torch_gpu_child, ctx.work, store=str(store), dtype="float64")
        reference = run_in_child(lstsq_child, ctx.work, store=str(store), method="numpy")["t"]
    finally:
        shutil.rmtree(store, ignore_errors=True)
    flop = 2 * 2 * rows * d * d
    figures.add(f"rows_d{d}", rows, "rows")
    figures.add(f"fit_seconds_d{d}", fit["seconds"], "s")
    figures.add(f"fit_rows_per_s_d{d}", rows / fit["seconds"], "rows/s")
    figures.add(f"fit_gflops_d{d}", flop / fit["seconds"] / 1e9, "GFLOP/s")
    figures.add(f"gemm_f64_gflops_d{d}", flop / gemm["seconds"] / 1e9, "GFLOP/s")
    target = at_least(GPU_LIMIT_RATIO_TARGET) if d >= 384 else None
    figures.add(f"limit_ratio_d{d}", gemm["seconds"] / fit["seconds"], "ratio", target)
    error = float(np.abs(fit["t"] - reference).max())
    figures.add(f"fit_t_max_abs_err_d{d}", error, "abs", at_most(T_ERROR_TARGET))
    overlap = (transfer["copy_s"] + transfer["compute_s"] - transfer["pipelined_s"]) / min(
        transfer["copy_s"], transfer["compute_s"]
    )
    figures.add(f"h2d_gb_s_d{d}", transfer["bytes"] / transfer["copy_s"] / 1e9, "GB/s")
    figures.add(f"h2d_overlap_d{d}", overlap, "ratio")
    out = [
        [d, rows, "fit (cupy)", fmt(fit["seconds"]), fmt(rows / fit["seconds"]), "—", "—"],
        [d, rows, "gemm (limit)", fmt(gemm["seconds"]), fmt(rows / gemm["seconds"]), "—", "—"],
    ]
    for name, result in (("torch_gpu32", torch32), ("torch_gpu64", torch64)):
        err = float(np.abs(result["t"] - reference).max())
        speedup = result["seconds"] / fit["seconds"]
        figures.add(f"{name}_seconds_d{d}", result["seconds"], "s")
        figures.add(f"{name}_t_max_abs_err_d{d}", err, "abs")
        figures.add(f"speedup_vs_{name}_d{d}", speedup, "ratio", at_least(1.0))
        out.append(
            [
                d,
                rows,
                name,
                fmt(result["seconds"]),
                fmt(rows / result["seconds"]),
                fmt(speedup, 2),
                f"{err:.1e}",
            ]
        )
    out[0][-1] = f"{error:.1e}"
    out.append(
        [
            d,
            rows,
            f"transfer: copy {fmt(transfer['copy_s'])} s, compute {fmt(transfer['compute_s'])} s,"
            f" pipelined {fmt(transfer['pipelined_s'])} s",
            "—",
            "—",
            f"overlap {overlap:.2f}",
            "—",
        ]
    )
    return out


def run(ctx: Context) -> Section:
    reason = unavailable()
    if reason is not None:
        return Section("gpu", skipped=reason)
    from benchmarks._machine import gpu_name

    widths = ctx.pick(smoke=(64,), quick=(384, 768, 1024), full=(384, 768, 1024))
    figures = Figures("gpu")
    rows = [row for d in widths for row in _width(ctx, d, figures)]
    header = ["D", "rows", "method", "s", "rows/s", "its time ÷ fit time", "T max abs err"]
    markdown = "\n\n".join(
        [
            f"**GPU:** {gpu_name()}. **What is measured:** see `bench_gpu.py`: the CuPy fit end "
            "to end from a compressed store, the GPU's own float64 GEMM on the same rows "
            "(limit), host-to-device overlap, and `torch.linalg.lstsq` on the GPU (copy from "
            "host memory included).",
            table(header, rows),
        ]
    )
    return Section("gpu", figures.results, markdown)
