"""Diffused redundancy (Nanda et al., NeurIPS 2023): how few of a layer's channels a linear probe
needs to do as well as the whole layer.

Letters: n = training rows (samples), d = channels of a point, c = classes, m = channels kept.

For every capture point, the joint moments of the rows ``[x | y]`` (x: the sample's class token
or token mean, y: its one-hot label; count, mean, centred co-moment, float64) are accumulated in
**one** pass over the training samples. A closed-form ridge probe (affine, one-hot targets, the
project's solver) on any channel subset S is then a solve of the sub-block ``Sxx[S, S]``,
``Sxy[S]``; on a projection x R (principal components, Gaussian random projections) a solve of
``Rᵀ Sxx R``, ``Rᵀ Sxy``. Nothing is read again for any fraction, seed or kind; scoring reads only
the evaluation rows (the data's validation split through the model, or ``--eval-store``), once.
The CKA between the subset and the full layer comes from the same moments (feature space, exact).

The **critical mass** of a point is the smallest fraction of the grid from which on the probe on
random channels (mean over seeds) stays within ``delta`` points of the probe on all channels.
Saved as ``probe/<name>`` (the moments with the curves) and reused: another grid re-uses the
saved moments and reads only the evaluation rows.

The reading of the rows is :mod:`rba_store.readings.probe_rows`, the ridge solves from the
moments :mod:`rba_store.readings.probe_fit`; this module holds the grid, the result, saving and
reuse, and :func:`run_probe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from rba_store.errors import UsageError
from rba_store.readings.common import (
    check_reading_tokens,
    labelled_rows,
    parse_points,
    point_label,
    points_suffix,
    selection_suffix,
)
from rba_store.readings.probe_fit import (
    KINDS,
    PointSystem,
    channels_for,
    critical_mass,
    probe_grid,
    probe_weights,
)
from rba_store.readings.probe_rows import (
    EvalRows,
    eval_identity,
    eval_store_rows,
    stored_vectors,
    train_moments,
    validation_rows,
)
from rba_store.solve._backend import get_xp
from rba_store.stats.moments import Moments
from rba_store.store import SampleSelection, Store, normalize

__all__ = [
    "DELTA",
    "FRACTIONS",
    "KINDS",
    "PROBE",
    "RIDGE",
    "SEEDS",
    "EvalRows",
    "PointSystem",
    "ProbeResult",
    "channels_for",
    "check_grid",
    "critical_mass",
    "eval_store_rows",
    "parse_fractions",
    "probe_grid",
    "probe_weights",
    "run_probe",
    "stored_vectors",
    "train_moments",
    "validation_rows",
]

PROBE = "probe"  # the analysis kind: probe/<name>
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # a 1-2-5 log grid from 1 % to 100 %
SEEDS = 3
RIDGE = 1e-3  # λ relative to trace(Sxx)/m, as evaluate's linear probe (PROBE_RIDGE)
DELTA = 1.0  # points of accuracy


# -- checks ---------------------------------------------------------------------------------


def parse_fractions(text: str | None) -> tuple[float, ...]:
    """``0.01,0.1,1`` (or percentages ``1%,10%``) into sorted fractions in (0, 1]."""
    if text is None:
        return FRACTIONS
    values = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        try:
            value = float(word[:-1]) / 100 if word.endswith("%") else float(word)
        except ValueError:
            raise UsageError(
                f"--fractions {text!r} is not a list of numbers; pass e.g. 0.01,0.1,0.5,1"
            ) from None
        if not (math.isfinite(value) and 0 < value <= 1):
            raise UsageError(
                f"fraction {word} is outside (0, 1]; pass fractions of the channels such as "
                "0.01,0.1,0.5,1 (or 1%,10%,50%,100%)"
            )
        values.append(value)
    if not values:
        raise UsageError("--fractions is empty; pass e.g. 0.01,0.1,0.5,1")
    return tuple(sorted(set(values)))


def check_grid(seeds: int, ridge: float, delta: float) -> None:
    if seeds < 1:
        raise UsageError(f"--seeds {seeds} is invalid; pass a positive number of seeds")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise UsageError(f"--ridge {ridge} is invalid; pass a number >= 0 (e.g. {RIDGE:g})")
    if not (math.isfinite(delta) and 0 <= delta <= 100):
        raise UsageError(f"--delta {delta} is out of range; pass 0..100 points")


def _percent(fraction: float) -> str:
    if not np.isfinite(fraction):
        return "—"
    return f"{fraction:.0%}" if fraction >= 0.1 else f"{fraction:.1%}"


# -- the result -------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Accuracy and CKA of every probe of the grid, per point, with the moments they came from."""

    points: list[int]
    widths: list[int]
    fractions: tuple[float, ...]
    seeds: int
    accuracy: np.ndarray  # (points, kinds, fractions, seeds)
    cka: np.ndarray  # same
    channels: np.ndarray  # (points, fractions)
    full_accuracy: np.ndarray  # (points,)
    moments: list[Moments]
    attrs: dict[str, Any] = field(default_factory=dict)
    delta: float = DELTA  # how the critical mass is read off (not saved with the curves)

    def constant(self) -> np.ndarray:
        """(points,) True where every training sample has the same vector (e.g. h0's class
        token): no probe can tell classes apart there, and no critical mass is defined."""
        return np.array(
            [not np.trace(m.m2[:w, :w]) > 0 for m, w in zip(self.moments, self.widths, strict=True)]
        )

    def critical_masses(self) -> np.ndarray:
        """(points, kinds): the critical mass of each kind of subset (NaN where undefined)."""
        mean = self.accuracy.mean(axis=3)
        constant = self.constant()
        return np.array(
            [
                [
                    float("nan")
                    if constant[p]
                    else critical_mass(
                        mean[p, k], self.full_accuracy[p], self.fractions, self.delta
                    )
                    for k in range(len(KINDS))
                ]
                for p in range(len(self.points))
            ]
        )

    def to_json(self) -> dict[str, Any]:
        def clean(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        masses = self.critical_masses()
        out_points = []
        for p, point in enumerate(self.points):
            curves = {}
            for k, kind in enumerate(KINDS):
                curves[kind] = [
                    {
                        "fraction": f,
                        "channels": int(self.channels[p, j]),
                        "accuracy": clean(self.accuracy[p, k, j].mean()),
                        "accuracy_std": clean(self.accuracy[p, k, j].std()),
                        "cka": clean(self.cka[p, k, j].mean()),
                    }
                    for j, f in enumerate(self.fractions)
                ]
            out_points.append(
                {
                    "point": point_label(point),
                    "channels": self.widths[p],
                    "full_accuracy": clean(self.full_accuracy[p]),
                    "critical_mass": clean(masses[p, 0]),
                    "critical_mass_by_kind": {
                        kind: clean(masses[p, k]) for k, kind in enumerate(KINDS)
                    },
                    "curves": curves,
                }
            )
        return {
            "tokens": self.attrs["tokens"],
            "ridge": self.attrs["ridge"],
            "delta": self.delta,
            "fractions": list(self.fractions),
            "seeds": self.seeds,
            "train_samples": self.attrs["n_samples"],
            "eval": self.attrs["eval"] | {"samples": self.attrs["n_eval"]},
            "points": out_points,
            "name": self.attrs.get("name"),
        }

    def format_table(self) -> str:
        masses = self.critical_masses()
        head = " ".join(f"{_percent(f):>7}" for f in self.fractions)
        lines = [
            f"random channels, accuracy (mean of {self.seeds} seeds) at each fraction; critical "
            f"mass: within {self.delta:g} point(s) of all channels from there on",
            f"{'point':>5} {'all':>7} {head} {'critical':>8}",
        ]
        for p, point in enumerate(self.points):
            accs = " ".join(f"{100 * a:>6.2f}%" for a in self.accuracy[p, 0].mean(axis=1))
            lines.append(
                f"{point_label(point):>5} {100 * self.full_accuracy[p]:>6.2f}% {accs} "
                f"{_percent(masses[p, 0]):>8}"
            )
        lines.append(
            "critical mass of the other kinds (top / bottom principal components, Gaussian "
            "projection): "
            + ", ".join(
                f"{point_label(point)} "
                + "/".join("—" if not np.isfinite(v) else f"{v:g}" for v in masses[p, 1:])
                for p, point in enumerate(self.points)
            )
        )
        if self.constant().any():
            lines.append(
                "— : undefined where every sample has the same vector (e.g. h0's class token)"
            )
        return "\n".join(lines)

    def to_dataset(self) -> xr.Dataset:
        data: dict[str, Any] = {
            "accuracy": (("point", "kind", "fraction", "seed"), self.accuracy),
            "cka": (("point", "kind", "fraction", "seed"), self.cka),
            "channels": (("point", "fraction"), self.channels.astype(np.int64)),
            "full_accuracy": ("point", self.full_accuracy),
        }
        for point, m in zip(self.points, self.moments, strict=True):
            dim = f"feature_h{point}"
            data[f"moment_mean_h{point}"] = (dim, m.mean)
            data[f"moment_m2_h{point}"] = ((dim, f"{dim}_b"), m.m2)
        attrs = self.attrs | {"moment_count": self.moments[0].n if self.moments else 0}
        return xr.Dataset(
            data,
            coords={
                "point": np.asarray(self.points, dtype=np.int64),
                "kind": np.arange(len(KINDS)),  # names in the attribute kinds (no string arrays)
                "fraction": np.asarray(self.fractions, dtype=np.float64),
                "seed": np.arange(self.seeds),
            },
            attrs=normalize(attrs),
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> ProbeResult:
        attrs = dict(ds.attrs)
        points = [int(p) for p in ds["point"].values]
        n = int(attrs["moment_count"])
        moments = [
            Moments(
                n,
                np.asarray(ds[f"moment_mean_h{p}"].values, dtype=np.float64),
                np.asarray(ds[f"moment_m2_h{p}"].values, dtype=np.float64),
            )
            for p in points
        ]
        return cls(
            points=points,
            widths=[int(w) for w in attrs["widths"]],
            fractions=tuple(float(f) for f in ds["fraction"].values),
            seeds=int(ds.sizes["seed"]),
            accuracy=np.asarray(ds["accuracy"].values, dtype=np.float64),
            cka=np.asarray(ds["cka"].values, dtype=np.float64),
            channels=np.asarray(ds["channels"].values, dtype=np.int64),
            full_accuracy=np.asarray(ds["full_accuracy"].values, dtype=np.float64),
            moments=moments,
            attrs=attrs,
        )


# -- running, saving, reusing -------------------------------------------------------------------


def default_name(tokens: str, selection: SampleSelection, suffix: str = "") -> str:
    """``tokens-cls``, ``tokens-mean-limit500`` ...: the rows whose moments are saved."""
    return f"tokens-{tokens}{selection_suffix(selection)}{suffix}"


def moment_attrs(
    store: Store, tokens: str, selection: SampleSelection, points: list[int], allow: bool
) -> dict[str, Any]:
    """What the saved moments cover (reused when these match)."""
    return {
        "kind": "probe",
        "store_fingerprint": store.fingerprint,
        "tokens": tokens,
        "selection": selection.describe(),
        "points": points,
        "allow_incomplete": allow,
    }


def grid_attrs(
    fractions: tuple[float, ...], seeds: int, ridge: float, eval_source: dict[str, Any]
) -> dict[str, Any]:
    """What the saved curves were computed with (recomputed from the moments when these
    differ)."""
    return {"fractions": list(fractions), "seeds": seeds, "ridge": ridge, "eval": eval_source}


def run_probe(
    store: Store | str | Path,
    *,
    tokens: str = "cls",
    selection: SampleSelection | None = None,
    points: str | list[int] | None = None,
    fractions: str | tuple[float, ...] | None = None,
    seeds: int = SEEDS,
    ridge: float = RIDGE,
    delta: float = DELTA,
    eval_store: str | Path | None = None,
    name: str | None = None,
    allow_incomplete: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    backend: str = "auto",
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    save: bool = True,
) -> tuple[ProbeResult, str]:
    """Compute (or reuse) the probes saved as ``probe/<name>``.

    Returns (result, how): ``computed``, ``reused`` (nothing read), or ``moments reused`` (the
    saved training moments, another grid or evaluation: only the evaluation rows read).
    """
    selection = selection or SampleSelection()
    store = Store.coerce(store)
    chosen = points if isinstance(points, list) else parse_points(points, store)
    grid = fractions if isinstance(fractions, tuple) else parse_fractions(fractions)
    check_reading_tokens(store, tokens)
    check_grid(seeds, ridge, delta)
    get_xp(backend)  # refuses cupy without a GPU before any work
    name = name or default_name(
        tokens, selection, points_suffix(chosen, store.layout.stored_blocks)
    )
    wanted = moment_attrs(store, tokens, selection, chosen, allow_incomplete)
    widths = [store.layout.point(p).n_channels for p in chosen]
    saved = store.read_analysis(PROBE, name) if not overwrite else None
    eval_source = eval_identity(store, eval_store)
    moments: list[Moments] | None = None
    how = "computed"
    if saved is not None:
        previous = ProbeResult.from_dataset(saved)
        if {key: previous.attrs.get(key) for key in wanted} != normalize(wanted):
            raise UsageError(
                f"probes {name!r} already exist in {str(store)!r} for other rows or options; "
                "pass --overwrite to replace them, or another --name"
            )
        settings = normalize(grid_attrs(grid, seeds, ridge, eval_source))
        if {key: previous.attrs.get(key) for key in settings} == settings:
            previous.delta = delta
            return previous, "reused"
        moments, how = previous.moments, "moments reused"
        n_classes, n_samples = int(previous.attrs["n_classes"]), int(previous.attrs["n_samples"])
    if moments is None:
        rows = labelled_rows(store, selection, allow_incomplete, "a probe with one-hot labels")
        n_classes, n_samples = rows.n_classes, len(rows.indices)
        moments = train_moments(
            store,
            rows.indices,
            rows.labels,
            n_classes,
            chosen,
            tokens,
            backend,
            scheduler,
            scheduler_file,
        )
    if eval_store is None:
        evaluation = validation_rows(store, chosen, tokens, checkpoint)
    else:
        evaluation = eval_store_rows(store, eval_store, chosen, tokens, scheduler, scheduler_file)
    shape = (len(chosen), len(KINDS), len(grid), seeds)
    accuracy, cka = np.empty(shape), np.empty(shape)
    channels = np.empty((len(chosen), len(grid)), dtype=np.int64)
    full = np.empty(len(chosen))
    for i, (point, width) in enumerate(zip(chosen, widths, strict=True)):
        system = PointSystem.from_moments(moments[i], width)
        accuracy[i], cka[i], channels[i], full[i] = probe_grid(
            system, evaluation.vectors[i], evaluation.labels, grid, seeds, ridge, point
        )
    attrs = (
        wanted
        | grid_attrs(grid, seeds, ridge, evaluation.source)
        | {
            "name": name,
            "widths": widths,
            "n_classes": n_classes,
            "n_samples": n_samples,
            "n_eval": len(evaluation.labels),
            "kinds": list(KINDS),
        }
    )
    result = ProbeResult(
        chosen, widths, grid, seeds, accuracy, cka, channels, full, moments, attrs, delta
    )
    if save:
        store.write_analysis(PROBE, name, result.to_dataset())
    return result, how
