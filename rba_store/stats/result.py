"""Block statistics as a result: derived from merged partials, ranked spans, Dataset round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from rba_store.stats.moments import BlockPartials, Moments, cka_from_moments


@dataclass
class BlockStats:
    """Per-block statistics (block b is the step from ``h{b-1}`` to ``h{b}``) and CKA."""

    br: np.ndarray  # (L,) -mean_samples ‖h_b - h_{b-1}‖²
    relative_change: np.ndarray  # (L,) mean_samples ‖h_b - h_{b-1}‖² / ‖h_{b-1}‖²
    cosine: np.ndarray  # (L,) mean over token vectors of cos(h_{b-1}, h_b)
    norm: np.ndarray  # (L+1,) mean_samples ‖h_k‖
    cka: np.ndarray  # (L+1, L+1) linear CKA between all h_k
    span_change: np.ndarray  # (L+1, L+1) mean relative change from h_a to h_b (a < b)
    n_samples: int
    n_rows: int
    attrs: dict[str, Any] = field(default_factory=dict)
    # The joint moments of the rows of [h0 | ... | hL] (count, mean, centred co-moment): what
    # the CKA is made of, and the normal equations of every span (``fit`` solves from them).
    moments: Moments | None = None
    widths: list[int] = field(default_factory=list)
    # With a held-out split (``stats --holdout``): ``moments`` cover the rows to fit, these the
    # held-out rows, and every statistic above covers both.
    heldout: Moments | None = None

    def all_moments(self) -> Moments | None:
        """The joint moments of every row the statistics cover."""
        if self.moments is None or self.heldout is None:
            return self.moments
        return self.moments.merge(self.heldout)

    @property
    def n_blocks(self) -> int:
        return len(self.br)

    @classmethod
    def from_partials(
        cls, partials: BlockPartials, widths: list[int], attrs: dict[str, Any]
    ) -> BlockStats:
        n = partials.n_samples
        k = len(widths)
        steps = np.arange(1, k)
        span = np.full((k, k), np.nan)
        upper = np.triu_indices(k, 1)
        span[upper] = partials.rel_change[upper] / n
        m2 = partials.moments.merge(partials.heldout).m2
        cka = cka_from_moments(m2, widths) if m2.size else np.full((k, k), np.nan)
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
            moments=partials.moments if m2.size else None,
            widths=list(widths),
            heldout=partials.heldout if m2.size and partials.heldout.n else None,
        )

    def candidates(self, max_span: int = 4, top: int = 10) -> list[dict[str, Any]]:
        """Spans ``(a, b]`` of up to ``max_span`` blocks ranked by their mean relative change.

        The score of a span is the mean over samples of ‖h_b - h_a‖² / ‖h_a‖²: how much the
        blocks a+1..b together change the representation (lower = more redundant).
        """
        k = self.n_blocks + 1
        ranked = sorted(
            (
                (float(self.span_change[a, b]), a, b)
                for a in range(k)
                for b in range(a + 1, min(a + max_span, k - 1) + 1)
                if np.isfinite(self.span_change[a, b])
            ),
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
                    "block": b + 1,
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
        blocks = np.arange(1, self.n_blocks + 1)
        points = np.arange(self.n_blocks + 1)
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
        if self.moments is not None:
            ds["moment_mean"] = ("feature", self.moments.mean)
            ds["moment_m2"] = (("feature", "feature_b"), self.moments.m2)
            ds["feature_point"] = ("feature", np.repeat(points, self.widths))
            ds.attrs["moment_count"] = int(self.moments.n)
            ds.attrs["moment_widths"] = [int(w) for w in self.widths]
        if self.heldout is not None:
            ds["heldout_mean"] = ("feature", self.heldout.mean)
            ds["heldout_m2"] = (("feature", "feature_b"), self.heldout.m2)
            ds.attrs["heldout_count"] = int(self.heldout.n)
        return ds

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> BlockStats:
        attrs = dict(ds.attrs)
        n_samples, n_rows = int(attrs.pop("n_samples")), int(attrs.pop("n_rows"))
        moments, widths = None, []
        if "moment_m2" in ds:
            n = int(attrs.pop("moment_count"))
            widths = [int(w) for w in attrs.pop("moment_widths")]
            moments = Moments(n, ds["moment_mean"].values, ds["moment_m2"].values)
        heldout = None
        if "heldout_m2" in ds:
            n_held = int(attrs.pop("heldout_count"))
            heldout = Moments(n_held, ds["heldout_mean"].values, ds["heldout_m2"].values)
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
            moments=moments,
            widths=widths,
            heldout=heldout,
        )

    def format_table(self, max_span: int = 4, top: int = 10) -> str:
        """The human-readable report: a row per block, then the ranked candidate spans."""
        with_cka = bool(self.attrs.get("cka", True))  # --no-cka: no column of NaN
        lines = [
            f"{'block':>5}  {'BR':>12}  {'rel.change':>10}  {'cosine':>7}  "
            f"{'|h_in|':>9}  {'|h_out|':>9}" + (f"  {'CKA(in,out)':>11}" if with_cka else "")
        ]
        for b in range(self.n_blocks):
            lines.append(
                f"{b + 1:>5}  {self.br[b]:>12.5g}  {self.relative_change[b]:>10.4f}  "
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
