"""Block statistics as a result: derived from merged partials, ranked spans, Dataset round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from rba_store.stats.moments import (
    Moments,
    Pair,
    PairMoments,
    band_pairs,
    cka_from_hsic,
    hsic_of,
    point_columns,
)
from rba_store.stats.partials import BlockPartials
from rba_store.store.layout import points_text

# How saved statistics name the two sets of joint moments: the rows to fit, the held-out rows.
MOMENT_SETS = ("moment", "heldout")
# The joint moments of the MLP outputs' pairs (extract --mlp-outputs): the same two row sets.
MLP_SETS = ("mlp_moment", "mlp_heldout")
MLP_PREFIX = "mlp_"


@dataclass
class BlockStats:
    """Per-block statistics (block b is the step from ``h{b-1}`` to ``h{b}``) and CKA."""

    br: np.ndarray  # (L,) -mean_samples ‖h_b - h_{b-1}‖²
    relative_change: np.ndarray  # (L,) mean_samples ‖h_b - h_{b-1}‖² / ‖h_{b-1}‖²
    cosine: np.ndarray  # (L,) mean over token vectors of cos(h_{b-1}, h_b)
    norm: np.ndarray  # (L+1,) mean_samples ‖h_k‖
    cka: np.ndarray  # (L+1, L+1) linear CKA between h_k (NaN for pairs not computed)
    span_change: np.ndarray  # (L+1, L+1) mean relative change from h_a to h_b (a < b)
    n_samples: int
    n_rows: int
    attrs: dict[str, Any] = field(default_factory=dict)
    # The joint moments of the rows of [h0 | ... | hL] (count, mean, centred co-moment blocks
    # of the pairs of points kept: the band b - a <= S, or every pair): what the CKA is made
    # of, and the normal equations of every span in the band (``fit`` solves from them).
    moments: PairMoments | None = None
    widths: list[int] = field(default_factory=list)
    # With a held-out split (``stats --holdout``): ``moments`` cover the rows to fit, these the
    # held-out rows, and every statistic above covers both.
    heldout: PairMoments | None = None
    # With MLP outputs stored: the pairs (h_k, m_a) and (m_a, m_a) of the same rows, in the
    # joint numbering h0..hL, m1..mL (rba_store.stats.moments.fold_pairs); folded fits.
    mlp: PairMoments | None = None
    mlp_heldout: PairMoments | None = None

    def all_moments(self) -> PairMoments | None:
        """The joint moments of every row the statistics cover."""
        if self.moments is None or self.heldout is None:
            return self.moments
        return self.moments.merge(self.heldout)

    @property
    def band(self) -> int | None:
        """The largest span whose joint moments are kept (None: every pair)."""
        return self.attrs.get("moment_band")

    @property
    def n_blocks(self) -> int:
        """The number of steps between consecutive points (blocks, unless ``--points``)."""
        return len(self.br)

    @property
    def labels(self) -> list[int]:
        """The block index k of each point ``h_k`` the statistics cover: 0..L, or the points
        a store extracted with ``--points`` keeps (then "block" b is the span between
        ``labels[b - 1]`` and ``labels[b]``)."""
        return [int(k) for k in self.attrs.get("stored_points", range(len(self.norm)))]

    @property
    def some_points(self) -> bool:
        return "stored_points" in self.attrs

    def step_span(self, b: int) -> tuple[int, int]:
        """Step ``b`` (1-based: the b-th row) as a span ``(a, b]`` of block indices."""
        labels = self.labels
        return labels[b - 1], labels[b]

    @classmethod
    def from_partials(
        cls,
        partials: BlockPartials,
        widths: list[int],
        attrs: dict[str, Any],
        extra_hsic: np.ndarray | None = None,
    ) -> BlockStats:
        """``extra_hsic``: ‖XcᵀYc‖²_F of pairs outside the kept moments (further passes)."""
        n = partials.n_samples
        k = len(widths)
        steps = np.arange(1, k)
        span = np.full((k, k), np.nan)
        upper = np.triu_indices(k, 1)
        span[upper] = partials.rel_change[upper] / n
        kept = partials.moments if partials.moments.n else partials.heldout
        has_moments = bool(kept.n)
        hsic = merged_hsic(partials.moments, partials.heldout) if has_moments else None
        if hsic is not None and extra_hsic is not None:
            hsic = np.where(np.isnan(hsic), extra_hsic, hsic)
        cka = cka_from_hsic(hsic) if hsic is not None else np.full((k, k), np.nan)
        if has_moments:
            attrs = attrs | {"moment_band": kept.band}
            known = int(np.isfinite(hsic).sum()) if hsic is not None else 0
            attrs["cka_pairs"] = "all" if known == k * k else "band"
        return cls(
            br=-partials.sq_change[steps - 1, steps] / n,
            relative_change=partials.rel_change[steps - 1, steps] / n,
            cosine=partials.cos_sum / partials.n_rows,
            norm=partials.norm_sum / n,
            cka=cka,
            span_change=span,
            n_samples=n,
            n_rows=partials.n_rows,
            attrs=attrs,
            moments=partials.moments if has_moments else None,
            widths=list(widths),
            heldout=partials.heldout if has_moments and partials.heldout.n else None,
            mlp=partials.mlp if partials.mlp.n else None,
            mlp_heldout=partials.mlp_heldout if partials.mlp_heldout.n else None,
        )

    def candidates(self, max_span: int = 4, top: int = 10) -> list[dict[str, Any]]:
        """Spans ``(a, b]`` of up to ``max_span`` blocks ranked by their mean relative change.

        The score of a span is the mean over samples of ‖h_b - h_a‖² / ‖h_a‖²: how much the
        blocks a+1..b together change the representation (lower = more redundant).
        """
        k, labels = self.n_blocks + 1, self.labels
        ranked = sorted(
            (float(self.span_change[i, j]), labels[i], labels[j])
            for i in range(k)
            for j in range(i + 1, k)
            if labels[j] - labels[i] <= max_span and np.isfinite(self.span_change[i, j])
        )
        return [
            {"span": [a, b], "blocks": list(range(a + 1, b + 1)), "score": score}
            for score, a, b in ranked[:top]
        ]

    def to_json(self, max_span: int = 4, top: int = 10) -> dict[str, Any]:
        def clean(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {
            "blocks": [
                {
                    "block": self.labels[b + 1],
                    "span": list(self.step_span(b + 1)),
                    "br": clean(self.br[b]),
                    "relative_change": clean(self.relative_change[b]),
                    "cosine": clean(self.cosine[b]),
                    "norm_in": clean(self.norm[b]),
                    "norm_out": clean(self.norm[b + 1]),
                }
                for b in range(self.n_blocks)
            ],
            "cka": [[clean(v) for v in row] for row in self.cka],
            "candidates": self.candidates(max_span, top),
            "n_samples": self.n_samples,
            "n_rows": self.n_rows,
            "attrs": self.attrs,
        }

    def to_dataset(self) -> xr.Dataset:
        points = np.asarray(self.labels, dtype=np.int64)
        blocks = points[1:]  # each row's last block (extract --points: of its span)
        ds = xr.Dataset(
            {
                "br": ("block", self.br),
                "relative_change": ("block", self.relative_change),
                "cosine": ("block", self.cosine),
                "norm": ("point", self.norm),
                "cka": (("point", "point_b"), self.cka),
                "span_change": (("point", "point_b"), self.span_change),
            },
            coords={"block": blocks, "point": points, "point_b": points},
            attrs=self.attrs | {"n_samples": self.n_samples, "n_rows": self.n_rows},
        )
        sets = (self.moments, self.heldout)
        ds = _with_moments(ds, MOMENT_SETS, sets, "feature", "pair")
        if self.moments is not None:
            ds["feature_point"] = ("feature", np.repeat(points, self.widths))
            ds.attrs["moment_widths"] = [int(w) for w in self.widths]
        ds = _with_moments(ds, MLP_SETS, (self.mlp, self.mlp_heldout), "mlp_feature", "mlp_pair")
        if self.mlp is not None or self.mlp_heldout is not None:
            ds.attrs["mlp_widths"] = [int(w) for w in (self.mlp or self.mlp_heldout).widths]
        return ds

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, moments: bool = True) -> BlockStats:
        """Saved statistics; ``moments=False`` leaves the joint moments unread (see
        :func:`read_pair_moments` to read some of their blocks)."""
        attrs = dict(ds.attrs)
        n_samples, n_rows = int(attrs.pop("n_samples")), int(attrs.pop("n_rows"))
        widths = [int(w) for w in attrs.pop("moment_widths", [])]
        attrs.pop("mlp_widths", None)
        for prefix in MOMENT_SETS + MLP_SETS:
            attrs.pop(f"{prefix}_count", None)
        if widths:
            attrs.setdefault("moment_band", None)  # saved before the band: every pair
            attrs.setdefault("cka_pairs", "all")
        fit_moments = read_pair_moments(ds, "moment") if moments else None
        heldout = read_pair_moments(ds, "heldout") if moments else None
        return cls(
            br=ds["br"].values,
            relative_change=ds["relative_change"].values,
            cosine=ds["cosine"].values,
            norm=ds["norm"].values,
            cka=ds["cka"].values,
            span_change=ds["span_change"].values,
            n_samples=n_samples,
            n_rows=n_rows,
            attrs=attrs,
            moments=fit_moments,
            widths=widths,
            heldout=heldout,
            mlp=read_pair_moments(ds, "mlp_moment") if moments else None,
            mlp_heldout=read_pair_moments(ds, "mlp_heldout") if moments else None,
        )

    def format_table(self, max_span: int = 4, top: int = 10) -> str:
        """The human-readable report: a row per block, then the ranked candidate spans."""
        with_cka = bool(self.attrs.get("cka", True))  # --no-cka: no column of NaN
        lines = []
        if self.some_points:
            lines.append(
                f"the store keeps {points_text(self.labels)} (extract --points): each row is the "
                "span between two consecutive stored points, and candidates are spans between "
                "stored points"
            )
        row = "span" if self.some_points else "block"
        lines += [
            f"{row:>5}  {'BR':>12}  {'rel.change':>10}  {'cosine':>7}  "
            f"{'|h_in|':>9}  {'|h_out|':>9}" + (f"  {'CKA(in,out)':>11}" if with_cka else "")
        ]
        for b in range(self.n_blocks):
            a, z = self.step_span(b + 1)
            row = f"{a}:{z}" if self.some_points else str(z)
            lines.append(
                f"{row:>5}  {self.br[b]:>12.5g}  {self.relative_change[b]:>10.4f}  "
                f"{self.cosine[b]:>7.4f}  {self.norm[b]:>9.4g}  {self.norm[b + 1]:>9.4g}"
                + (f"  {self.cka[b, b + 1]:>11.4f}" if with_cka else "")
            )
        lines.append("")
        lines.append(
            f"candidate spans (a, b] to replace, least change first (mean ‖h_b - h_a‖²/‖h_a‖², "
            f"spans of up to {max_span} blocks):"
        )
        for rank, cand in enumerate(self.candidates(max_span, top), start=1):
            a, b = cand["span"]
            blocks = "block " + str(b) if b - a == 1 else f"blocks {a + 1}-{b}"
            lines.append(f"{rank:>3}. span {a}:{b}  ({blocks})  score {cand['score']:.4f}")
        return "\n".join(lines)


def _with_moments(
    ds: xr.Dataset,
    prefixes: tuple[str, str],
    sets: tuple[PairMoments | None, PairMoments | None],
    feature_dim: str,
    pair_dim: str,
) -> xr.Dataset:
    """``ds`` with two sets of joint moments (rows to fit, held-out rows) of the same pairs:
    ``<prefix>_mean``, ``<prefix>_blocks`` (one Zarr chunk per block: a fit reads the blocks of
    its spans only), ``<prefix>_count`` and the pairs' coordinates ``<pair_dim>_a/_b``."""
    for prefix, moments in zip(prefixes, sets, strict=True):
        if moments is None:
            continue
        ds[f"{prefix}_mean"] = (feature_dim, moments.mean)
        ds[f"{prefix}_blocks"] = ((pair_dim, "channel", "channel_b"), moments.blocks)
        ds[f"{prefix}_blocks"].encoding["chunks"] = (1, *moments.blocks.shape[1:])
        ds.attrs[f"{prefix}_count"] = int(moments.n)
    known = next((m for m in sets if m is not None), None)
    if known is None:
        return ds
    pairs = np.array(known.pairs, dtype=np.int64).reshape(-1, 2)
    return ds.assign_coords(
        {f"{pair_dim}_a": (pair_dim, pairs[:, 0]), f"{pair_dim}_b": (pair_dim, pairs[:, 1])}
    )


def merged_hsic(fit: PairMoments, held: PairMoments) -> np.ndarray:
    """:func:`hsic_of` the two sets merged (all rows), a block at a time: no third copy of
    the moments."""
    if not held.n or not fit.n:
        return hsic_of(fit if fit.n else held)
    k = len(fit.widths)
    n = fit.n + held.n
    delta = held.mean - fit.mean
    weight = fit.n * held.n / n
    cols = point_columns(fit.widths)
    hsic = np.full((k, k), np.nan)
    for a, b in fit.pairs:
        block = fit.block(a, b) + held.block(a, b)
        block += np.outer(delta[cols[a]] * weight, delta[cols[b]])
        hsic[a, b] = hsic[b, a] = float(np.sum(block * block))
    return hsic


def saved_pairs(ds: xr.Dataset, mlp: bool = False) -> tuple[Pair, ...] | None:
    """The pairs of points whose joint moments saved statistics hold (None: no moments);
    ``mlp``: the pairs with MLP outputs (None where the store kept none)."""
    a_name, b_name = ("mlp_pair_a", "mlp_pair_b") if mlp else ("pair_a", "pair_b")
    if mlp and a_name not in ds.coords:
        return None
    if mlp or "moment_blocks" in ds:
        return tuple(
            zip(
                (int(a) for a in ds[a_name].values),
                (int(b) for b in ds[b_name].values),
                strict=True,
            )
        )
    if "moment_m2" in ds:  # saved before the band: the whole matrix
        return band_pairs(len(ds.attrs["moment_widths"]), None)
    return None


def read_pair_moments(
    ds: xr.Dataset, prefix: str = "moment", pairs: list[Pair] | None = None
) -> PairMoments | None:
    """One set of saved joint moments (``moment``: the rows to fit, ``heldout``; ``mlp_moment``,
    ``mlp_heldout``: the pairs with MLP outputs of the same rows), all its pairs
    or only ``pairs`` (a lazily opened ``ds`` then reads those blocks only). Reads both the
    band layout (``<prefix>_blocks``) and the whole matrix of earlier versions
    (``<prefix>_m2``)."""
    count = ds.attrs.get(f"{prefix}_count")
    if count is None:
        return None
    mlp = prefix.startswith(MLP_PREFIX)
    widths = tuple(int(w) for w in ds.attrs["mlp_widths" if mlp else "moment_widths"])
    stored = saved_pairs(ds, mlp)
    assert stored is not None
    wanted = stored if pairs is None else tuple(sorted(set(pairs)))
    mean = np.asarray(ds[f"{prefix}_mean"].values, dtype=np.float64)
    if f"{prefix}_m2" in ds:
        m2 = ds[f"{prefix}_m2"]
        if pairs is None:
            full = Moments(int(count), mean, np.asarray(m2.values, dtype=np.float64))
            return PairMoments.from_moments(full, widths, wanted)
        cols = point_columns(widths)
        wide = max(widths)
        blocks = np.zeros((len(wanted), wide, wide))
        for i, (a, b) in enumerate(wanted):
            blocks[i, : widths[a], : widths[b]] = m2[cols[a], cols[b]].values
        return PairMoments(int(count), mean, widths, wanted, blocks)
    blocks_var = ds[f"{prefix}_blocks"]
    if pairs is None:
        blocks = np.asarray(blocks_var.values, dtype=np.float64)
    else:
        index = {pair: i for i, pair in enumerate(stored)}
        blocks = np.stack([np.asarray(blocks_var[index[pair]].values) for pair in wanted])
    return PairMoments(int(count), mean, widths, wanted, blocks)
