"""Block statistics as one lazy Dask reduction over the store's shards.

Each shard-aligned chunk of every ``h_k`` is read once, by the one task that turns it into float64
:class:`~rba_store.stats.moments.BlockPartials`; partials are merged pairwise in a tree and the
result is derived at the end. Memory: a few chunks plus the (p, p) co-moment partials, whatever
the number of samples. The same graph runs on the local threaded scheduler or on a
``dask.distributed`` cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from rba_store import schema
from rba_store.errors import IncompleteStoreError, UsageError
from rba_store.stats.moments import BlockPartials, chunk_partials
from rba_store.stats.result import BlockStats


@dataclass(frozen=True)
class SampleSelection:
    """Which samples to use: all, the first ``limit``, or ``sample`` drawn with ``seed``."""

    limit: int | None = None
    sample: int | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        if self.sample is not None:
            return {"mode": "sample", "n": self.sample, "seed": self.seed}
        if self.limit is not None:
            return {"mode": "limit", "n": self.limit}
        return {"mode": "all"}

    def indices(self, available: np.ndarray, store: str) -> np.ndarray:
        """Sorted sample indices, chosen among the ``available`` ones (complete shards)."""
        if self.limit is not None and self.sample is not None:
            raise UsageError("--limit and --sample exclude each other; pass only one")
        wanted = self.sample if self.sample is not None else self.limit
        if wanted is None:
            return available
        option = "--sample" if self.sample is not None else "--limit"
        if wanted < 1 or wanted > len(available):
            raise UsageError(
                f"{option} {wanted} is out of range for {store!r}, which has {len(available)} "
                f"usable samples; pass 1..{len(available)}"
            )
        if self.sample is None:
            return available[:wanted]
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(available, size=wanted, replace=False))


def usable_samples(
    group: Any, layout: schema.StoreLayout, store: str, allow_incomplete: bool
) -> np.ndarray:
    """Indices of the samples in complete shards; refuses an incomplete store unless allowed."""
    complete = schema.completed_shards(group)
    ranges = [layout.shard_rows(s) for s in range(layout.n_shards) if complete[s]]
    available = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.arange(0)
    if not complete.all() and not allow_incomplete:
        raise IncompleteStoreError(
            f"store {store!r} is incomplete: {int(complete.sum())}/{layout.n_shards} shards "
            f"({len(available)}/{layout.n_samples} samples) are written; finish it by re-running "
            "the same 'rba-store extract' command, or pass --allow-incomplete to use what is there"
        )
    if len(available) == 0:
        raise IncompleteStoreError(
            f"store {store!r} holds no complete shard yet; run 'rba-store extract' to fill it"
        )
    return available


def check_tokens(description: dict[str, Any], tokens: str, store: str) -> None:
    """Refuse a token selection the store cannot give."""
    if tokens not in ("all", "cls"):
        raise UsageError(f"--tokens {tokens!r} is not valid; use all or cls")
    if tokens == "all" and description["tokens"] == "cls":
        raise UsageError(
            f"--tokens all needs every token, but {store!r} holds the class token only "
            "(extracted with --tokens cls); use --tokens cls, or re-extract with --tokens all"
        )
    if tokens == "cls" and not description["model"].get("has_class_token", False):
        raise UsageError(
            f"--tokens cls needs a class token, and the model of {store!r} "
            f"({description['model']['name']}) has none; use --tokens all"
        )


def _shard_partials(
    local_idx: np.ndarray, cls_only: bool, cka: bool, *chunks: np.ndarray
) -> BlockPartials:
    points = [chunk[local_idx] for chunk in chunks]
    if cls_only:
        points = [p[:, :1] for p in points]
    return chunk_partials(points, cka)


def _merge(a: BlockPartials, b: BlockPartials) -> BlockPartials:
    return a.merge(b)


def _tree(parts: list[Delayed]) -> Delayed:
    merge = dask.delayed(_merge, pure=True)
    while len(parts) > 1:
        paired = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = paired + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def stats_graph(
    store: str | Path, indices: np.ndarray, tokens: str = "all", cka: bool = True
) -> tuple[Delayed, list[int]]:
    """The lazy reduction (one task per shard holding selected samples) and the point widths."""
    group = schema.open_store(store)
    layout = schema.read_layout(group)
    arrays = [
        da.from_zarr(
            group[schema.h_name(k)], chunks=(layout.shard_samples, p.n_tokens, p.n_channels)
        )
        for k, p in enumerate(layout.points)
    ]
    task = dask.delayed(_shard_partials, pure=True)
    parts = []
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        local = indices[(indices >= start) & (indices < stop)] - start
        if len(local):
            chunks = [array.blocks[shard].to_delayed().ravel()[0] for array in arrays]
            parts.append(task(local, tokens == "cls", cka, *chunks))
    widths = [p.n_channels for p in layout.points]
    return _tree(parts), widths


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


def compute_block_stats(
    store: str | Path,
    *,
    tokens: str = "all",
    selection: SampleSelection | None = None,
    allow_incomplete: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    cka: bool = True,
) -> BlockStats:
    """BR, relative change, cosine, norms and exact linear CKA of every block, in one pass.

    ``cka=False`` skips the joint co-moments (the (p, p) product per chunk that dominates the
    cost when p = (L+1)*channels is large); the CKA matrix is then NaN.
    """
    selection = selection or SampleSelection()
    group = schema.open_store(store)
    description = schema.read_description(group)
    layout = schema.read_layout(group)
    check_tokens(description, tokens, str(store))
    available = usable_samples(group, layout, str(store), allow_incomplete)
    indices = selection.indices(available, str(store))
    graph, widths = stats_graph(store, indices, tokens, cka)
    with dask_client(scheduler, scheduler_file) as client:
        partials = client.compute(graph).result() if client is not None else graph.compute()
    attrs = {
        "kind": "block_stats",
        "store_fingerprint": description["fingerprint"],
        "tokens": tokens,
        "selection": selection.describe(),
        "allow_incomplete": allow_incomplete,
        "cka": cka,
    }
    return BlockStats.from_partials(partials, widths, attrs)
