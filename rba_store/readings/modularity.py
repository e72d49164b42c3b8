"""Modularity curves (Lu et al., ECCV 2022): how well the classes separate at every block.

For every capture point, each labelled sample is linked to its ``k`` nearest other samples by
cosine similarity of their representations (class token or token mean); a pair linked in either
direction is one undirected edge weighted by its cosine. Newman's weighted modularity (resolution
1) of the partition by class,

    Q = Σ_c [ L_c / m  -  (d_c / 2m)² ]

(m: total edge weight, L_c: weight inside class c, d_c: weighted degree of class c), rises with
depth as the classes separate; where the curve plateaus or drops, blocks add little.

As Dask tasks: one task per shard and point reads it once and keeps one unit vector per sample
(n x c, float64: far smaller than the stored tokens); the exact k-NN of each point runs
in blocks of rows (:mod:`rba_store.readings.knn`, on CuPy where the solver's backend runs); Q is
computed from the (n x k) edge list in NumPy. Saved as ``modularity/<name>`` and reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from rba_store.dask_compute import compute
from rba_store.errors import UsageError
from rba_store.readings.common import (
    check_reading_tokens,
    labelled_rows,
    parse_points,
    point_label,
    points_suffix,
    represent,
    selection_suffix,
)
from rba_store.readings.knn import BLOCK_ROWS, knn_block, unit_rows
from rba_store.solve._backend import get_xp
from rba_store.store import SampleSelection, Store, normalize
from rba_store.store.reading import on_shard, shard_ranges

MODULARITY = "modularity"  # the analysis kind: modularity/<name>
DEFAULT_K = 10
# A step whose gain in Q is below this share of the curve's whole range is a plateau: on the
# embedded default's 12 blocks the average step gains about 8 % of the range, so 2 % is a block
# that adds a quarter of an average block or less.
PLATEAU_SHARE = 0.02


# -- the graph and Q, from the edge list ------------------------------------------------------


def undirected_edges(
    idx_nk: np.ndarray, sim_nk: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(u, v, w)`` with u < v: every pair linked in either direction once, weighted by its
    cosine (the mean of the two directions' values, equal up to rounding)."""
    n, k = idx_nk.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = idx_nk.ravel().astype(np.int64)
    u, v = np.minimum(rows, cols), np.maximum(rows, cols)
    keys, inverse, counts = np.unique(u * n + v, return_inverse=True, return_counts=True)
    weights = np.bincount(inverse, weights=sim_nk.ravel(), minlength=len(keys)) / counts
    return keys // n, keys % n, weights


def modularity(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, labels: np.ndarray, resolution: float = 1.0
) -> float:
    """Newman's weighted modularity of the partition ``labels`` of an undirected graph.

    The same definition as ``networkx.algorithms.community.modularity`` (no self-loops here).
    """
    m = float(w.sum())
    if m <= 0:
        return float("nan")
    n = len(labels)
    _, community = np.unique(labels, return_inverse=True)
    degree = np.bincount(u, weights=w, minlength=n) + np.bincount(v, weights=w, minlength=n)
    inside = float(w[community[u] == community[v]].sum())
    class_degree = np.bincount(community, weights=degree)
    return inside / m - resolution * float(np.sum((class_degree / (2 * m)) ** 2))


# -- the curve and its candidates --------------------------------------------------------------


def curve_marks(
    points: list[int], q: np.ndarray, plateau: float = PLATEAU_SHARE
) -> list[dict[str, Any]]:
    """Each step between consecutive points, its gain in Q, and whether it plateaus or drops.

    A step (blocks a+1..b) drops when Q falls, and plateaus when Q rises by less than
    ``plateau`` (a share) of the curve's range (max - min over the points where Q is defined).
    Steps from or to a point where Q is undefined are neither.
    """
    finite = q[np.isfinite(q)]
    scale = float(finite.max() - finite.min()) if len(finite) > 1 else 0.0
    marks = []
    for i in range(1, len(points)):
        gain = float(q[i] - q[i - 1])
        if not np.isfinite(gain):
            kind = None
        elif gain < 0:
            kind = "drop"
        elif gain < plateau * scale:
            kind = "plateau"
        else:
            kind = "rise"
        marks.append({"span": [points[i - 1], points[i]], "gain": gain, "kind": kind})
    return marks


@dataclass
class ModularityCurve:
    """Q at every capture point read, the graph sizes, and what was asked."""

    points: list[int]
    modularity: np.ndarray  # (points,) NaN where undefined (every sample the same vector)
    n_edges: np.ndarray  # (points,) undirected edges
    n_samples: int
    attrs: dict[str, Any] = field(default_factory=dict)
    plateau: float = PLATEAU_SHARE  # how steps are marked (a reading of Q, not saved with it)

    @property
    def k(self) -> int:
        return int(self.attrs["k"])

    def marks(self) -> list[dict[str, Any]]:
        return curve_marks(self.points, self.modularity, self.plateau)

    def candidates(self) -> list[dict[str, Any]]:
        """Steps that plateau or drop, the lowest gain first: blocks that add little."""
        marked = [m for m in self.marks() if m["kind"] in ("plateau", "drop")]
        ranked = sorted(marked, key=lambda m: m["gain"])
        return [m | {"blocks": list(range(m["span"][0] + 1, m["span"][1] + 1))} for m in ranked]

    def span_gains(self, max_span: int) -> list[tuple[float, int, int]]:
        """``(Q_b - Q_a, a, b)`` of every span of up to ``max_span`` blocks between points read,
        lowest gain first (spans touching a point where Q is undefined are left out)."""
        q = dict(zip(self.points, self.modularity.tolist(), strict=True))
        gains = [
            (q[b] - q[a], a, b)
            for a in self.points
            for b in self.points
            if a < b <= a + max_span and np.isfinite(q[b] - q[a])
        ]
        return sorted(gains)

    def to_json(self) -> dict[str, Any]:
        def clean(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {
            "k": self.k,
            "tokens": self.attrs["tokens"],
            "points": [
                {"point": point_label(p), "modularity": clean(q), "edges": int(e)}
                for p, q, e in zip(self.points, self.modularity, self.n_edges, strict=True)
            ],
            "samples": self.n_samples,
            "selection": self.attrs.get("selection"),
            "marks": [m | {"gain": clean(m["gain"])} for m in self.marks()],
            "candidates": [m | {"gain": clean(m["gain"])} for m in self.candidates()],
            "plateau_share": self.plateau,
            "name": self.attrs.get("name"),
        }

    def format_table(self) -> str:
        marks = {m["span"][1]: m for m in self.marks()}
        lines = [f"{'point':>5} {'Q':>8} {'gain':>8} {'edges':>7}  mark"]
        for p, q, e in zip(self.points, self.modularity, self.n_edges, strict=True):
            mark = marks.get(p)
            gain = f"{mark['gain']:+8.4f}" if mark and np.isfinite(mark["gain"]) else f"{'':>8}"
            q_text = f"{q:8.4f}" if np.isfinite(q) else f"{'—':>8}"
            lines.append(
                f"{point_label(p):>5} {q_text} {gain} {int(e):>7,}  "
                f"{(mark or {}).get('kind') or ''}"
            )
        found = self.candidates()
        if found:
            lines.append(
                "candidates (Q plateaus or drops; lowest gain first): "
                + ", ".join(
                    f"{m['span'][0]}:{m['span'][1]} ({m['kind']}, {m['gain']:+.4f})" for m in found
                )
            )
        else:
            lines.append("candidates: none (Q rises at every step)")
        if not np.isfinite(self.modularity).all():
            lines.append(
                "— : Q undefined, every sample has the same representation there (e.g. h0's "
                "class token)"
            )
        return "\n".join(lines)

    def to_dataset(self) -> xr.Dataset:
        return xr.Dataset(
            {
                "modularity": ("point", self.modularity),
                "edges": ("point", self.n_edges.astype(np.int64)),
            },
            coords={"point": np.asarray(self.points, dtype=np.int64)},
            attrs=normalize(self.attrs),
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> ModularityCurve:
        attrs = dict(ds.attrs)
        return cls(
            points=[int(p) for p in ds["point"].values],
            modularity=np.asarray(ds["modularity"].values, dtype=np.float64),
            n_edges=np.asarray(ds["edges"].values, dtype=np.int64),
            n_samples=int(attrs["n_samples"]),
            attrs=attrs,
        )


# -- the Dask graph -----------------------------------------------------------------------------


def _shard_vectors(local: np.ndarray, tokens: str, after: Any, chunk: np.ndarray) -> np.ndarray:
    """Unit vectors of the selected samples of one shard of one point (``after``: the task it
    waits for, unused)."""
    return unit_rows(represent(chunk[local], tokens))


def _stack(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


def _join(unit_nc: np.ndarray, *blocks: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """One point's neighbours ``(indices, similarities)``, (n, k) each, from its blocks, and
    whether every sample has the same vector there (then no neighbourhood means anything)."""
    constant = bool(np.ptp(unit_nc, axis=0).max(initial=0.0) == 0.0)
    return (
        np.concatenate([b[0] for b in blocks]),
        np.concatenate([b[1] for b in blocks]),
        constant,
    )


def _point_result(labels: np.ndarray, joined: tuple[np.ndarray, np.ndarray, bool]) -> tuple:
    """Q and the edge count of one point from its neighbours (NaN, 0 when undefined)."""
    idx, sim, constant = joined
    if constant:
        return float("nan"), 0
    u, v, w = undirected_edges(idx, sim)
    return modularity(u, v, w, labels), len(w)


def knn_graph(
    store: Store,
    indices: np.ndarray,
    points: list[int],
    k: int,
    tokens: str = "cls",
    backend: str = "numpy",
    block_rows: int = BLOCK_ROWS,
) -> tuple[list[Any], int]:
    """Lazy ``(indices, similarities, constant)`` of every point's exact k-NN over the samples
    ``indices`` (neighbours given as positions in ``indices``), and the number of tasks.

    Per point: one task per shard reads that point's shard (each shard of each ``h_k`` is read
    once, as when all points are read together), one task stacks its unit vectors, one task per
    block of ``block_rows`` rows finds their neighbours among all rows. The points go one after
    the other (a point's reads wait for the previous point's neighbours), so memory holds one
    point's vectors and neighbours at a time, whatever the number of points; the shards and the
    blocks of a point run in parallel.
    """
    read = dask.delayed(on_shard, pure=True)
    ranges = shard_ranges(store.layout, indices)
    stack = dask.delayed(_stack, pure=True)
    neighbours = dask.delayed(knn_block, pure=True)
    join = dask.delayed(_join, pure=True)
    n = len(indices)
    per_point: list[Any] = []
    for point in points:
        after = per_point[-1] if per_point else None
        parts = [
            read(_shard_vectors, store, [point], start, stop, local, tokens, after)
            for local, start, stop in ranges
        ]
        vectors = stack(*parts)
        blocks = [
            neighbours(vectors, start, min(start + block_rows, n), k, backend, block_rows)
            for start in range(0, n, block_rows)
        ]
        per_point.append(join(vectors, *blocks))
    return per_point, len(points) * (len(ranges) + 2 + -(-n // block_rows))


def modularity_graph(
    store: Store,
    indices: np.ndarray,
    labels: np.ndarray,
    points: list[int],
    k: int,
    tokens: str = "cls",
    backend: str = "numpy",
    block_rows: int = BLOCK_ROWS,
) -> tuple[Any, int]:
    """The lazy computation of ``[(Q, edges) per point]`` and its number of tasks."""
    per_point, n_tasks = knn_graph(store, indices, points, k, tokens, backend, block_rows)
    result = dask.delayed(_point_result, pure=True)
    graph = dask.delayed(list, pure=True)([result(labels, joined) for joined in per_point])
    return graph, n_tasks + len(points)


# -- running, saving, reusing -------------------------------------------------------------------


def default_name(tokens: str, k: int, selection: SampleSelection, suffix: str = "") -> str:
    """``tokens-cls-k10``, ``tokens-mean-k20-limit500`` ...: what was computed."""
    return f"tokens-{tokens}-k{k}{selection_suffix(selection)}{suffix}"


def modularity_attrs(
    store: Store,
    tokens: str,
    k: int,
    selection: SampleSelection,
    points: list[int],
    allow_incomplete: bool,
) -> dict[str, Any]:
    """What a saved curve records of what it covers (what reuse compares)."""
    return {
        "kind": "modularity",
        "store_fingerprint": store.fingerprint,
        "tokens": tokens,
        "k": k,
        "selection": selection.describe(),
        "points": points,
        "allow_incomplete": allow_incomplete,
        "weights": "cosine",
        "resolution": 1.0,
    }


def run_modularity(
    store: Store | str | Path,
    *,
    k: int = DEFAULT_K,
    tokens: str = "cls",
    selection: SampleSelection | None = None,
    points: str | list[int] | None = None,
    name: str | None = None,
    allow_incomplete: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    block_rows: int = BLOCK_ROWS,
    save: bool = True,
) -> tuple[ModularityCurve, bool]:
    """Compute (or reuse) the modularity curve saved as ``modularity/<name>``.

    Returns (curve, reused). Every check runs before any work: tokens, points, k against the
    number of labelled samples, the backend.
    """
    selection = selection or SampleSelection()
    store = Store.coerce(store)
    chosen = points if isinstance(points, list) else parse_points(points, store)
    check_reading_tokens(store, tokens)
    if k < 1:
        raise UsageError(f"--k {k} is invalid; pass a positive number of neighbours")
    if block_rows < 1:
        raise UsageError(f"block_rows {block_rows} is invalid; pass a positive number")
    name = name or default_name(
        tokens, k, selection, points_suffix(chosen, store.layout.stored_blocks)
    )
    wanted = modularity_attrs(store, tokens, k, selection, chosen, allow_incomplete)
    saved = store.read_analysis(MODULARITY, name)
    if saved is not None and not overwrite:
        curve = ModularityCurve.from_dataset(saved)
        if {key: curve.attrs.get(key) for key in wanted} == normalize(wanted):
            return curve, True
        raise UsageError(
            f"a modularity curve {name!r} already exists in {str(store)!r} with other options; "
            "pass --overwrite to replace it, or another --name"
        )
    rows = labelled_rows(store, selection, allow_incomplete, "modularity of the class partition")
    n = len(rows.indices)
    if k >= n:
        raise UsageError(
            f"--k {k} needs more than {k} labelled samples, and {str(store)!r} gives {n}; "
            f"pass --k below {n}"
        )
    get_xp(backend)  # refuses cupy without a GPU before any work
    graph, n_tasks = modularity_graph(
        store, rows.indices, rows.labels, chosen, k, tokens, backend, block_rows
    )
    results = compute(graph, scheduler, scheduler_file, n_tasks)
    attrs = wanted | {
        "name": name,
        "n_samples": n,
        "n_unlabelled": rows.n_unlabelled,
        "n_classes": rows.n_classes,
    }
    curve = ModularityCurve(
        points=chosen,
        modularity=np.array([q for q, _ in results], dtype=np.float64),
        n_edges=np.array([e for _, e in results], dtype=np.int64),
        n_samples=n,
        attrs=attrs,
    )
    if save:
        store.write_analysis(MODULARITY, name, curve.to_dataset())
    return curve, False


def modularity_spans(store: Store | str | Path, top: int, max_span: int) -> list[tuple[int, int]]:
    """The ``top`` spans of up to ``max_span`` blocks whose gain in Q is lowest (the default
    curve, computed and saved when missing): what ``select --candidates-by modularity`` tries."""
    curve, _ = run_modularity(store)
    return [(a, b) for _, a, b in curve.span_gains(max_span)[:top]]
