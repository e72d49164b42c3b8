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

from rba_store.dask_compute import compute, tree_reduce
from rba_store.solve._backend import get_xp
from rba_store.stats.moments import BlockPartials, split_chunk_partials
from rba_store.stats.result import BlockStats
from rba_store.store import SampleSelection, Store
from rba_store.store.reading import on_shard, shard_ranges
from rba_store.store.selection import (
    check_tokens,
    describe_holdout,
    split_holdout,
    usable_samples,
)


def _shard_partials(
    local_idx: np.ndarray,
    held: np.ndarray,
    cls_only: bool,
    cka: bool,
    backend: str,
    *chunks: np.ndarray,
) -> BlockPartials:
    points = [chunk[local_idx] for chunk in chunks]
    if cls_only:
        points = [p[:, :1] for p in points]
    return split_chunk_partials(points, held, cka, get_xp(backend))


def _merge(a: BlockPartials, b: BlockPartials) -> BlockPartials:
    return a.merge(b)


def stats_graph(
    store: Store,
    indices: np.ndarray,
    tokens: str = "all",
    cka: bool = True,
    backend: str = "numpy",
    held: np.ndarray | None = None,
) -> tuple[Delayed, int]:
    """The lazy reduction and its number of shard tasks (one per shard with selected samples).

    ``held``: the selected samples whose joint moments are kept apart (held out), if any.
    """
    layout = store.layout
    points = list(range(len(layout.points)))
    held = indices[:0] if held is None else held
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(
            _shard_partials,
            store,
            points,
            start,
            stop,
            local,
            np.isin(local + start, held),
            tokens == "cls",
            cka,
            backend,
        )
        for local, start, stop in shard_ranges(layout, indices)
    ]
    return tree_reduce(parts, _merge), len(parts)


def compute_block_stats(
    store: Store | str | Path,
    *,
    tokens: str = "all",
    selection: SampleSelection | None = None,
    allow_incomplete: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    cka: bool = True,
    backend: str = "auto",
    holdout: float | None = None,
    holdout_seed: int = 0,
) -> BlockStats:
    """BR, relative change, cosine, norms and exact linear CKA of every block, in one pass.

    ``cka=False`` skips the joint co-moments (the (p, p) product per chunk that dominates the
    cost when p = (L+1)*channels is large); the CKA matrix is then NaN. ``holdout``: the joint
    moments of that fraction of the samples (drawn with ``holdout_seed``, as ``fit --holdout``
    draws them) are kept apart, for exact held-out diagnostics of fits from the moments.
    """
    selection = selection or SampleSelection()
    store = Store.coerce(store)
    get_xp(backend)  # refuses cupy without a GPU before any work
    check_tokens(store, tokens)
    available = usable_samples(store, allow_incomplete)
    indices = selection.indices(available, store)
    held = split_holdout(indices, holdout, holdout_seed)[1] if cka else None
    graph, n_tasks = stats_graph(store, indices, tokens, cka, backend, held)
    partials = compute(graph, scheduler, scheduler_file, n_tasks)
    widths = [p.n_channels for p in store.layout.points]
    attrs = stats_attrs(store, tokens, selection, allow_incomplete, cka, holdout, holdout_seed)
    return BlockStats.from_partials(partials, widths, attrs)


def stats_attrs(
    store: Store,
    tokens: str,
    selection: SampleSelection,
    allow_incomplete: bool,
    cka: bool,
    holdout: float | None = None,
    holdout_seed: int = 0,
) -> dict[str, object]:
    """What saved statistics record of the rows they cover (what reuse checks compare)."""
    return {
        "kind": "block_stats",
        "store_fingerprint": store.fingerprint,
        "tokens": tokens,
        "selection": selection.describe(),
        "allow_incomplete": allow_incomplete,
        "cka": cka,
        "holdout": describe_holdout(holdout, holdout_seed) if cka else None,
    }
