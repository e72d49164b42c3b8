"""Dask plumbing shared by the analyses: tree reductions and connecting to a cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import dask
import dask.array as da
import zarr
from dask.delayed import Delayed

from rba_store import schema
from rba_store.errors import UsageError


def shard_chunks(group: zarr.Group, points: list[int]) -> list[list[Delayed]]:
    """Lazy reads of the given ``h_k``, one shard-aligned chunk per shard: ``[shard][i]``."""
    layout = schema.read_layout(group)
    arrays = []
    for k in points:
        p = layout.points[k]
        chunks = (layout.shard_samples, p.n_tokens, p.n_channels)
        arrays.append(da.from_zarr(group[schema.h_name(k)], chunks=chunks))
    return [
        [array.blocks[shard].to_delayed().ravel()[0] for array in arrays]
        for shard in range(layout.n_shards)
    ]


def tree_reduce(parts: list[Delayed], combine: Callable[[Any, Any], Any]) -> Delayed:
    """Combine delayed partial results pairwise, level by level (a balanced tree)."""
    merge = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        paired = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = paired + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, scheduler_file: str | None = None) -> Iterator[Any]:
    """A ``dask.distributed`` client for a running cluster, or None for the local scheduler."""
    if scheduler is None and scheduler_file is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as e:  # pragma: no cover - distributed is a dependency
        raise UsageError("--scheduler needs dask.distributed: pip install distributed") from e
    try:
        client = Client(scheduler, scheduler_file=scheduler_file, timeout="10s")
    except (OSError, TimeoutError, ValueError) as e:
        where = scheduler or scheduler_file
        raise UsageError(
            f"cannot connect to the Dask scheduler {where!r} ({e}); start one with "
            "'dask scheduler' or pass the address it prints"
        ) from e
    with client:
        yield client


def compute(graph: Delayed, scheduler: str | None = None, scheduler_file: str | None = None) -> Any:
    """Compute a delayed result locally (threads) or on a running ``dask.distributed`` cluster."""
    with dask_client(scheduler, scheduler_file) as client:
        return client.compute(graph).result() if client is not None else graph.compute()
