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
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from rba_store.dask_compute import compute, tree_reduce
from rba_store.errors import DataSourceError, UsageError
from rba_store.readings.common import (
    check_reading_tokens,
    labelled_rows,
    parse_points,
    point_label,
    points_suffix,
    represent,
    selection_suffix,
)
from rba_store.solve._backend import get_xp
from rba_store.solve.normal_eq import NormalEquations, solve
from rba_store.stats.moments import Moments
from rba_store.store import LABEL, SampleSelection, Store, normalize
from rba_store.store.reading import on_shard, shard_ranges
from rba_store.store.selection import usable_samples

PROBE = "probe"  # the analysis kind: probe/<name>
KINDS = ("random", "pca_top", "pca_bottom", "projection")
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


def channels_for(fraction: float, width: int) -> int:
    """Channels kept at a fraction of a point's width (at least one)."""
    return max(1, min(width, round(fraction * width)))


# -- the one pass: moments of [x | one-hot y] -------------------------------------------------


def _shard_moments(
    local: np.ndarray, onehot: np.ndarray, tokens: str, backend: str, *chunks: np.ndarray
) -> list[Moments]:
    xp = get_xp(backend)
    return [
        Moments.from_rows(np.hstack([represent(c[local], tokens), onehot]), xp, overwrite=True)
        for c in chunks
    ]


def _merge_all(a: list[Moments], b: list[Moments]) -> list[Moments]:
    return [x.merge(y) for x, y in zip(a, b, strict=True)]


def _shard_vectors(local: np.ndarray, tokens: str, *chunks: np.ndarray) -> list[np.ndarray]:
    return [represent(c[local], tokens) for c in chunks]


def _stack(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


def train_moments(
    store: Store,
    indices: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    points: list[int],
    tokens: str,
    backend: str = "numpy",
    scheduler: str | None = None,
    scheduler_file: str | None = None,
) -> list[Moments]:
    """The moments of ``[x_k | one-hot]`` for every point: each shard of the store read once."""
    onehot = np.eye(n_classes)[labels]
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(
            _shard_moments,
            store,
            points,
            start,
            stop,
            local,
            onehot[np.searchsorted(indices, local + start)],
            tokens,
            backend,
        )
        for local, start, stop in shard_ranges(store.layout, indices)
    ]
    return compute(tree_reduce(parts, _merge_all), scheduler, scheduler_file, len(parts))


def stored_vectors(
    store: Store,
    indices: np.ndarray,
    points: list[int],
    tokens: str,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
) -> list[np.ndarray]:
    """One vector per sample and point (float64), each shard read once."""
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(_shard_vectors, store, points, start, stop, local, tokens)
        for local, start, stop in shard_ranges(store.layout, indices)
    ]
    pick = dask.delayed(operator.getitem, pure=True)
    stack = dask.delayed(_stack, pure=True)
    graph = dask.delayed(list, pure=True)(
        [stack(*[pick(p, i) for p in parts]) for i in range(len(points))]
    )
    return compute(graph, scheduler, scheduler_file, len(parts))


# -- evaluation rows ------------------------------------------------------------------------------


@dataclass
class EvalRows:
    """Representations (per point) and labels of the rows probes are scored on."""

    vectors: list[np.ndarray]  # per point, (n_eval, d)
    labels: np.ndarray
    source: dict[str, Any]  # what they are: {"kind": "val", ...} or {"kind": "eval_store", ...}


def eval_store_rows(
    store: Store,
    eval_path: str | Path,
    points: list[int],
    tokens: str,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
) -> EvalRows:
    """The labelled samples of ``--eval-store`` (a store of the same model), read once."""
    other = Store.open(eval_path)
    if other.description["model"]["weights"] != store.description["model"]["weights"]:
        raise UsageError(
            f"--eval-store {str(eval_path)!r} was extracted from other model weights than "
            f"{str(store)!r}; pass a store of the same model"
        )
    if [p.n_channels for p in other.layout.points] != [p.n_channels for p in store.layout.points]:
        raise UsageError(
            f"--eval-store {str(eval_path)!r} has other capture points than {str(store)!r}; "
            "pass a store of the same model"
        )
    check_reading_tokens(other, tokens)
    indices = usable_samples(other, False)
    labels = np.asarray(other.array(LABEL)[:], dtype=np.int64)[indices]
    known = labels >= 0
    if not known.any():
        raise DataSourceError(
            f"--eval-store {str(eval_path)!r} has no labels (every label is -1); the probes "
            "are scored on labelled samples: pass a labelled store"
        )
    vectors = stored_vectors(other, indices[known], points, tokens, scheduler, scheduler_file)
    source = {"kind": "eval_store", "store": str(eval_path), "fingerprint": other.fingerprint}
    return EvalRows(vectors, labels[known], source)


def validation_rows(
    store: Store,
    points: list[int],
    tokens: str,
    checkpoint: str | Path | None = None,
    batch_size: int = 256,
) -> EvalRows:
    """The data's validation split run through the store's model (as ``select`` scores), its
    residual stream captured at every point as the extractor stores it (the store's dtype)."""
    import torch

    from rba_store.approx.rebuild import held_out_source, rebuild_model
    from rba_store.extract.capture import ActivationCapture
    from rba_store.extract.data import make_preprocess

    description = store.description
    try:
        source = held_out_source(description["data"], "val")
    except DataSourceError as e:
        raise DataSourceError(f"{e}; or pass --eval-store STORE") from e
    labels = np.asarray(source.labels, dtype=np.int64)
    known = labels >= 0
    if not known.any():
        raise DataSourceError(
            "the validation split has no labels; the probes are scored on labelled samples: "
            "pass --eval-store with a labelled store"
        )
    loaded = rebuild_model(description["model"], checkpoint, store)
    capture = ActivationCapture(loaded, "cls" if tokens == "cls" else "all")
    preprocess = make_preprocess(loaded.data_config)
    dtype = np.dtype(store.layout.dtype)
    parts: list[list[np.ndarray]] = [[] for _ in points]
    with torch.inference_mode():
        for start in range(0, len(source), batch_size):
            x = source.load(start, min(start + batch_size, len(source)), preprocess)
            captured = capture(x)
            for i, k in enumerate(points):
                parts[i].append(represent(captured.points[k].numpy().astype(dtype), tokens))
    vectors = [np.concatenate(p)[known] for p in parts]
    return EvalRows(vectors, labels[known], _eval_identity(store, None))


# -- probes from the moments -------------------------------------------------------------------


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


def _eval_identity(store: Store, eval_store: str | Path | None) -> dict[str, Any]:
    """What the evaluation rows will be, without reading them (to decide about reuse)."""
    if eval_store is None:
        weights = store.description["model"]["weights"]
        return normalize({"kind": "val", "split": "val", "model_weights": weights})
    other = Store.open(eval_store)
    return {"kind": "eval_store", "store": str(eval_store), "fingerprint": other.fingerprint}


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
    n_points = len(store.layout.points)
    chosen = points if isinstance(points, list) else parse_points(points, n_points, store)
    grid = fractions if isinstance(fractions, tuple) else parse_fractions(fractions)
    check_reading_tokens(store, tokens)
    check_grid(seeds, ridge, delta)
    get_xp(backend)  # refuses cupy without a GPU before any work
    name = name or default_name(tokens, selection, points_suffix(chosen, n_points))
    wanted = moment_attrs(store, tokens, selection, chosen, allow_incomplete)
    widths = [store.layout.points[p].n_channels for p in chosen]
    saved = store.read_analysis(PROBE, name) if not overwrite else None
    eval_source = _eval_identity(store, eval_store)
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
