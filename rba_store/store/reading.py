"""Reading the store shard by shard, inside the tasks that consume the data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rba_store.store.handle import Store
from rba_store.store.layout import StoreLayout


def shard_ranges(layout: StoreLayout, indices: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """``(local indices, start, stop)`` of every shard holding some of the selected samples."""
    out = []
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        local = indices[(indices >= start) & (indices < stop)] - start
        if len(local):
            out.append((local, start, stop))
    return out


def on_shard(
    fn: Callable[..., Any], store: Store, points: list[int], start: int, stop: int, *args: Any
) -> Any:
    """Read ``h_k[start:stop]`` for every k in ``points`` and call ``fn(*args, *chunks)``.

    Reading inside the task that consumes the data (rather than as separate Dask tasks) keeps
    at most one shard per running task in memory: the scheduler cannot read ahead. Locally the
    tasks share the command's open :class:`Store`; a cluster's workers reopen it by path.
    """
    return fn(*args, *store.read_points(points, start, stop))
