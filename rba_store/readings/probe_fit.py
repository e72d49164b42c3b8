"""Ridge probes on channel subsets and projections, solved from one point's moments.

Letters: n = training rows, d = channels of a point, c = classes, m = channels kept.

A closed-form ridge probe (affine, one-hot targets, the project's solver) on a channel subset S
is a solve of the sub-block ``Sxx[S, S]``, ``Sxy[S]``; on a projection x R (principal components,
Gaussian random projections) a solve of ``Rᵀ Sxx R``, ``Rᵀ Sxy``. The CKA between the subset and
the full layer comes from the same moments (feature space, exact). The critical mass is read off
the resulting accuracy curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rba_store.solve.normal_eq import NormalEquations, solve
from rba_store.stats.moments import Moments

KINDS = ("random", "pca_top", "pca_bottom", "projection")


def channels_for(fraction: float, width: int) -> int:
    """Channels kept at a fraction of a point's width (at least one)."""
    return max(1, min(width, round(fraction * width)))


@dataclass
class PointSystem:
    """The centred moments of one point's ``[x | one-hot y]`` split into their blocks."""

    n: int
    mean_x: np.ndarray  # (d,)
    mean_y: np.ndarray  # (c,)
    sxx: np.ndarray  # (d, d)
    sxy: np.ndarray  # (d, c)
    syy: np.ndarray  # (c,)

    @classmethod
    def from_moments(cls, moments: Moments, width: int) -> PointSystem:
        d, m2 = width, moments.m2
        return cls(
            moments.n,
            moments.mean[:d],
            moments.mean[d:],
            m2[:d, :d],
            m2[:d, d:],
            np.diag(m2[d:, d:]).copy(),
        )

    def columns(self, keep: np.ndarray) -> NormalEquations:
        """The normal equations of the probe on channels ``keep`` (a sub-block)."""
        return NormalEquations(
            self.n,
            self.mean_x[keep],
            self.mean_y,
            self.sxx[np.ix_(keep, keep)],
            self.sxy[keep],
            self.syy,
        )

    def projected(self, r_dm: np.ndarray) -> NormalEquations:
        """The normal equations of the probe on ``x R`` (RᵀSR)."""
        return NormalEquations(
            self.n,
            self.mean_x @ r_dm,
            self.mean_y,
            r_dm.T @ self.sxx @ r_dm,
            r_dm.T @ self.sxy,
            self.syy,
        )

    def cka_of(self, r_dm: np.ndarray) -> float:
        """Linear CKA between ``x R`` and ``x`` on the training rows, from the moments."""
        cross = r_dm.T @ self.sxx
        own = cross @ r_dm
        denominator = float(np.linalg.norm(own) * np.linalg.norm(self.sxx))
        return float(np.sum(cross * cross)) / denominator if denominator > 0 else float("nan")

    def pca(self) -> np.ndarray:
        """Principal directions of the training rows, largest variance first."""
        eigvals, eigvecs = np.linalg.eigh(self.sxx)
        return eigvecs[:, np.argsort(eigvals)[::-1]]


def probe_weights(ne: NormalEquations, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The affine ridge probe (W, b) from normal equations: the project's float64 solver."""
    solution = solve(ne, bias=True, ridge=ridge)
    return solution.t, solution.bias


def _accuracy(x: np.ndarray, w: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) == labels))


def probe_grid(
    system: PointSystem,
    x_eval: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, ...],
    seeds: int,
    ridge: float,
    point: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(accuracy, cka, channels, full_accuracy)`` of one point: accuracy and CKA are
    (kinds, fractions, seeds); principal components do not depend on the seed (repeated)."""
    d = len(system.mean_x)
    shape = (len(KINDS), len(fractions), seeds)
    accuracy, cka = np.full(shape, np.nan), np.full(shape, np.nan)
    channels = np.array([channels_for(f, d) for f in fractions])
    every = np.arange(d)
    full = _accuracy(x_eval, *probe_weights(system.columns(every), ridge), labels)
    directions = system.pca()
    for j, m in enumerate(channels):
        for kind_idx, r in ((1, directions[:, :m]), (2, directions[:, d - m :])):
            w, b = probe_weights(system.projected(r), ridge)
            accuracy[kind_idx, j, :] = _accuracy(x_eval @ r, w, b, labels)
            cka[kind_idx, j, :] = system.cka_of(r)
        for s in range(seeds):
            rng = np.random.default_rng((s, point, int(m)))
            keep = np.sort(rng.choice(d, size=int(m), replace=False))
            w, b = probe_weights(system.columns(keep), ridge)
            accuracy[0, j, s] = _accuracy(x_eval[:, keep], w, b, labels)
            cka[0, j, s] = system.cka_of(np.eye(d)[:, keep])
            r = rng.standard_normal((d, int(m))) / math.sqrt(m)
            w, b = probe_weights(system.projected(r), ridge)
            accuracy[3, j, s] = _accuracy(x_eval @ r, w, b, labels)
            cka[3, j, s] = system.cka_of(r)
    return accuracy, cka, channels, full


def critical_mass(
    mean_accuracy: np.ndarray, full: float, fractions: tuple[float, ...], delta: float
) -> float:
    """The smallest fraction from which on every larger one of the grid is within ``delta``
    points of ``full`` (NaN when even the largest is not)."""
    within = mean_accuracy >= full - delta / 100 - 1e-12
    found = float("nan")
    for j in range(len(fractions) - 1, -1, -1):
        if not within[j]:
            break
        found = fractions[j]
    return found
