"""Choosing the array module ``xp``: NumPy on CPU, CuPy on GPU. The only file that names CuPy.

CuPy is imported lazily, only when asked for (``backend="cupy"``) or when ``backend="auto"`` looks
for a GPU, so importing rba-store never touches CUDA.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from rba_store.errors import UsageError

BACKENDS = ("auto", "numpy", "cupy")


def _import_cupy() -> ModuleType | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return bool(cupy.cuda.is_available()) and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDARuntimeError without a driver
        return False


def get_xp(backend: str = "auto") -> ModuleType:
    """The array module for a backend name."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r} is not valid; use one of {', '.join(BACKENDS)}")
    if backend == "numpy" or (backend == "auto" and not gpu_available()):
        return np
    cupy = _import_cupy()
    if cupy is None:
        raise UsageError(
            "--backend cupy needs CuPy: install it with pip install 'rba-store[gpu]' (or the "
            "cupy-cudaXXx wheel matching your CUDA), or use --backend numpy"
        )
    if not gpu_available():
        raise UsageError(
            "--backend cupy needs a CUDA GPU, and none is visible; use --backend numpy"
        )
    return cupy


def array_module(a: Any) -> ModuleType:
    """The module an array belongs to (NumPy unless it is a CuPy array)."""
    module = type(a).__module__
    if module.startswith("cupy"):
        return _import_cupy()  # type: ignore[return-value]
    return np


def to_numpy(a: Any) -> np.ndarray:
    """The single exit to host memory."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
