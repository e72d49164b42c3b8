"""Fits solved from saved joint moments: which saved statistics cover a fit's rows and spans
(opened lazily: only the blocks of those spans are read), and the normal equations read off
them. Spans outside the saved band are left to the streaming pass (``--from auto``) or refused
(``--from moments``). Folded fits (X = m_a, Y = h_b - r_a = h_b - h_a + m_a) are read off the
moments of a store that keeps the MLP outputs (``extract --mlp-outputs``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from rba_store.errors import UsageError
from rba_store.solve.normal_eq import NormalEquations
from rba_store.solve.spans import FitOptions, Span
from rba_store.store import STATS, SampleSelection, Store, analyses, normalize_json

if TYPE_CHECKING:
    from rba_store.stats.moments import PairMoments


@dataclass
class SavedMoments:
    """Saved statistics whose joint moments cover the rows of a fit, opened lazily: only the
    blocks of the spans solved from them are read."""

    name: str
    ds: xr.Dataset
    pairs: frozenset[tuple[int, int]]  # by block index (h_a, h_b)
    mlp_pairs: frozenset[tuple[int, int]] = frozenset()  # with MLP outputs (fold_pairs)
    # The block index k of each saved point (extract --points stores some h_k); empty: 0..L.
    labels: tuple[int, ...] = ()

    @property
    def n_blocks(self) -> int:
        return len(self.ds.attrs["moment_widths"]) - 1

    def covers(self, span: Span, folded: bool = False) -> bool:
        """Whether the moments hold span (a, b]'s fit (``folded``: its folded fit, a >= 1)."""
        a, b = span
        if not {(a, a), (a, b), (b, b)} <= self.pairs:
            return False
        return not folded or set(self._mlp_needed([span])) <= self.mlp_pairs

    @staticmethod
    def _needed(spans: list[Span]) -> list[tuple[int, int]]:
        return sorted({p for a, b in spans for p in ((a, a), (a, b), (b, b))})

    def _mlp_needed(self, spans: list[Span]) -> list[tuple[int, int]]:
        m = self.n_blocks
        return sorted({p for a, b in spans for p in ((a, m + a), (b, m + a), (m + a, m + a))})

    def folded(self, spans: list[Span], all_rows: bool) -> dict[Span, PairMoments]:
        """:func:`folded_view` of each span over the rows to fit (``all_rows``: held-out rows
        merged in)."""
        main = self.moments(spans, all_rows)
        mlp = self._read_mlp("mlp_moment", spans)
        if all_rows and "mlp_heldout_count" in self.ds.attrs:
            mlp = mlp.merge(self._read_mlp("mlp_heldout", spans))
        return {s: folded_view(main, mlp, s, self.n_blocks) for s in spans}

    def folded_heldout(self, spans: list[Span]) -> dict[Span, PairMoments]:
        main, mlp = self.heldout(spans), self._read_mlp("mlp_heldout", spans)
        return {s: folded_view(main, mlp, s, self.n_blocks) for s in spans}

    def _read_mlp(self, prefix: str, spans: list[Span]) -> PairMoments:
        from rba_store.stats.result import read_pair_moments

        found = read_pair_moments(self.ds, prefix, self._mlp_needed(spans))
        assert found is not None
        return found

    def moments(self, spans: list[Span], all_rows: bool) -> PairMoments:
        """The joint moments of the rows to fit (``all_rows``: held-out rows merged in)."""
        from rba_store.stats.result import read_pair_moments

        needed = self._saved(self._needed(spans))
        fit = read_pair_moments(self.ds, "moment", needed)
        held = read_pair_moments(self.ds, "heldout", needed) if all_rows else None
        assert fit is not None
        return relabelled(fit if held is None else fit.merge(held), self.labels)

    def heldout(self, spans: list[Span]) -> PairMoments:
        from rba_store.stats.result import read_pair_moments

        held = read_pair_moments(self.ds, "heldout", self._saved(self._needed(spans)))
        assert held is not None
        return relabelled(held, self.labels)

    def _saved(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Pairs of block indices as the saved moments number them (stored points only)."""
        if not self.labels:
            return pairs
        position = {k: i for i, k in enumerate(self.labels)}
        return [(position[a], position[b]) for a, b in pairs]


def relabelled(moments: PairMoments, labels: tuple[int, ...]) -> PairMoments:
    """``moments`` of the stored points numbered by block index (``labels[i]``: the k of saved
    point i); the points not stored are there with no columns. The identity when empty."""
    from rba_store.stats.moments import PairMoments

    if not labels:
        return moments
    widths = [0] * (max(labels) + 1)
    for i, k in enumerate(labels):
        widths[k] = moments.widths[i]
    pairs = by_block(moments.pairs, labels)
    return PairMoments(moments.n, moments.mean, tuple(widths), pairs, moments.blocks)


def by_block(
    pairs: Sequence[tuple[int, int]], labels: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """Pairs of saved points as pairs of block indices (``labels``: the k of each; empty: the
    same numbers)."""
    if not labels:
        return tuple(pairs)
    return tuple((labels[a], labels[b]) for a, b in pairs)


def folded_view(main: PairMoments, mlp: PairMoments, span: Span, n_blocks: int) -> PairMoments:
    """The moments of X = m_a (point 0) and Y = h_b - r_a = h_b - h_a + m_a (point 1) of the
    same rows, as a two-point :class:`PairMoments`: every block is a sum of saved blocks
    (``main``: pairs of h points; ``mlp``: pairs with ``m_a``, index ``n_blocks + a``)."""
    from rba_store.stats.moments import PairMoments

    a, b = span
    m = n_blocks + a

    def s(p: int, q: int) -> np.ndarray:
        return (main if max(p, q) <= n_blocks else mlp).block(p, q)

    # Y = h_b - h_a + m_a, term by term: (point, sign).
    terms = ((b, 1.0), (a, -1.0), (m, 1.0))
    sxx = s(m, m)
    sxy = sum(sign * s(m, q) for q, sign in terms)
    syy = sum(si * sj * s(p, q) for p, si in terms for q, sj in terms)
    mean_x = mlp.point_mean(m)
    mean_y = main.point_mean(b) - main.point_mean(a) + mean_x
    blocks = np.stack([sxx, sxy, syy])
    d = sxx.shape[0]
    return PairMoments(
        int(main.n), np.concatenate([mean_x, mean_y]), (d, d), ((0, 0), (0, 1), (1, 1)), blocks
    )


def moments_source(
    store: Store,
    options: FitOptions,
    n_samples: int,
    split: dict | None,
    what: str,
    spans: list[Span],
) -> SavedMoments | None:
    """Saved statistics whose joint moments cover exactly the rows ``options`` select in
    ``store`` (``n_samples`` samples; with ``split``, the same held-out samples apart), or None
    when the rows must be streamed (``--from activations``, float32 products, no such stats).
    ``--from moments`` refuses spans outside the band of the moments found."""
    if options.source == "activations" or options.gemm_dtype != "float64":
        return None
    found = saved_moments(
        store,
        tokens=options.tokens,
        selection=options.selection,
        allow_incomplete=options.allow_incomplete,
        n_samples=n_samples,
        split=split,
        spans=spans,
        fold=options.fold,
    )
    if found is None and options.source == "moments":
        holdout = ""
        if split is not None:
            holdout = f" --holdout {split['fraction']:g} --seed {split['seed']}"
        raise UsageError(
            f"--from moments: {str(store)!r} has no saved statistics whose joint moments cover "
            f"the rows of {what}; run 'rba-store stats {store} --tokens {options.tokens}"
            f"{holdout}' with the same --limit/--sample first, or pass --from auto"
        )
    if found is not None and options.source == "moments":
        folded = [s for s in spans if options.fold and s[0] >= 1 and found.covers(s)]
        uncovered = [s for s in folded if not found.covers(s, folded=True)]
        if uncovered:
            a, b = uncovered[0]
            raise UsageError(
                f"--from moments: the joint moments of stats/{found.name} do not cover block "
                f"{a}'s MLP output, which the folded fit of span {a}:{b} needs; extract the "
                "store with --mlp-outputs and run stats, or pass --from auto (block a is then "
                "recomputed from the stored activations)"
            )
        outside = [s for s in spans if not found.covers(s)]
        if outside:
            a, b = max(outside, key=lambda s: s[1] - s[0])
            band = max(b - a for a, b in found.pairs)
            raise UsageError(
                f"--from moments: span {a}:{b} ({b - a} blocks) is outside the band of the joint "
                f"moments saved with stats/{found.name} (spans of at most {band} blocks); pass "
                f"--from auto to stream it, or re-run stats with --max-span {b - a} --overwrite"
            )
    return found


def saved_moments(
    store: Store,
    *,
    tokens: str,
    selection: SampleSelection,
    allow_incomplete: bool,
    n_samples: int,
    split: dict | None = None,
    spans: list[Span] | None = None,
    fold: bool = False,
) -> SavedMoments | None:
    """Saved statistics with joint moments of exactly these rows: same store, tokens and
    selection, ``n_samples`` samples in all and, when ``split`` is given, the same held-out
    samples kept apart (statistics with a split also answer for all rows). Of several, the one
    whose band covers the most of ``spans`` (``fold``: their folded fits)."""
    from rba_store.stats.result import saved_pairs  # stats imports the solver's backend

    wanted = normalize_json(
        {
            "store_fingerprint": store.fingerprint,
            "tokens": tokens,
            "selection": selection.describe(),
            "allow_incomplete": allow_incomplete,
        }
    )
    split = normalize_json(split)
    best: tuple[int, SavedMoments] | None = None
    for name in store.list_analyses(STATS):
        attrs = store.analysis_attrs(STATS, name)
        same_rows = all(attrs.get(k) == v for k, v in wanted.items())
        if not same_rows or "moment_count" not in attrs or int(attrs["n_samples"]) != n_samples:
            continue
        if split is not None and attrs.get("holdout") != split:
            continue
        ds = analyses.open_lazy(store.path, analyses.analysis_path(STATS, name))
        pairs = saved_pairs(ds)
        if pairs is None:
            continue
        labels = tuple(int(k) for k in attrs.get("stored_points", ()))
        pairs = frozenset(by_block(pairs, labels))
        mlp_pairs = frozenset(saved_pairs(ds, True) or ())
        found = SavedMoments(name, ds, pairs, mlp_pairs, labels)
        score = sum(found.covers(s, fold and s[0] >= 1) for s in spans or [])
        if best is None or score > best[0]:
            best = (score, found)
    return None if best is None else best[1]


def equations_from_moments(moments: PairMoments, spans: list[Span]) -> dict[Span, NormalEquations]:
    """The normal equations of every span, read off the joint moments of the rows of
    ``[h0 | ... | hL]``: XᵀX is block (a, a), XᵀY block (a, b) (centred, with means)."""
    out = {}
    for a, b in spans:
        out[(a, b)] = NormalEquations(
            n=int(moments.n),
            mean_x=moments.point_mean(a),
            mean_y=moments.point_mean(b),
            sxx=moments.block(a, a),
            sxy=moments.block(a, b),
            syy=np.diag(moments.block(b, b)).copy(),
        )
    return out
