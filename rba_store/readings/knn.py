"""Exact k nearest neighbours by cosine similarity, computed in blocks of rows.

Letters: n = all samples, b = rows of a block, w = columns of a tile, c = channels, k = neighbours.

A block of rows is multiplied (one GEMM per tile) against all rows, tile by tile; each row keeps
its k most similar other rows, and the tile is dropped. Memory per task: the (b, w) tile and the
(b, k) neighbours kept, never the n x n similarity matrix. Ties are broken towards the lower
sample index, so the result is the brute-force one whatever the block and tile sizes. The maths is
written once against ``xp`` (NumPy, or CuPy where the solver's backend runs); the (b, k) results
come back to the host.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from rba_store.solve._backend import get_xp, to_numpy

BLOCK_ROWS = 1024  # rows per task, and columns per tile: a (1024, 1024) float64 tile is 8 MB
_TINY = np.finfo(np.float64).tiny


def unit_rows(x_nc: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero: cosine 0 with everything)."""
    x = np.asarray(x_nc, dtype=np.float64)
    norms = np.sqrt(np.einsum("nc,nc->n", x, x))
    return x / np.maximum(norms, _TINY)[:, None]


def _top_k(sim_bm: Any, idx_bm: Any, k: int, xp: ModuleType) -> tuple[Any, Any]:
    """The k largest of each row; equal values go to the lower index.

    ``idx_bm`` must be ascending along each row; the kept entries stay in that order, so a later
    tile (higher indices) can be appended and the rule still holds. A partial sort finds the k
    largest; only rows where values equal to the k-th largest straddle the cut (ties) are
    settled by position, which costs a pass over those rows alone.
    """
    m = sim_bm.shape[1]
    pos = xp.sort(xp.argpartition(sim_bm, m - k, axis=1)[:, m - k :], axis=1)  # (b, k)
    kth = xp.take_along_axis(sim_bm, pos, axis=1).min(axis=1, keepdims=True)
    tied_rows = xp.nonzero((sim_bm >= kth).sum(axis=1) > k)[0]
    if len(tied_rows):
        sim_t, kth_t = sim_bm[tied_rows], kth[tied_rows]
        tied = sim_t == kth_t
        room = k - (sim_t > kth_t).sum(axis=1, keepdims=True)
        keep = (sim_t > kth_t) | (tied & (xp.cumsum(tied, axis=1) <= room))
        pos[tied_rows] = xp.nonzero(keep)[1].reshape(len(tied_rows), k)
    return xp.take_along_axis(sim_bm, pos, axis=1), xp.take_along_axis(idx_bm, pos, axis=1)


def knn_block(
    unit_nc: np.ndarray,
    start: int,
    stop: int,
    k: int,
    backend: str = "numpy",
    tile: int = BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of rows ``start:stop`` of ``unit_nc`` (unit rows).

    Returns ``(indices, similarities)``, each (b, k), per row in ascending index order.
    """
    xp = get_xp(backend)
    x = xp.asarray(unit_nc)
    n = x.shape[0]
    rows = x[start:stop]
    b = stop - start
    own = xp.arange(start, stop)
    best_sim = xp.empty((b, 0), dtype=xp.float64)
    best_idx = xp.empty((b, 0), dtype=xp.int64)
    for c0 in range(0, n, tile):
        c1 = min(c0 + tile, n)
        sim = rows @ x[c0:c1].T  # (b, w): one GEMM
        inside = (own >= c0) & (own < c1)
        if bool(inside.any()):  # a row is not its own neighbour
            sim[xp.nonzero(inside)[0], own[inside] - c0] = -xp.inf
        cols = xp.broadcast_to(xp.arange(c0, c1, dtype=xp.int64), (b, c1 - c0))
        cand_sim = xp.concatenate([best_sim, sim], axis=1)
        cand_idx = xp.concatenate([best_idx, cols], axis=1)
        if cand_sim.shape[1] <= k:
            best_sim, best_idx = cand_sim, cand_idx
        else:
            best_sim, best_idx = _top_k(cand_sim, cand_idx, k, xp)
    return to_numpy(best_idx), to_numpy(best_sim)


def knn_brute_force(x_nc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same neighbours from the whole n x n similarity matrix (a reference for tests)."""
    unit = unit_rows(x_nc)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    n = len(sim)
    order = np.lexsort((np.broadcast_to(np.arange(n), sim.shape), -sim), axis=1)[:, :k]
    idx = np.sort(order, axis=1)
    return idx, np.take_along_axis(sim, idx, axis=1)
