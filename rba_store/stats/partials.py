"""A chunk's partial block statistics: sums (exactly additive) and the joint moments of its
rows (:class:`~rba_store.stats.moments.PairMoments`), merged exactly across chunks, shards and
workers (letters as in :mod:`rba_store.stats.moments`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType

import numpy as np

from rba_store.host_rows import ROW_BLOCK, over_row_blocks
from rba_store.stats.moments import Pair, PairMoments, band_pairs, fold_pairs
from rba_store.workspace import float64_buffer

_TINY = np.finfo(np.float64).tiny


@dataclass
class BlockPartials:
    """Sums over a chunk of samples, for every pair of capture points ``a < b``."""

    n_samples: int
    n_rows: int
    sq_change: np.ndarray  # (k, k): Σ_samples ‖h_b - h_a‖² (upper triangle; NaN if shapes differ)
    rel_change: np.ndarray  # (k, k): Σ_samples ‖h_b - h_a‖² / ‖h_a‖²
    cos_sum: np.ndarray  # (k-1,): Σ_rows cos(h_{b-1}, h_b)
    norm_sum: np.ndarray  # (k,): Σ_samples ‖h_k‖
    moments: PairMoments  # of the rows to fit (all rows unless some samples are held out)
    heldout: PairMoments = field(default_factory=PairMoments.empty)  # of the held-out rows
    # With MLP outputs (extract --mlp-outputs): the moments of fold_pairs, likewise split.
    mlp: PairMoments = field(default_factory=PairMoments.empty)
    mlp_heldout: PairMoments = field(default_factory=PairMoments.empty)

    def merge(self, other: BlockPartials, inplace: bool = False) -> BlockPartials:
        """``inplace``: the joint moments are added into this object's (a tree reduction's
        partials are used once: no third copy of the largest arrays at each merge)."""
        return BlockPartials(
            self.n_samples + other.n_samples,
            self.n_rows + other.n_rows,
            self.sq_change + other.sq_change,
            self.rel_change + other.rel_change,
            self.cos_sum + other.cos_sum,
            self.norm_sum + other.norm_sum,
            self.moments.merge(other.moments, inplace),
            self.heldout.merge(other.heldout, inplace),
            self.mlp.merge(other.mlp, inplace),
            self.mlp_heldout.merge(other.mlp_heldout, inplace),
        )


def chunk_partials(
    points: Sequence[np.ndarray],
    cka: bool = True,
    xp: ModuleType = np,
    band: int | None = None,
    mlp: Sequence[np.ndarray] = (),
) -> BlockPartials:
    """Partials of one chunk: ``points[k]`` is ``h_k``, shape ``(n, t, c_k)``, any float dtype;
    ``mlp[a - 1]`` block a's MLP output, whose pairs :func:`fold_pairs` join the joint moments.

    Every point is converted to float64 once, into the joint rows ``[h0 | ... | hL]``. One
    batched Gram product of each token row's points gives every token norm, the cosines and, summed
    per sample, the squared changes between all pairs (‖h_b - h_a‖² = ‖h_a‖² + ‖h_b‖² -
    2<h_a, h_b>);
    the joint co-moment blocks (for CKA and the fits) of the pairs at most ``band`` apart
    (None: every pair) are products of the centred rows.
    """
    k = len(points)
    n, t = points[0].shape[:2]
    same_shape = len({p.shape for p in points}) == 1
    z = None
    if same_shape:  # one cast into the joint rows, one batched Gram product per token row
        c = points[0].shape[2]
        z = _joint_rows(points, n, t)  # (n*t, k*c) float64; the joint moments reuse it
        per_token = z.reshape(n * t, k, c)
        token_gram = per_token @ per_token.transpose(0, 2, 1)  # (n*t, k, k): <h_a, h_b>
        gram = token_gram.reshape(n, t, k, k).sum(axis=1)  # (n, k, k): per sample
        sq_norm = [gram[:, i, i] for i in range(k)]
        token_norms = np.sqrt(np.diagonal(token_gram, axis1=1, axis2=2))  # (n*t, k)
        dots = [token_gram[:, b - 1, b] for b in range(1, k)]
        hs: list[np.ndarray] = []
    else:
        hs = [np.asarray(p, dtype=np.float64) for p in points]
        sq_norm = [np.einsum("ntc,ntc->n", h, h) for h in hs]
    sq = np.full((k, k), np.nan)
    rel = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(a + 1, k):
            if same_shape:
                per_sample = np.maximum(sq_norm[a] + sq_norm[b] - 2 * gram[:, a, b], 0.0)
            elif hs[a].shape == hs[b].shape:
                diff = hs[b] - hs[a]
                per_sample = np.einsum("ntc,ntc->n", diff, diff)
            else:
                continue
            sq[a, b] = per_sample.sum()
            rel[a, b] = (per_sample / np.maximum(sq_norm[a], _TINY)).sum()
    cos = np.full(k - 1, np.nan)
    if same_shape:
        for b in range(1, k):
            norms = token_norms[:, b - 1] * token_norms[:, b]
            cos[b - 1] = (dots[b - 1] / np.maximum(norms, _TINY)).sum()
    else:
        norms_of = [np.sqrt(np.einsum("ntc,ntc->nt", h, h)) for h in hs]
        for b in range(1, k):
            if hs[b].shape == hs[b - 1].shape:
                dot = np.einsum("ntc,ntc->nt", hs[b - 1], hs[b])
                norms = norms_of[b - 1] * norms_of[b]
                cos[b - 1] = (dot / np.maximum(norms, _TINY)).sum()
    norm_sum = np.array([np.sqrt(s).sum() for s in sq_norm])
    mlp_moments = PairMoments.empty()
    if cka and all(p.shape[1] == t for p in points):
        widths = [p.shape[2] for p in points]
        pairs = band_pairs(k, band)
        if mlp:  # one product per point covers its band and its MLP-output partners
            extra = fold_pairs(k, band)
            z = _joint_rows([*points, *mlp], n, t)
            joint = PairMoments.from_rows(
                z, widths + [m.shape[2] for m in mlp], pairs + extra, xp, overwrite=True
            )
            moments, mlp_moments = joint.subset(pairs, k), joint.subset(extra)
        else:
            z = _joint_rows(points, n, t) if z is None else z
            moments = PairMoments.from_rows(z, widths, pairs, xp, overwrite=True)
    else:  # CKA skipped, or impossible: it needs token rows shared by all points
        moments = PairMoments.empty()
    return BlockPartials(n, n * t, sq, rel, cos, norm_sum, moments, mlp=mlp_moments)


def _joint_rows(points: Sequence[np.ndarray], n: int, t: int) -> np.ndarray:
    """The rows of ``[h0 | ... | hL]``, (n*t, p) float64, in this thread's reused buffer: each
    point is cast once, straight into its columns."""
    widths = [p.shape[2] for p in points]
    z = float64_buffer((n * t, sum(widths)), "joint-rows")
    per_token = z.reshape(n, t, -1)
    edges = np.cumsum([0, *widths])

    def cast(first: int, last: int) -> None:  # samples first:last of every point
        for p, start, stop in zip(points, edges[:-1], edges[1:], strict=False):
            per_token[first:last, :, start:stop] = p[first:last]

    over_row_blocks(cast, n, block=max(1, ROW_BLOCK // t))
    return z


def split_chunk_partials(
    points: Sequence[np.ndarray],
    held: np.ndarray,
    cka: bool = True,
    xp: ModuleType = np,
    band: int | None = None,
    mlp: Sequence[np.ndarray] = (),
) -> BlockPartials:
    """:func:`chunk_partials` of a chunk some of whose samples (boolean mask ``held``) are held
    out: every sum covers all samples, the joint moments of the held-out samples' rows are kept
    apart (``heldout``), so that a fit solves from the others and is judged on those."""
    if not held.any():
        return chunk_partials(points, cka, xp, band, mlp)
    kept = chunk_partials([p[held] for p in points], cka, xp, band, [m[held] for m in mlp])
    empty = PairMoments.empty()
    kept = replace(kept, moments=empty, heldout=kept.moments, mlp=empty, mlp_heldout=kept.mlp)
    if held.all():
        return kept
    rest = chunk_partials([p[~held] for p in points], cka, xp, band, [m[~held] for m in mlp])
    return rest.merge(kept, inplace=True)


def pair_moments_of_chunk(
    points: Sequence[np.ndarray], pairs: Sequence[Pair], xp: ModuleType = np
) -> PairMoments:
    """The joint moments of a chunk's rows for ``pairs`` only (a further pass for the CKA of
    pairs outside the band)."""
    n, t = points[0].shape[:2]
    widths = [p.shape[2] for p in points]
    return PairMoments.from_rows(_joint_rows(points, n, t), widths, pairs, xp, overwrite=True)
