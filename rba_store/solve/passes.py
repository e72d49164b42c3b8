"""The passes over the store that a fit makes: per-shard tasks accumulating the normal equations
(merged in a tree, or folded in store order with checkpoints), and the held-out pass."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask
import numpy as np

from rba_store.dask_compute import (
    compute,
    compute_with,
    concurrency,
    dask_client,
    shared_constant,
    tree_reduce,
)
from rba_store.errors import NonFiniteError
from rba_store.solve._backend import get_xp
from rba_store.solve.checkpoint import checkpoint_key, load_checkpoint, save_checkpoint
from rba_store.solve.heldout import HoldoutSums
from rba_store.solve.normal_eq import NormalEquations
from rba_store.solve.spans import FitOptions
from rba_store.store import Store
from rba_store.store.reading import on_shard, shard_ranges

# -- tasks (run on workers) -------------------------------------------------------------------


def _rows(chunk: np.ndarray, local: np.ndarray, cls_only: bool) -> np.ndarray:
    whole = len(local) == len(chunk) and local[0] == 0 and local[-1] == len(chunk) - 1
    points = chunk if whole else chunk[local]  # no copy when the whole shard is selected
    if cls_only:
        points = points[:, :1]
    return points.reshape(-1, points.shape[-1])


def _check_finite(
    chunks: tuple[np.ndarray, ...], points: list[int], local: np.ndarray, start: int
) -> None:
    for k, chunk in zip(points, chunks, strict=True):
        bad = ~np.isfinite(chunk[local]).all(axis=tuple(range(1, chunk.ndim)))
        if bad.any():
            rows = start + local[bad]
            raise NonFiniteError(
                f"h{k} holds NaN or Inf in samples {rows.min()}..{rows.max()} ({bad.sum()} "
                "samples); re-extract the store, or leave them out with --limit/--sample"
            )


def _accumulate(
    local: np.ndarray,
    start: int,
    cls_only: bool,
    plan: list[tuple[int, list[int]]],
    points: list[int],
    backend: str,
    gemm_dtype: str,
    *chunks: np.ndarray,
) -> dict[int, NormalEquations]:
    xp = get_xp(backend)
    position = {k: i for i, k in enumerate(points)}
    out = {}
    for a, targets in plan:
        x = xp.asarray(_rows(chunks[position[a]], local, cls_only))
        ys = [xp.asarray(_rows(chunks[position[b]], local, cls_only)) for b in targets]
        y = ys[0] if len(ys) == 1 else xp.concatenate(ys, axis=1)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported below
            ne = NormalEquations.from_chunk(x, y, xp, gemm_dtype)
        finite = xp.isfinite(xp.diagonal(ne.sxx)).all() and xp.isfinite(ne.syy).all()
        if not bool(finite):
            _check_finite(chunks, points, local, start)
        out[a] = ne
    return out


def _merge_equations(
    left: dict[int, NormalEquations], right: dict[int, NormalEquations]
) -> dict[int, NormalEquations]:
    return {a: left[a].merge(right[a]) for a in left}


def _holdout(
    local: np.ndarray,
    cls_only: bool,
    maps: list[tuple[int, int, np.ndarray, np.ndarray]],
    points: list[int],
    *chunks: np.ndarray,
) -> list[HoldoutSums]:
    position = {k: i for i, k in enumerate(points)}
    return [
        HoldoutSums.from_chunk(
            _rows(chunks[position[a]], local, cls_only),
            _rows(chunks[position[b]], local, cls_only),
            t,
            bias,
        )
        for a, b, t, bias in maps
    ]


def _merge_holdout(left: list[HoldoutSums], right: list[HoldoutSums]) -> list[HoldoutSums]:
    return [a.merge(b) for a, b in zip(left, right, strict=True)]


# -- passes ------------------------------------------------------------------------------------


def holdout_sums(
    store: Store,
    indices: np.ndarray,
    cls_only: bool,
    maps: list[tuple[int, int, Any, Any]],
    options: FitOptions,
) -> list[HoldoutSums]:
    """Held-out sums of every map over the samples ``indices``, one task per shard. The maps
    (D x D each) enter the graph once, not once per task (:func:`shared_constant`)."""
    points = sorted({a for a, *_ in maps} | {b for _, b, *_ in maps})
    task = dask.delayed(on_shard, pure=True)
    with dask_client(options.scheduler, options.scheduler_file) as client:
        shared = shared_constant(client, maps)
        parts = [
            task(_holdout, store, points, start, stop, local, cls_only, shared, points)
            for local, start, stop in shard_ranges(store.layout, indices)
        ]
        merged = tree_reduce(parts, _merge_holdout)
        return compute_with(client, merged, len(parts))


def equations(
    store: Store,
    rows: np.ndarray,
    plan: list[tuple[int, list[int]]],
    points: list[int],
    cls_only: bool,
    options: FitOptions,
) -> dict[int, NormalEquations]:
    """The normal equations of every source over ``rows``: one task per shard, merged."""
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(
            _accumulate,
            store,
            points,
            start,
            stop,
            local,
            start,
            cls_only,
            plan,
            points,
            options.backend,
            options.gemm_dtype,
        )
        for local, start, stop in shard_ranges(store.layout, rows)
    ]
    if options.checkpoint is None:
        graph = tree_reduce(parts, _merge_equations)
        return compute(graph, options.scheduler, options.scheduler_file, len(parts))
    key = checkpoint_key(
        {
            "store": store.fingerprint,
            "plan": plan,
            "tokens": options.tokens,
            "gemm_dtype": options.gemm_dtype,
        },
        rows,
    )
    return _resumable_equations(parts, Path(options.checkpoint), key, options)


def _shards_per_group(client: Any) -> int:
    """Shards computed between two folds: several per core, so that few barriers stall them."""
    return 4 * concurrency(client)


def _resumable_equations(
    parts: list[Any], path: Path, key: str, options: FitOptions
) -> dict[int, NormalEquations]:
    """Shards in groups (several per core), folded in store order; checkpointed.

    The fold order is fixed (shard 0, 1, 2, ...), so a run resumed from any checkpoint gives
    bit for bit the accumulators, and T, of an uninterrupted one. ``state`` (shards folded,
    accumulators) changes in one assignment, so a Ctrl-C never saves a half-folded group.
    """
    state = load_checkpoint(path, key) or (0, {})
    last_saved = time.monotonic()
    with dask_client(options.scheduler, options.scheduler_file) as client:
        group = _shards_per_group(client)
        try:
            while state[0] < len(parts):
                done, total = state
                batch = parts[done : done + group]
                for partial in compute_with(client, dask.delayed(list)(batch), len(parts)):
                    host = {a: ne.to_numpy() for a, ne in partial.items()}
                    total = _merge_equations(total, host) if total else host
                state = (done + len(batch), total)
                due = time.monotonic() - last_saved >= options.checkpoint_every
                if due and state[0] < len(parts):
                    save_checkpoint(path, key, *state)
                    last_saved = time.monotonic()
        except KeyboardInterrupt:
            if state[1]:  # Ctrl-C: keep what is folded so far
                save_checkpoint(path, key, *state)
            raise
    return state[1]
