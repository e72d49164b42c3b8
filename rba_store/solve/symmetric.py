"""The symmetric product ``aᵀa`` as a symmetric rank-k update (BLAS/cuBLAS ``syrk``).

Letters: r = rows, c = columns. XᵀX and the joint co-moment matrix are symmetric: a general GEMM
computes both halves, ``syrk`` one, ``r·c·(c + 1)`` flops instead of ``2·r·c²``
(:func:`symmetric_flops`, the count the benchmarks use).

- NumPy: ``a.T @ a`` on one buffer. NumPy's matmul hands a product of an array with its own
  transpose to its BLAS's ``syrk`` and mirrors the triangle; this stays in NumPy's OpenBLAS (SciPy's
  ``dsyrk`` would load a second OpenBLAS whose threads fight NumPy's, see
  :func:`rba_store.solve.normal_eq._cholesky_solve`).
- CuPy: ``cupy.cublas.syrk`` (the upper triangle), mirrored on the device.

Both return the full symmetric (c, c) matrix (the other triangle filled), in ``a``'s dtype: the
callers pass float64 (float32 only for the explicit ``gemm_dtype="float32"`` opt-in; cuBLAS's
``syrk`` uses no TF32).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from rba_store.solve._backend import array_module


def symmetric_product(a_rc: Any, xp: ModuleType | None = None) -> Any:
    """``a_rcᵀ a_rc`` (c, c), both triangles filled, computed once by ``syrk``."""
    xp = xp or array_module(a_rc)
    if xp is np:
        if not _blas_ready(a_rc):  # NumPy's matmul needs a unit stride to reach BLAS
            a_rc = np.ascontiguousarray(a_rc)
        return a_rc.T @ a_rc
    upper = xp.triu(xp.cublas.syrk("T", a_rc))  # cuBLAS fills the upper triangle only
    return upper + xp.triu(upper, 1).T


def symmetric_flops(rows: int, cols: int) -> int:
    """Flops of ``aᵀa`` for a (rows, cols) ``a`` as ``syrk`` does it: ``rows·cols·(cols + 1)``
    (one triangle with its diagonal, 2 flops per multiply-add)."""
    return rows * cols * (cols + 1)


def _blas_ready(a: np.ndarray) -> bool:
    """Whether NumPy can hand ``a`` to BLAS as it is: unit stride along one axis."""
    if a.ndim != 2 or a.dtype not in (np.float64, np.float32):
        return False
    item = a.itemsize
    return a.strides[1] == item or a.strides[0] == item or min(a.shape) <= 1
