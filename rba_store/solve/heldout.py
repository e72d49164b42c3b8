"""Held-out diagnostics of fitted maps, as mergeable partial sums over chunks of rows.

For a map ``ŷ = x t + b`` and the identity baseline ``ŷ = x``: squared error, Σ‖y‖², the spread
of y (for R²), and cosine between prediction and target, summed over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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

        return {
            "rows": self.n,
            "relative_mse": ratio(self.sse, self.sum_y2),
            "r2": 1 - ratio(self.sse, self.syy),
            "cosine": ratio(self.cos, self.n),
            "identity": {
                "relative_mse": ratio(self.sse_identity, self.sum_y2),
                "r2": 1 - ratio(self.sse_identity, self.syy),
                "cosine": ratio(self.cos_identity, self.n),
            },
        }
