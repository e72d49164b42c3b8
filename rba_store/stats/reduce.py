"""Block statistics as one lazy Dask reduction over the store's shards.

Each shard-aligned chunk of every ``h_k`` is read once, by the one task that turns it into float64
:class:`~rba_store.stats.moments.BlockPartials`; partials are merged pairwise in a tree and the
result is derived at the end. Memory: a few chunks plus the (p, p) co-moment partials, whatever
the number of samples. The same graph runs on the local threaded scheduler or on a
``dask.distributed`` cluster.
"""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
from dask.delayed import Delayed

from rba_store import schema
from rba_store.daskutil import compute, on_shard, shard_ranges, tree_reduce
from rba_store.selection import SampleSelection, check_tokens, usable_samples
from rba_store.stats.moments import BlockPartials, chunk_partials
from rba_store.stats.result import BlockStats


def _shard_partials(
    local_idx: np.ndarray, cls_only: bool, cka: bool, *chunks: np.ndarray
) -> BlockPartials:
    points = [chunk[local_idx] for chunk in chunks]
    if cls_only:
        points = [p[:, :1] for p in points]
    return chunk_partials(points, cka)


def _merge(a: BlockPartials, b: BlockPartials) -> BlockPartials:
    return a.merge(b)


def stats_graph(
    store: str | Path,
    layout: schema.StoreLayout,
    indices: np.ndarray,
    tokens: str = "all",
    cka: bool = True,
) -> tuple[Delayed, int]:
    """The lazy reduction and its number of shard tasks (one per shard with selected samples)."""
    points = list(range(len(layout.points)))
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(_shard_partials, str(store), points, start, stop, local, tokens == "cls", cka)
        for local, start, stop in shard_ranges(layout, indices)
    ]
    return tree_reduce(parts, _merge), len(parts)


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
    graph, n_tasks = stats_graph(store, layout, indices, tokens, cka)
    partials = compute(graph, scheduler, scheduler_file, n_tasks)
    widths = [p.n_channels for p in layout.points]
    attrs = {
        "kind": "block_stats",
        "store_fingerprint": description["fingerprint"],
        "tokens": tokens,
        "selection": selection.describe(),
        "allow_incomplete": allow_incomplete,
        "cka": cka,
    }
    return BlockStats.from_partials(partials, widths, attrs)
