"""Streaming normal equations: accumulate, merge exactly, solve in float64.

Letters: r = rows (token vectors) of a chunk, i = input channels (X = h_a), o = output channels
(Y = h_b, or several targets side by side). The maths is written once against the array module
``xp`` (NumPy or CuPy); chunks are cast to float64 where they live, products run there (XᵀX as
a symmetric rank-k update, XᵀY as a GEMM), and the small results come back to the host once, for
the solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from rba_store.solve._backend import array_module, to_numpy
from rba_store.solve.symmetric import symmetric_product
from rba_store.workspace import float64_buffer

COND_LIMIT = 1e10  # above this condition number of the system, Cholesky gives way to eigh
GEMM_DTYPES = ("float64", "float32")
FLOAT32_ROUNDOFF = 2.0**-24  # unit roundoff u of float32 (half its machine epsilon)
GEMM_ERROR_NOTE = 1e-6  # a float32 fit whose expected relative error in T exceeds this says so


def _float64_copy(a: Any, xp: ModuleType, slot: str) -> Any:
    """``a`` as a float64 array this code may modify: on the host, in this thread's reused
    buffer for ``slot`` (:func:`rba_store.workspace.float64_buffer`)."""
    if xp is not np:
        return xp.array(a, dtype=xp.float64, copy=True)
    out = float64_buffer(a.shape, slot)
    np.copyto(out, a)
    return out


def _centred_float64(a: Any, xp: ModuleType, slot: str) -> tuple[Any, Any]:
    """``a - mean(a)`` in float64 (a copy, see :func:`_float64_copy`) and the mean."""
    a64 = _float64_copy(a, xp, slot)
    mean = a64.mean(axis=0)
    a64 -= mean
    return a64, mean


def _sum_plus_outer(a: Any, b: Any, u: Any, v: Any, xp: ModuleType) -> Any:
    """``a + b + u vᵀ`` in one new array (on the host the outer product goes through this
    thread's scratch buffer): a merge allocates its result only, not three D x D temporaries."""
    out = a + b
    if xp is np:
        out += np.outer(u, v, out=float64_buffer(out.shape, "merge-outer"))
    else:
        out += xp.outer(u, v)
    return out


@dataclass
class NormalEquations:
    """Row count, means and centred products of rows ``x`` (r, i) and ``y`` (r, o), in float64.

    ``sxx = Σ (x - x̄)(x - x̄)ᵀ``, ``sxy = Σ (x - x̄)(y - ȳ)ᵀ``, ``syy = Σ (y - ȳ)²`` per output
    channel. Two
    accumulators over disjoint rows merge exactly (Chan et al.), so the same code serves a
    sequential loop, threads and a Dask tree reduction.
    """

    n: int
    mean_x: Any  # (i,)
    mean_y: Any  # (o,)
    sxx: Any  # (i, i)
    sxy: Any  # (i, o)
    syy: Any  # (o,)

    @classmethod
    def from_chunk(
        cls, x_ri: Any, y_ro: Any, xp: ModuleType | None = None, gemm_dtype: str = "float64"
    ) -> NormalEquations:
        """The accumulator of one chunk. XᵀX is a symmetric rank-k update
        (:func:`~rba_store.solve.symmetric.symmetric_product`), XᵀY a GEMM.
        ``gemm_dtype="float32"`` runs the two products in float32 (after centring in float64);
        results are still accumulated in float64 across chunks."""
        xp = xp or array_module(x_ri)
        xc, mean_x = _centred_float64(x_ri, xp, "x")
        yc, mean_y = _centred_float64(y_ro, xp, "y")
        if gemm_dtype == "float32":
            xc32, yc32 = xc.astype(xp.float32), yc.astype(xp.float32)
            sxx = symmetric_product(xc32, xp).astype(xp.float64)
            sxy = (xc32.T @ yc32).astype(xp.float64)
        else:
            sxx, sxy = symmetric_product(xc, xp), xc.T @ yc
        return cls(len(xc), mean_x, mean_y, sxx, sxy, xp.einsum("ro,ro->o", yc, yc))

    def merge(self, other: NormalEquations) -> NormalEquations:
        """Exact combination with an accumulator of other rows."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        weight = self.n * other.n / n
        xp = array_module(self.sxx)
        return NormalEquations(
            n=n,
            mean_x=self.mean_x + dx * (other.n / n),
            mean_y=self.mean_y + dy * (other.n / n),
            sxx=_sum_plus_outer(self.sxx, other.sxx, dx * weight, dx, xp),
            sxy=_sum_plus_outer(self.sxy, other.sxy, dx * weight, dy, xp),
            syy=self.syy + other.syy + dy * dy * weight,
        )

    def to_numpy(self) -> NormalEquations:
        return NormalEquations(
            self.n,
            to_numpy(self.mean_x),
            to_numpy(self.mean_y),
            to_numpy(self.sxx),
            to_numpy(self.sxy),
            to_numpy(self.syy),
        )

    def select_outputs(self, start: int, stop: int) -> NormalEquations:
        """The accumulator of output channels ``start:stop`` (one target of several)."""
        return NormalEquations(
            self.n,
            self.mean_x,
            self.mean_y[start:stop],
            self.sxx,
            self.sxy[:, start:stop],
            self.syy[start:stop],
        )

    def sum_y2(self) -> float:
        """Σ‖y‖² over the rows (uncentred)."""
        ne = self.to_numpy()
        return float(ne.syy.sum() + ne.n * ne.mean_y @ ne.mean_y)


@dataclass
class Solution:
    """A fitted map ``y ≈ x @ t + bias`` and how it was obtained."""

    t: np.ndarray  # (i, o)
    bias: np.ndarray  # (o,)
    method: str  # "cholesky" or "eigh-pinv"
    cond: float
    rank: int
    n_rows: int
    ridge_added: float
    notes: list[str] = field(default_factory=list)
    gemm_error: float | None = None  # expected relative error of T from float32 products


def _system(ne: NormalEquations, bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (i, i) and (i, o) sides: centred with a bias, raw (through the origin) without."""
    if bias:
        return ne.sxx, ne.sxy
    return ne.sxx + ne.n * np.outer(ne.mean_x, ne.mean_x), ne.sxy + ne.n * np.outer(
        ne.mean_x, ne.mean_y
    )


def _cholesky_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a⁻¹ b`` for symmetric positive definite ``a``, through ``a = L Lᵀ``.

    NumPy's LAPACK rather than SciPy's: SciPy ships its own OpenBLAS, whose threads fight the
    still-spinning threads of NumPy's just after the accumulation (measured: 0.1 s instead of
    1 ms for a 384 x 384 Cholesky on 2 cores).
    """
    lower = np.linalg.cholesky(a)
    return np.linalg.solve(lower.T, np.linalg.solve(lower, b))


def float32_gemm_error(
    ne: NormalEquations, t: np.ndarray, eigvals: np.ndarray, threshold: float
) -> float:
    """Expected ``‖ΔT‖_F / ‖T‖_F`` when the centred products were computed in float32.

    A first-order, norm-wise estimate. Rounding the centred rows to float32 (unit roundoff
    u = 2⁻²⁴) perturbs them by ``δX ≈ u Xc``, ``δY ≈ u Yc``, so ``sxx`` moves by
    ``δXᵀXc + XcᵀδX`` (``≈ 2u ‖sxx‖₂``) and ``sxy`` by ``≈ 2u ‖Xc‖₂ ‖Yc‖_F``; the float32
    GEMM's own rounding (its outputs and its float32 partial sums) adds about as much again,
    hence ``4u``. The means, the ``n x̄ x̄ᵀ`` term and the accumulation across chunks stay
    float64. With ``ΔT = A⁻¹ (ΔB - ΔA T)``::

        ‖ΔT‖_F / ‖T‖_F ≈ 4u (‖sxx‖₂ + ‖Xc‖₂ ‖Yc‖_F / ‖T‖_F) / λ_min(A)

    that is ``4 κ(A) u (1 + ‖Yc‖_F / (‖Xc‖₂ ‖T‖_F))`` when A is the centred system (``bias``),
    less when the mean dominates A. Measured against float64 fits (real activations, synthetic
    data, condition numbers 1 to 1e7), the change of T is 1.6-50x below this. ``eigvals`` are
    A's eigenvalues (ridge included). A singular system gives ``inf``: float32 noise lifts its
    null directions above the rank threshold, so T is meaningless.
    """
    if not len(eigvals) or eigvals[0] <= threshold:
        return float("inf")
    t_norm = float(np.linalg.norm(t))
    if t_norm == 0:
        return float("nan")  # T = 0 exactly (Y = 0): no relative error to speak of
    sxx_top = max(float(np.linalg.eigvalsh(ne.sxx)[-1]), 0.0)
    yc_norm = math.sqrt(max(float(ne.syy.sum()), 0.0))
    scale = sxx_top + math.sqrt(sxx_top) * yc_norm / t_norm
    return 4 * FLOAT32_ROUNDOFF * scale / float(eigvals[0])


def _spectrum(eigvals: np.ndarray) -> tuple[float, int, float]:
    """Rank threshold, rank and condition number of a symmetric matrix from its ascending
    eigenvalues."""
    d = len(eigvals)
    top = float(eigvals[-1]) if d else 0.0
    threshold = top * d * np.finfo(np.float64).eps
    rank = int((eigvals > threshold).sum())
    cond = float(top / eigvals[0]) if d and eigvals[0] > 0 else float("inf")
    return threshold, rank, cond


def solve(
    ne: NormalEquations, *, bias: bool = False, ridge: float = 0.0, gemm_dtype: str = "float64"
) -> Solution:
    """Solve ``min ‖X T (+ b) - Y‖² (+ ridge)`` from accumulated normal equations, in float64.

    Without ``bias`` the map goes through the origin, like the reference (plain least squares);
    with it, T comes from the centred system and ``b = ȳ - x̄ T``. ``ridge`` adds
    ``ridge * trace(A) / i`` to the diagonal of A. Cholesky is used when A is well conditioned
    (condition number below 1e10); otherwise an eigendecomposition gives the minimum-norm
    (pseudo-inverse) solution, and the result says so. ``gemm_dtype="float32"`` (how ``ne`` was
    accumulated) adds the expected relative error of T (:func:`float32_gemm_error`), and a note
    when it exceeds 1e-6.
    """
    ne = ne.to_numpy()
    a, b = _system(ne, bias)
    d = a.shape[0]
    added = ridge * float(np.trace(a)) / d if ridge else 0.0
    if added:
        a = a + added * np.eye(d)
    # The eigenvalues alone give the condition number and rank (a fifth to a third of eigh's time at
    # D = 768; the vectors are needed only for the pseudo-inverse, when Cholesky is not used).
    eigvals = np.linalg.eigvalsh(a)
    threshold, rank, cond = _spectrum(eigvals)
    notes: list[str] = []
    method = "cholesky"
    t = None
    if cond < COND_LIMIT:
        try:
            t = _cholesky_solve(a, b)
        except np.linalg.LinAlgError:
            t = None
    if t is None:
        method = "eigh-pinv"
        eigvals, eigvecs = np.linalg.eigh(a)
        threshold, rank, cond = _spectrum(eigvals)
        keep = eigvals > threshold
        inv = np.where(keep, 1.0 / np.where(keep, eigvals, 1.0), 0.0)
        t = eigvecs @ (inv[:, None] * (eigvecs.T @ b))
        notes.append(
            f"the system is {'singular' if rank < d else 'badly conditioned'} (rank {rank} of "
            f"{d}, condition number {cond:.3g}): solved with an eigendecomposition "
            "(minimum-norm pseudo-inverse) instead of Cholesky; consider --ridge"
        )
    gemm_error = None
    if gemm_dtype == "float32":
        gemm_error = float32_gemm_error(ne, t, eigvals, threshold)
        if gemm_error > GEMM_ERROR_NOTE:
            notes.append(
                f"--gemm float32: expected relative error of T about {gemm_error:.2g} (float32 "
                f"rounding {FLOAT32_ROUNDOFF:.1e} amplified by the condition number {cond:.3g}), "
                f"above {GEMM_ERROR_NOTE:g}; use --gemm float64 (the default) for an accurate T"
            )
    offset = ne.mean_y - ne.mean_x @ t if bias else np.zeros(b.shape[1])
    return Solution(t, offset, method, cond, rank, ne.n, added, notes, gemm_error)


def training_error(ne: NormalEquations, solution: Solution) -> float:
    """Relative squared error ``Σ‖x t + b - y‖² / Σ‖y‖²`` on the fit rows, from the moments."""
    ne = ne.to_numpy()
    sum_y2 = ne.sum_y2()
    t = solution.t
    # Σ‖(x - x̄)t - (y - ȳ)‖² + n‖x̄ t + b - ȳ‖²
    centred = float(np.sum(t * (ne.sxx @ t)) - 2 * np.sum(t * ne.sxy) + ne.syy.sum())
    shift = ne.mean_x @ t + solution.bias - ne.mean_y
    sse = max(centred, 0.0) + ne.n * float(shift @ shift)
    return sse / sum_y2 if sum_y2 > 0 else float("nan")
