"""Held-out diagnostics of fitted maps, as mergeable partial sums over chunks of rows.

For a map ``ŷ = x t + b`` and the identity baseline ``ŷ = x``: squared error, Σ‖y‖², the spread
of y (for R²), and cosine between prediction and target, summed over rows. The same sums but
the cosines also follow exactly from the joint moments of the held-out rows
(:meth:`HoldoutSums.from_moments`), without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rba_store.stats.moments import PairMoments

_TINY = np.finfo(np.float64).tiny


@dataclass
class HoldoutSums:
    n: int
    sse: float  # Σ‖ŷ - y‖²
    sse_identity: float  # Σ‖x - y‖²
    sum_y2: float  # Σ‖y‖²
    mean_y: np.ndarray  # (o,)
    syy: float  # Σ‖y - ȳ‖²
    cos: float  # Σ cos(ŷ, y)
    cos_identity: float  # Σ cos(x, y)

    @classmethod
    def from_chunk(
        cls, x: np.ndarray, y: np.ndarray, t: np.ndarray, bias: np.ndarray
    ) -> HoldoutSums:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        pred = x @ t + bias
        mean_y = y.mean(axis=0)
        yc = y - mean_y
        y_norm = np.linalg.norm(y, axis=1)

        def cos_sum(a: np.ndarray) -> float:
            return float(
                (np.sum(a * y, 1) / np.maximum(np.linalg.norm(a, axis=1) * y_norm, _TINY)).sum()
            )

        same = x.shape == y.shape
        return cls(
            n=len(y),
            sse=float(np.sum((pred - y) ** 2)),
            sse_identity=float(np.sum((x - y) ** 2)) if same else float("nan"),
            sum_y2=float(np.sum(y * y)),
            mean_y=mean_y,
            syy=float(np.sum(yc * yc)),
            cos=cos_sum(pred),
            cos_identity=cos_sum(x) if same else float("nan"),
        )

    @classmethod
    def from_moments(
        cls, held: PairMoments, a: int, b: int, t: np.ndarray, bias: np.ndarray
    ) -> HoldoutSums:
        """The sums over the rows whose joint moments are ``held``, for ``x = h_a`` and
        ``y = h_b`` (blocks (a, a), (a, b) and (b, b)). With centred co-moments S and means m::

            Σ‖x t + b - y‖² = tr(tᵀ Sxx t) - 2 tr(tᵀ Sxy) + tr(Syy) + n ‖mx t + b - my‖²

        (the cross terms of centred rows sum to zero). Exact up to float64 rounding, relative
        to Σ‖y - ȳ‖²; the cosines are per row and are not in the moments (NaN).
        """
        n = held.n
        mx, my = held.point_mean(a), held.point_mean(b)
        sxx, sxy, syy_block = held.block(a, a), held.block(a, b), held.block(b, b)
        syy = float(np.trace(syy_block))
        offset = mx @ t + bias - my
        sse = float(np.sum((sxx @ t) * t)) - 2 * float(np.sum(t * sxy)) + syy
        sse += n * float(offset @ offset)
        same = sxx.shape == syy_block.shape
        sse_identity = float("nan")
        if same:
            sse_identity = float(np.trace(sxx)) - 2 * float(np.trace(sxy)) + syy
            sse_identity += n * float((mx - my) @ (mx - my))
        return cls(
            n=n,
            sse=max(sse, 0.0),
            sse_identity=max(sse_identity, 0.0) if same else sse_identity,
            sum_y2=syy + n * float(my @ my),
            mean_y=my,
            syy=syy,
            cos=float("nan"),
            cos_identity=float("nan"),
        )

    def merge(self, other: HoldoutSums) -> HoldoutSums:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean_y - self.mean_y
        return HoldoutSums(
            n=n,
            sse=self.sse + other.sse,
            sse_identity=self.sse_identity + other.sse_identity,
            sum_y2=self.sum_y2 + other.sum_y2,
            mean_y=self.mean_y + delta * (other.n / n),
            syy=self.syy + other.syy + float(delta @ delta) * self.n * other.n / n,
            cos=self.cos + other.cos,
            cos_identity=self.cos_identity + other.cos_identity,
        )

    def report(self) -> dict[str, Any]:
        """Relative MSE, R² and mean cosine, for the map and for the identity baseline."""

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else float("nan")

        def mean_cosine(total: float) -> float | None:  # None: not computed (from moments)
            return None if np.isnan(total) else ratio(total, self.n)

        return {
            "rows": self.n,
            "relative_mse": ratio(self.sse, self.sum_y2),
            "r2": 1 - ratio(self.sse, self.syy),
            "cosine": mean_cosine(self.cos),
            "identity": {
                "relative_mse": ratio(self.sse_identity, self.sum_y2),
                "r2": 1 - ratio(self.sse_identity, self.syy),
                "cosine": mean_cosine(self.cos_identity),
            },
        }
