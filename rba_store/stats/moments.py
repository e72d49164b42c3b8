"""Mergeable float64 joint moments of the rows of capture points.

Letters: n = samples in a chunk, t = tokens used per sample, r = n*t token vectors (rows),
p = total channels of all capture points side by side (the joint feature space), k = capture
points (L+1), w = the widest point's channels.

:class:`PairMoments` holds, for the rows of ``[h0 | h1 | ... | hL]``: count, mean and the
centred co-moment blocks of the pairs of points kept (the band ``b - a <= S`` and the diagonal,
or every pair), merged with Chan's pairwise update, which is exact and associative: any chunking
and any merge order give the same result as one pass over all rows held in memory (up to float64
rounding). Keeping a band rather
than the whole (p, p) matrix makes the memory O(L·S·w²) instead of O(L²·w²).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np

from rba_store.host_rows import centre_columns
from rba_store.solve._backend import to_numpy
from rba_store.solve.symmetric import symmetric_product

# Consecutive points all of whose pairs are kept share one symmetric product up to this many
# columns together (its temporary result: 8 MiB at 1024); consecutive points with the same
# partners share one GEMM up to this many columns (its result: this many rows).
GROUP_COLUMNS = 1024


def centred_rows(z_rp: Any, xp: ModuleType, overwrite: bool) -> tuple[Any, Any]:
    """Rows ``z_rp`` minus their column means, in float64 where ``xp`` computes, and the means.
    ``overwrite``: a float64 ``z_rp`` may be centred in place (a cast or a move to the device
    is a copy already). On the host both passes run on the BLAS threads
    (:func:`~rba_store.host_rows.centre_columns`)."""
    z = xp.asarray(z_rp, dtype=xp.float64)
    if z is z_rp and not overwrite:
        z = z.copy()
    if xp is np:
        return z, centre_columns(z)
    mean = z.mean(axis=0)
    z -= mean
    return z, mean


@dataclass
class Moments:
    """Row count, mean and centred co-moment ``Σ (z - mean)(z - mean)ᵀ`` of a set of rows."""

    n: int
    mean: np.ndarray  # (p,)
    m2: np.ndarray  # (p, p)

    @classmethod
    def empty(cls) -> Moments:
        """The moments of no rows (the identity of :meth:`merge`)."""
        return cls(0, np.zeros(0), np.zeros((0, 0)))

    @classmethod
    def from_rows(cls, z_rp: np.ndarray, xp: ModuleType = np, overwrite: bool = False) -> Moments:
        """The moments of rows ``z_rp``; the (p, p) symmetric product runs where ``xp`` (NumPy
        or CuPy) computes, in float64, and the result comes back to the host. ``overwrite``:
        ``z_rp`` (float64) may be centred in place rather than copied."""
        zc, mean = centred_rows(z_rp, xp, overwrite)
        return cls(len(zc), to_numpy(mean), to_numpy(symmetric_product(zc, xp)))

    def merge(self, other: Moments) -> Moments:
        """Chan et al.: exact combination of two disjoint sets of rows."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, m2)


Pair = tuple[int, int]


def band_pairs(n_points: int, band: int | None) -> tuple[Pair, ...]:
    """The pairs ``(a, b)``, ``a <= b``, of points at most ``band`` apart (every pair: None)."""
    reach = n_points if band is None else band + 1
    return tuple((a, b) for a in range(n_points) for b in range(a, min(n_points, a + reach)))


def fold_pairs(n_points: int, band: int | None) -> tuple[Pair, ...]:
    """The pairs that folded fits of the spans in the band need besides :func:`band_pairs`,
    in the joint numbering ``h0 .. hL, m1 .. mL`` (``m_a`` is ``L + a``): ``(m_a, m_a)`` and
    ``(h_k, m_a)`` for ``a <= k <= a + band``."""
    last = n_points - 1
    reach = last if band is None else band
    pairs = {(last + a, last + a) for a in range(1, n_points)}
    pairs |= {(k, last + a) for a in range(1, n_points) for k in range(a, min(last, a + reach) + 1)}
    return tuple(sorted(pairs))


@dataclass
class PairMoments:
    """Row count, mean and the centred co-moment blocks ``Σ (z_a - m_a)(z_b - m_b)ᵀ`` of some
    pairs of points ``(a, b)``, ``a <= b``, of the rows ``z = [h0 | ... | hL]``.

    ``blocks[i]`` is pair ``pairs[i]``'s block, zero-padded to (w, w) when the points are
    narrower than the widest one. Blocks (a, a) are XᵀX and blocks (a, b) XᵀY of span (a, b],
    centred; the diagonal blocks also give the CKA of every kept pair.
    """

    n: int
    mean: np.ndarray  # (p,)
    widths: tuple[int, ...]
    pairs: tuple[Pair, ...]
    blocks: np.ndarray  # (n_pairs, w, w)

    @classmethod
    def empty(cls) -> PairMoments:
        """The moments of no rows (the identity of :meth:`merge`)."""
        return cls(0, np.zeros(0), (), (), np.zeros((0, 0, 0)))

    @cached_property
    def _index(self) -> dict[Pair, int]:
        return {pair: i for i, pair in enumerate(self.pairs)}

    @property
    def n_points(self) -> int:
        return len(self.widths)

    @property
    def band(self) -> int | None:
        """The largest ``b - a`` kept when the pairs are a whole band (None: every pair)."""
        if not self.pairs:
            return None
        span = max(b - a for a, b in self.pairs)
        return None if span >= self.n_points - 1 else span

    def covers(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self._index

    def subset(self, pairs: Sequence[Pair], n_points: int | None = None) -> PairMoments:
        """The moments of ``pairs`` only (a copy); ``n_points``: keep only the first points'
        widths and means."""
        pairs = tuple(sorted(set(pairs)))
        widths = self.widths if n_points is None else self.widths[:n_points]
        blocks = self.blocks[[self._index[p] for p in pairs]]
        return PairMoments(self.n, self.mean[: sum(widths)].copy(), widths, pairs, blocks)

    def block(self, a: int, b: int) -> np.ndarray:
        """The (w_a, w_b) co-moment block of points a and b (a view)."""
        if a > b:
            return self.block(b, a).T
        i = self._index.get((a, b))
        if i is None:
            raise KeyError(f"the pair (h{a}, h{b}) is not among the moments kept")
        return self.blocks[i, : self.widths[a], : self.widths[b]]

    def point_mean(self, k: int) -> np.ndarray:
        return self.mean[point_columns(self.widths)[k]]

    @classmethod
    def from_rows(
        cls,
        z_rp: np.ndarray,
        widths: Sequence[int],
        pairs: Sequence[Pair],
        xp: ModuleType = np,
        overwrite: bool = False,
    ) -> PairMoments:
        """The moments of rows ``z_rp`` for ``pairs``, in float64 where ``xp`` (NumPy or CuPy)
        computes; the blocks come back to the host. One triangle is computed: consecutive points
        all of whose pairs are kept share one symmetric product (:func:`_fill_groups`); the
        other pairs are GEMMs of a run of consecutive points with the same partners (every
        earlier group's points when every pair is kept, :func:`_shared_partners`) with each
        contiguous run of those partners' columns. ``overwrite``: ``z_rp`` (float64) may be
        centred in place rather than copied."""
        zc, mean = centred_rows(z_rp, xp, overwrite)
        widths = tuple(int(w) for w in widths)
        pairs = tuple(sorted(set(pairs)))
        cols = point_columns(widths)
        wide = max(widths, default=0)
        blocks = np.zeros((len(pairs), wide, wide))
        index = {pair: i for i, pair in enumerate(pairs)}
        done = _fill_groups(blocks, index, zc, widths, xp)
        partners: dict[int, list[int]] = {}
        for a, b in pairs:
            if (a, b) not in done:
                partners.setdefault(a, []).append(b)
        for rows_run, bs in _shared_partners(partners, widths):
            x = zc[:, cols[rows_run[0]].start : cols[rows_run[-1]].stop]
            for run in _runs(bs):
                start = cols[run[0]].start
                product = to_numpy(x.T @ zc[:, start : cols[run[-1]].stop])
                first = cols[rows_run[0]].start
                for a in rows_run:
                    rows = slice(cols[a].start - first, cols[a].stop - first)
                    for b in run:
                        blocks[index[(a, b)], : widths[a], : widths[b]] = product[
                            rows, cols[b].start - start : cols[b].stop - start
                        ]
        return cls(len(zc), to_numpy(mean), widths, pairs, blocks)

    @classmethod
    def from_moments(
        cls, moments: Moments, widths: Sequence[int], pairs: Sequence[Pair]
    ) -> PairMoments:
        """The blocks ``pairs`` of full joint moments (statistics saved before the band)."""
        widths = tuple(int(w) for w in widths)
        pairs = tuple(sorted(set(pairs)))
        cols = point_columns(widths)
        wide = max(widths, default=0)
        blocks = np.zeros((len(pairs), wide, wide))
        for i, (a, b) in enumerate(pairs):
            blocks[i, : widths[a], : widths[b]] = moments.m2[cols[a], cols[b]]
        return cls(int(moments.n), np.asarray(moments.mean), widths, pairs, blocks)

    def merge(self, other: PairMoments, inplace: bool = False) -> PairMoments:
        """Chan et al.: exact combination of two disjoint sets of rows (same pairs).
        ``inplace``: add into this object's blocks (it must not be used otherwise afterwards)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        assert self.pairs == other.pairs and self.widths == other.widths
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        weight = self.n * other.n / n
        if inplace:
            blocks = self.blocks
            blocks += other.blocks
        else:
            blocks = self.blocks + other.blocks
        cols = point_columns(self.widths)
        for i, (a, b) in enumerate(self.pairs):
            block = blocks[i, : self.widths[a], : self.widths[b]]
            block += np.outer(delta[cols[a]] * weight, delta[cols[b]])
        return PairMoments(n, mean, self.widths, self.pairs, blocks)

    def nbytes(self) -> int:
        return int(self.blocks.nbytes + self.mean.nbytes)


def _point_groups(widths: Sequence[int], kept: Container[Pair]) -> list[list[int]]:
    """Runs of consecutive points every pair of which (diagonal included) is ``kept``, at most
    :data:`GROUP_COLUMNS` wide together (a single point whatever its width)."""
    groups: list[list[int]] = []
    width = 0
    for b, w in enumerate(widths):
        if (b, b) not in kept:
            continue
        last = groups[-1] if groups else []
        joins = bool(last) and last[-1] == b - 1 and width + w <= GROUP_COLUMNS
        if joins and all((a, b) in kept for a in last):
            last.append(b)
            width += w
        else:
            groups.append([b])
            width = w
    return groups


def _fill_groups(
    blocks: np.ndarray, index: dict[Pair, int], zc: Any, widths: Sequence[int], xp: ModuleType
) -> set[Pair]:
    """Fill the blocks of the pairs inside each of :func:`_point_groups` from one symmetric
    product of the group's centred columns ``zc``; return the pairs filled."""
    cols = point_columns(widths)
    done: set[Pair] = set()
    for group in _point_groups(widths, index):
        start, stop = cols[group[0]].start, cols[group[-1]].stop
        product = to_numpy(symmetric_product(zc[:, start:stop], xp))
        for i, a in enumerate(group):
            rows = slice(cols[a].start - start, cols[a].stop - start)
            for b in group[i:]:
                blocks[index[(a, b)], : widths[a], : widths[b]] = product[
                    rows, cols[b].start - start : cols[b].stop - start
                ]
                done.add((a, b))
    return done


def _shared_partners(
    partners: dict[int, list[int]], widths: Sequence[int]
) -> list[tuple[list[int], list[int]]]:
    """Runs of consecutive points with the same partners, at most :data:`GROUP_COLUMNS` wide
    together (a single point whatever its width), each with those partners: one GEMM of the
    run's columns with each run of partner columns (a few wide GEMMs run at the machine's GEMM
    rate, one per point of 192 columns at two thirds of it)."""
    shared: list[tuple[list[int], list[int]]] = []
    width = 0
    for a, bs in sorted(partners.items()):
        last = shared[-1] if shared else None
        if last and last[0][-1] == a - 1 and last[1] == bs and width + widths[a] <= GROUP_COLUMNS:
            last[0].append(a)
            width += widths[a]
        else:
            shared.append(([a], bs))
            width = widths[a]
    return shared


def _runs(sorted_values: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive integers: [1, 2, 3, 5] -> [[1, 2, 3], [5]]."""
    runs: list[list[int]] = []
    for v in sorted_values:
        if runs and runs[-1][-1] == v - 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


def hsic_of(moments: PairMoments) -> np.ndarray:
    """‖block(a, b)‖²_F for every kept pair, NaN elsewhere: the numerators of linear CKA."""
    k = moments.n_points
    hsic = np.full((k, k), np.nan)
    for i, (a, b) in enumerate(moments.pairs):
        block = moments.blocks[i]
        hsic[a, b] = hsic[b, a] = float(np.sum(block * block))
    return hsic


def cka_from_hsic(hsic: np.ndarray) -> np.ndarray:
    """Linear CKA from the (k, k) ‖XcᵀYc‖²_F of every pair (NaN where a pair is not known)."""
    scale = np.sqrt(np.diag(hsic))
    denominator = np.outer(scale, scale)
    # A point with zero variance (e.g. h0's class token: the same for every sample) has no CKA.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, hsic / denominator, np.nan)


def point_columns(widths: Sequence[int]) -> list[slice]:
    """The columns of each capture point in the joint rows ``[h0 | ... | hL]``."""
    edges = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    return [slice(edges[k], edges[k + 1]) for k in range(len(widths))]


def cka_from_moments(m2: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """Linear CKA between every pair of points from the joint centred co-moment matrix.

    CKA(X, Y) = ‖XcᵀYc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F), with the cross-products read off ``m2``.
    """
    cols = point_columns(widths)
    k = len(widths)
    hsic = np.empty((k, k))
    for i in range(k):
        for j in range(i, k):
            block = m2[cols[i], cols[j]]
            hsic[i, j] = hsic[j, i] = np.sum(block * block)
    return cka_from_hsic(hsic)
