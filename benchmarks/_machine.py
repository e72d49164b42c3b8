"""What the benchmarks ran on: CPU, cores, memory, GPU, Python, library versions, BLAS."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "scipy", "torch", "timm", "zarr", "numcodecs", "dask", "xarray")
PACKAGES += ("scikit-learn", "cupy-cuda12x", "cupy-cuda13x")


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
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GiB, "
        f"GPU: {machine['gpu'] or 'none'}; Python {machine['python']}, {libs}; BLAS: {blas}; "
        f"load average {machine['loadavg'][0]} at the start"
    )
