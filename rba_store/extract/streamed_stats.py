"""Block statistics and joint moments accumulated during extraction (``extract --stats``).

Each shard's float64 partials are computed from the shard buffer just before it is written —
the very values the store holds — and folded into one accumulator; shards completed by an
earlier run (or another worker) are read back from the store. When the store is complete the
result is saved as the default statistics, exactly what ``rba-store stats`` would save (and
then reuses), joint moments included (of every pair of points, or of the band of spans up to
4 blocks for wide, deep models, as ``stats`` chooses by default): BR, CKA and the map of every
span from the one forward pass. With ``--no-activations`` the ``h`` arrays are never written,
so a data set too large to store still yields all of that. Each worker keeps its partials in the
store (:mod:`rba_store.extract.worker_partials`), saved every ``checkpoint_every`` seconds and on
Ctrl-C: a killed or interrupted run resumes from them, and many workers share the work; the
statistics are the exact merge of all workers' partials once every shard is in.
With ``--holdout`` the joint moments of the held-out samples are kept apart, exactly as
``rba-store stats --holdout`` keeps them, for ``fit --holdout`` to report held-out error.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from rba_store.extract.worker_partials import (
    load_partial,
    merge_saved,
    partial_path,
    remove_partials,
    save_partial,
)
from rba_store.stats import default_name, memory
from rba_store.stats.partials import BlockPartials, split_chunk_partials
from rba_store.stats.reduce import stats_attrs
from rba_store.stats.result import BlockStats
from rba_store.store import STATS, SampleSelection, Store, StoreLayout
from rba_store.store.layout import decode_values
from rba_store.store.selection import split_holdout

DEFAULT_MAX_SPAN = 4  # as ``rba-store stats``


def streamed_band(layout: StoreLayout, holdout: bool = False) -> int | None:
    """The pairs whose joint moments ``extract --stats`` keeps, as ``stats`` chooses them by
    default (every pair when one partial is at most 1 GiB, else spans of up to 4 blocks); a
    configuration that does not fit in memory is refused here, in one line, before any work."""
    band, cost = streamed_cost(layout, holdout)
    memory.check_fits(
        cost.peak,
        f"extract --stats (joint moments: {cost.describe()})",
        "extract without --stats and run 'rba-store stats' with a smaller --max-span or "
        "--no-cka afterwards",
    )
    return band


def streamed_cost(layout: StoreLayout, holdout: bool = False) -> tuple[int | None, Any]:
    """The band ``extract --stats`` keeps and the memory it takes (no check)."""
    widths = [p.n_channels for p in layout.points]
    itemsize = 2 if layout.dtype in ("float16", "bfloat16") else 4
    t = layout.points[0].n_tokens

    def cost(band: int | None) -> memory.StatsMemory:
        return memory.stats_memory(
            widths, t, layout.shard_samples, itemsize, band, holdout=holdout, workers=1,
            mlp_outputs=bool(layout.mlp_points),
        )  # fmt: skip

    band = None if cost(None).partial <= memory.FULL_AUTO_LIMIT else DEFAULT_MAX_SPAN
    if band is not None and band >= len(widths) - 1:
        band = None
    return band, cost(band)


class StreamedStats:
    """The statistics' partials of the shards seen so far."""

    def __init__(
        self,
        store: Store,
        holdout: float | None = None,
        holdout_seed: int = 0,
        worker: tuple[int, int] = (0, 1),
        checkpoint_every: float = 60.0,
    ) -> None:
        self.layout = store.layout
        self.n_points = len(self.layout.points)
        self.holdout, self.holdout_seed = holdout, holdout_seed
        self.held = split_holdout(np.arange(self.layout.n_samples), holdout, holdout_seed)[1]
        self.band = streamed_band(self.layout, len(self.held) > 0)
        self.path = partial_path(store.root, *worker)
        self.n_workers = worker[1]
        self.checkpoint_every = checkpoint_every
        self.partials: BlockPartials | None = None
        self.folded: set[int] = set()
        saved = load_partial(self.path)  # an earlier run of this worker: resume from it
        if saved is not None:
            self.partials, self.folded = saved
        self.saved_at = time.monotonic()
        self._folding = False

    def save(self) -> None:
        """Save this worker's partials and their shards (whole, or not at all)."""
        if self.partials is not None and not self._folding:
            save_partial(self.path, self.partials, self.folded)
            self.saved_at = time.monotonic()

    def fold(self, shard_idx: int, buffer: dict[str, np.ndarray]) -> None:
        """Add one complete shard (``buffer`` as the writer takes it), unless an earlier run of
        this worker folded it already; save when ``checkpoint_every`` seconds have passed."""
        if shard_idx in self.folded:
            return
        dtype = self.layout.dtype
        self._folding = True  # a Ctrl-C now must not save half-added partials
        names = self.layout.array_names
        self._add(shard_idx, [decode_values(buffer[name], dtype) for name in names])
        self._folding = False
        if time.monotonic() - self.saved_at >= self.checkpoint_every:
            self.save()

    def _add(self, shard_idx: int, points: list[np.ndarray]) -> None:
        start, stop = self.layout.shard_rows(shard_idx)
        held = np.isin(np.arange(start, stop), self.held)
        h, mlp = points[: self.n_points], points[self.n_points :]
        partial = split_chunk_partials(h, held, band=self.band, mlp=mlp)
        if self.partials is None:
            self.partials = partial
        else:
            self.partials = self.partials.merge(partial, inplace=True)
        self.folded.add(shard_idx)

    def finish(self, store: Store) -> BlockStats | None:
        """Save this worker's partials; when every shard is in, merge all workers' partials and
        save the statistics (None while some are missing)."""
        self.save()
        complete = store.completed_shards()
        if not complete.all():
            return None
        self.partials, self.folded = merge_saved(store.root, self.n_workers)  # own file included
        layout = store.layout
        missing = [s for s in range(layout.n_shards) if s not in self.folded]
        if missing and not store.holds_activations:
            return None  # another worker has not saved them yet: it merges when it finishes
        for shard in missing:  # written by a run without --stats: read back from the store
            start, stop = layout.shard_rows(shard)
            self._add(shard, store.read_points(list(layout.stored_indices), start, stop))
        assert self.partials is not None
        tokens = store.description["tokens"]
        selection = SampleSelection()
        split = (self.holdout, self.holdout_seed)
        attrs = stats_attrs(store, tokens, selection, False, True, *split) | {
            "computed": "during extraction",
            "name": default_name(tokens, selection, True, *split),
        }
        widths = [p.n_channels for p in layout.points]
        stats = BlockStats.from_partials(self.partials, widths, attrs)
        store.write_analysis(STATS, attrs["name"], stats.to_dataset())
        remove_partials(store.root)  # merged and saved: nothing left to resume
        self.partials = None  # nor to save again (the extractor saves on the way out)
        return stats
