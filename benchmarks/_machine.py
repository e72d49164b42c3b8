"""What the benchmarks ran on: CPU, cores, memory, GPU, Python, library versions, BLAS, and the
BLAS's own float64 rates (GEMM and the symmetric product ``syrk``), measured in the same run."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from rba_store.solve.symmetric import symmetric_flops, symmetric_product

PACKAGES = ("numpy", "scipy", "torch", "timm", "zarr", "numcodecs", "dask", "xarray")
PACKAGES += ("scikit-learn", "cupy-cuda12x", "cupy-cuda13x")
RATE_SHAPE = (16_384, 768)  # rows x columns of the reference rates in describe()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    """Physical memory of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_bytes() -> int:
    """Memory available now (``MemAvailable``), or half the physical memory if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return memory_bytes() // 2


def gpu_name() -> str | None:
    """The first CUDA device's name when CuPy sees one, else None."""
    from rba_store.solve._backend import gpu_available

    if not gpu_available():
        return None
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _versions() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def _blas() -> list[dict[str, Any]]:
    import numpy  # noqa: F401  (loads NumPy's BLAS so that threadpoolctl sees it)
    from threadpoolctl import threadpool_info

    keys = ("internal_api", "version", "num_threads", "architecture", "threading_layer")
    return [
        {k: lib.get(k) for k in keys} | {"library": Path(lib["filepath"]).name}
        for lib in threadpool_info()
        if lib["user_api"] == "blas"
    ]


def _fastest(fn: Any, repeats: int) -> float:
    fn()  # warm-up: thread pools, first-touch pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def syrk_gflops(rows: int, cols: int, repeats: int = 3) -> float:
    """float64 GFLOP/s of ``aᵀa`` for a (rows, cols) ``a`` through
    :func:`~rba_store.solve.symmetric.symmetric_product` (BLAS ``syrk``), fastest of
    ``repeats``, counted as the flops a user needs: ``rows·cols·(cols + 1)``."""
    a = np.random.default_rng(0).normal(size=(rows, cols))
    return symmetric_flops(rows, cols) / _fastest(lambda: symmetric_product(a), repeats) / 1e9


def gemm_gflops(rows: int, cols: int, repeats: int = 3) -> float:
    """float64 GFLOP/s of a general product ``aᵀb``, both (rows, cols), fastest of ``repeats``,
    counted as ``2·rows·cols²``."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(rows, cols)), rng.normal(size=(rows, cols))
    return 2 * rows * cols * cols / _fastest(lambda: a.T @ b, repeats) / 1e9


def blas_rates(rows: int = RATE_SHAPE[0], cols: int = RATE_SHAPE[1]) -> dict[str, Any]:
    """The reference rates at one shape, with the BLAS's default threads."""
    return {
        "shape": [rows, cols],
        "gemm_f64_gflops": gemm_gflops(rows, cols),
        "syrk_f64_gflops": syrk_gflops(rows, cols),
    }


def describe() -> dict[str, Any]:
    """A JSON-ready description of this machine."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory_bytes() / 2**30, 1),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "blas": _blas(),
        "rates": blas_rates(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def summary(machine: dict[str, Any]) -> str:
    """One line for RESULTS.md."""
    versions = machine["versions"]
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['library']}, {b['num_threads']} threads)"
        for b in machine["blas"]
    )
    libs = ", ".join(
        f"{k} {versions[k]}" for k in ("numpy", "torch", "zarr", "dask") if k in versions
    )
    rates = machine.get("rates")
    measured = (
        f"; float64 at {rates['shape'][0]} x {rates['shape'][1]}: GEMM "
        f"{rates['gemm_f64_gflops']:.0f} GFLOP/s (2·r·c²), syrk {rates['syrk_f64_gflops']:.0f} "
        "GFLOP/s (r·c·(c+1))"
        if rates
        else ""
    )
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GiB, "
        f"GPU: {machine['gpu'] or 'none'}; Python {machine['python']}, {libs}; BLAS: {blas}"
        f"{measured}; load average {machine['loadavg'][0]} at the start"
    )
