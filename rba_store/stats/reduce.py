"""Block statistics as one lazy Dask reduction over the store's shards.

Each shard-aligned chunk of every ``h_k`` is read once, by the one task that turns it into float64
:class:`~rba_store.stats.partials.BlockPartials`; partials are merged pairwise in a tree and the
result is derived at the end. Memory: a few chunks plus the co-moment partials of the pairs of
points kept (the band, or every pair; :mod:`rba_store.stats.memory`), whatever the number of
samples. With ``cka_pairs="all"`` and a band, further passes compute the CKA of the pairs
outside it, as many pairs per pass as the memory allows. The same graph runs on the local
threaded scheduler or on a ``dask.distributed`` cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
from dask.delayed import Delayed

from rba_store.dask_compute import compute, concurrency, tree_reduce
from rba_store.errors import UsageError
from rba_store.solve._backend import get_xp
from rba_store.stats import memory
from rba_store.stats.moments import Pair, PairMoments, band_pairs, hsic_of
from rba_store.stats.partials import BlockPartials, pair_moments_of_chunk, split_chunk_partials
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
    band: int | None,
    n_h: int,
    *chunks: np.ndarray,
) -> BlockPartials:
    """``chunks``: ``h0 .. hL`` (``n_h`` of them), then any MLP outputs ``m1 .. mL``."""
    points = [chunk[local_idx] for chunk in chunks]
    if cls_only:
        points = [p[:, :1] for p in points]
    return split_chunk_partials(points[:n_h], held, cka, get_xp(backend), band, points[n_h:])


def _merge(a: BlockPartials, b: BlockPartials) -> BlockPartials:
    return a.merge(b, inplace=True)  # each partial of the tree is merged once


def _shard_pair_moments(
    local_idx: np.ndarray, cls_only: bool, pairs: list[Pair], backend: str, *chunks: np.ndarray
) -> PairMoments:
    points = [chunk[local_idx] for chunk in chunks]
    if cls_only:
        points = [p[:, :1] for p in points]
    return pair_moments_of_chunk(points, pairs, get_xp(backend))


def _merge_pairs(a: PairMoments, b: PairMoments) -> PairMoments:
    return a.merge(b, inplace=True)


def stats_graph(
    store: Store,
    indices: np.ndarray,
    tokens: str = "all",
    cka: bool = True,
    backend: str = "numpy",
    held: np.ndarray | None = None,
    band: int | None = None,
) -> tuple[Delayed, int]:
    """The lazy reduction and its number of shard tasks (one per shard with selected samples).

    ``held``: the selected samples whose joint moments are kept apart (held out), if any.
    ``band``: the joint moments of pairs at most this far apart are kept (None: every pair).
    """
    layout = store.layout
    n_h = len(layout.points)
    # With MLP outputs stored, the joint moments cover them too (folded fits read them).
    points = list(layout.stored_indices)
    if not (cka and store.holds_mlp_outputs):
        points = points[:n_h]
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
            band,
            n_h,
        )
        for local, start, stop in shard_ranges(layout, indices)
    ]
    return tree_reduce(parts, _merge), len(parts)


def pairs_graph(
    store: Store, indices: np.ndarray, tokens: str, pairs: list[Pair], backend: str
) -> tuple[Delayed, int]:
    """A further pass: the joint moments of ``pairs`` only, over the selected rows."""
    layout = store.layout
    points = list(layout.stored_blocks)
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(
            _shard_pair_moments, store, points, start, stop, local, tokens == "cls", pairs, backend
        )
        for local, start, stop in shard_ranges(layout, indices)
    ]
    return tree_reduce(parts, _merge_pairs), len(parts)


CKA_PAIRS = ("auto", "band", "all")


@dataclass(frozen=True)
class StatsPlan:
    """What a ``stats`` pass will keep and take, decided before it starts."""

    band: int | None  # joint moments kept for pairs at most this far apart (None: every pair)
    max_span: int
    cka: bool
    offband_pairs: tuple[Pair, ...]  # pairs whose CKA further passes compute
    pairs_per_pass: int
    memory: memory.StatsMemory
    n_samples: int
    n_rows: int

    @property
    def n_passes(self) -> int:
        extra = (
            math.ceil(len(self.offband_pairs) / self.pairs_per_pass) if self.offband_pairs else 0
        )
        return 1 + extra

    def describe(self) -> str:
        if not self.cka:
            what = "no joint moments (--no-cka): BR, relative change, cosine and norms only"
        elif self.band is None:
            what = (
                "joint moments of every pair of points: the whole CKA matrix, the fit of every span"
            )
        else:
            what = (
                f"joint moments of the band (spans of at most {self.max_span} blocks): the fit of "
                "every span in it, CKA "
                + (
                    f"of the other {len(self.offband_pairs)} pairs in {self.n_passes - 1} "
                    "further pass(es) over the store"
                    if self.offband_pairs
                    else "on the band only (--cka-pairs all computes the rest in further passes)"
                )
            )
        return (
            f"{self.n_samples:,} samples, {self.n_rows:,} token vectors; {what}\n"
            f"memory: {self.memory.describe()}"
        )


def plan_stats(
    store: Store,
    indices: np.ndarray,
    tokens: str,
    *,
    cka: bool = True,
    holdout: bool = False,
    max_span: int = 4,
    cka_pairs: str = "auto",
    workers: int | None = None,
) -> StatsPlan:
    """Choose the band and the passes, and refuse (one line, :class:`MemoryBudgetError`) a
    configuration that does not fit in the memory available.

    ``cka_pairs``: ``band`` keeps the joint moments of spans of at most ``max_span`` blocks (CKA
    on those pairs only); ``all`` computes the CKA of every pair, in one pass when all the
    moments fit, otherwise with further passes for the pairs outside the band; ``auto`` keeps
    every pair when one partial of them takes at most 1 GiB (ViT-B at 224 px and smaller), else
    the band.
    """
    if cka_pairs not in CKA_PAIRS:
        raise UsageError(f"--cka-pairs {cka_pairs!r} is not valid; use {', '.join(CKA_PAIRS)}")
    if max_span < 1:
        raise UsageError(f"--max-span {max_span} is invalid; pass a positive number of blocks")
    layout = store.layout
    widths = [p.n_channels for p in layout.points]
    k = len(widths)
    t = 1 if tokens == "cls" else layout.points[0].n_tokens
    itemsize = 2 if layout.dtype in ("float16", "bfloat16") else 4
    workers = workers or min(concurrency(None), max(1, len(shard_ranges(layout, indices))))

    def cost(band: int | None, with_cka: bool = True) -> memory.StatsMemory:
        return memory.stats_memory(
            widths,
            t,
            layout.shard_samples,
            itemsize,
            band,
            cka=with_cka and cka,
            holdout=holdout,
            workers=workers,
            mlp_outputs=store.holds_mlp_outputs,
        )

    steps = layout_steps(layout.stored_blocks, max_span)  # max_span itself unless --points
    band: int | None = None if steps >= k - 1 else steps
    offband: tuple[Pair, ...] = ()
    per_pass = 1
    available = memory.available_memory()
    if cka and band is not None:
        full = cost(None)
        if cka_pairs == "auto" and full.partial <= memory.FULL_AUTO_LIMIT:
            band = None
        elif cka_pairs == "all":
            if available is None or full.peak <= available:
                band = None
            elif not store.holds_activations:
                raise UsageError(
                    f"--cka-pairs all: every pair's joint moments need about "
                    f"{memory.gib(full.peak)} and {memory.gib(available)} is available, and "
                    f"{str(store)!r} holds no activations for further passes; use --cka-pairs band"
                )
            else:
                kept = set(band_pairs(k, band))
                offband = tuple(p for p in band_pairs(k, None) if p not in kept)
    chosen = cost(band)
    if offband:
        wide = max(widths)
        room = (available or 0) - chosen.peak
        pass_partials = chosen.workers + 2
        per_pass = max(1, room // (pass_partials * wide * wide * 8))
    needed = chosen.peak
    if available is not None and needed > available:
        hints = []
        smaller = next(
            (s for s in range(min(max_span, k - 1) - 1, 0, -1) if cost(s).peak <= available), None
        )
        if cka and smaller is not None:
            hints.append(f"--max-span {smaller} ({memory.gib(cost(smaller).peak)})")
        if cka:
            hints.append(f"--no-cka ({memory.gib(cost(band, False).peak)})")
        hints.append("or fit spans one at a time, streamed: 'rba-store fit STORE --span A:B'")
        pairs = "every pair" if band is None else f"the band of spans up to {band} blocks"
        memory.check_fits(
            needed,
            f"stats with the joint moments of {pairs} ({chosen.pairs} blocks of "
            f"{max(widths)}x{max(widths)} float64, {memory.gib(chosen.partial)} per partial)",
            "pass " + ", ".join(hints),
        )
    n_rows = len(indices) * t
    return StatsPlan(band, max_span, cka, offband, int(per_pass), chosen, len(indices), n_rows)


def offband_hsic(
    store: Store,
    indices: np.ndarray,
    tokens: str,
    plan: StatsPlan,
    backend: str,
    scheduler: str | None,
    scheduler_file: str | None,
) -> np.ndarray:
    """‖XcᵀYc‖²_F of the pairs outside the band, over all selected rows: further passes, each
    with as many pairs as the memory allows."""
    k = len(store.layout.points)
    hsic = np.full((k, k), np.nan)
    pairs = list(plan.offband_pairs)
    for start in range(0, len(pairs), plan.pairs_per_pass):
        chunk = pairs[start : start + plan.pairs_per_pass]
        graph, n_tasks = pairs_graph(store, indices, tokens, chunk, backend)
        moments = compute(graph, scheduler, scheduler_file, n_tasks)
        found = hsic_of(moments)
        hsic = np.where(np.isnan(hsic), found, hsic)
        del moments
    return hsic


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
    max_span: int = 4,
    cka_pairs: str = "auto",
    plan: StatsPlan | None = None,
) -> BlockStats:
    """BR, relative change, cosine, norms and exact linear CKA of every block, in one pass.

    ``cka=False`` skips the joint co-moments (the products per chunk that dominate the cost when
    p = (L+1)*channels is large); the CKA matrix is then NaN. ``holdout``: the joint moments of
    that fraction of the samples (drawn with ``holdout_seed``, as ``fit --holdout`` draws them)
    are kept apart, for exact held-out diagnostics of fits from the moments. ``max_span`` and
    ``cka_pairs``: which pairs of points keep their joint moments (see :func:`plan_stats`).
    """
    selection = selection or SampleSelection()
    store = Store.coerce(store)
    get_xp(backend)  # refuses cupy without a GPU before any work
    check_tokens(store, tokens)
    available = usable_samples(store, allow_incomplete)
    indices = selection.indices(available, store)
    held = split_holdout(indices, holdout, holdout_seed)[1] if cka else None
    if plan is None:
        plan = plan_stats(
            store,
            indices,
            tokens,
            cka=cka,
            holdout=held is not None and len(held) > 0,
            max_span=max_span,
            cka_pairs=cka_pairs,
        )
    graph, n_tasks = stats_graph(store, indices, tokens, cka, backend, held, plan.band)
    partials = compute(graph, scheduler, scheduler_file, n_tasks)
    extra = None
    if plan.offband_pairs:
        extra = offband_hsic(store, indices, tokens, plan, backend, scheduler, scheduler_file)
    widths = [p.n_channels for p in store.layout.points]
    attrs = stats_attrs(store, tokens, selection, allow_incomplete, cka, holdout, holdout_seed)
    return BlockStats.from_partials(partials, widths, attrs, extra)


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
    attrs: dict[str, object] = {
        "kind": "block_stats",
        "store_fingerprint": store.fingerprint,
        "tokens": tokens,
        "selection": selection.describe(),
        "allow_incomplete": allow_incomplete,
        "cka": cka,
        "holdout": describe_holdout(holdout, holdout_seed) if cka else None,
    }
    if store.layout.some_points:  # extract --points: the statistics cover these h_k only
        attrs["stored_points"] = list(store.layout.stored_blocks)
    return attrs


def layout_steps(blocks: tuple[int, ...], max_span: int) -> int:
    """How many consecutive stored points the spans of at most ``max_span`` blocks cross: the
    band (in points) that keeps all their joint moments; ``max_span`` when every point is
    stored, at least 1."""
    return max(
        [1] + [sum(1 for b in blocks[i + 1 :] if b - a <= max_span) for i, a in enumerate(blocks)]
    )
