"""Fits solved from saved joint moments: which saved statistics cover a fit's rows and spans
(opened lazily: only the blocks of those spans are read), and the normal equations read off
them. Spans outside the saved band are left to the streaming pass (``--from auto``) or refused
(``--from moments``)."""

from __future__ import annotations

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
    pairs: frozenset[tuple[int, int]]

    def covers(self, span: Span) -> bool:
        a, b = span
        return {(a, a), (a, b), (b, b)} <= self.pairs

    @staticmethod
    def _needed(spans: list[Span]) -> list[tuple[int, int]]:
        return sorted({p for a, b in spans for p in ((a, a), (a, b), (b, b))})

    def moments(self, spans: list[Span], all_rows: bool) -> PairMoments:
        """The joint moments of the rows to fit (``all_rows``: held-out rows merged in)."""
        from rba_store.stats.result import read_pair_moments

        needed = self._needed(spans)
        fit = read_pair_moments(self.ds, "moment", needed)
        held = read_pair_moments(self.ds, "heldout", needed) if all_rows else None
        assert fit is not None
        return fit if held is None else fit.merge(held)

    def heldout(self, spans: list[Span]) -> PairMoments:
        from rba_store.stats.result import read_pair_moments

        held = read_pair_moments(self.ds, "heldout", self._needed(spans))
        assert held is not None
        return held


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
) -> SavedMoments | None:
    """Saved statistics with joint moments of exactly these rows: same store, tokens and
    selection, ``n_samples`` samples in all and, when ``split`` is given, the same held-out
    samples kept apart (statistics with a split also answer for all rows). Of several, the one
    whose band covers the most of ``spans``."""
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
        found = SavedMoments(name, ds, frozenset(pairs))
        score = sum(found.covers(s) for s in spans or [])
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
