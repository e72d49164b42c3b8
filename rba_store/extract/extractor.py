"""Model -> activations of every block -> store, one forward pass per batch, resumable.

The write unit is a shard: samples are computed batch by batch into a shard buffer, and a writer
thread writes each full shard of every array at once (zarr cannot safely write part of a shard)
while the model computes the next one. Only then is the shard marked complete in the ledger, so
an interrupted run resumes at the first shard that is not.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rba_store.errors import UsageError
from rba_store.extract.plan import ExtractionPlan
from rba_store.extract.streamed_stats import StreamedStats
from rba_store.extract.worker_partials import remove_partials
from rba_store.store import (
    FEATURES,
    INPUT_IDS,
    LABEL,
    LEDGER_PATH,
    SAMPLE_ID,
    TOKEN_POSITIONS,
    Store,
)
from rba_store.store.layout import encode_values

logger = logging.getLogger(__name__)

ProgressHook = Callable[[int, int], None]  # (samples just computed, raw bytes just computed)


@dataclass(frozen=True)
class ExtractionResult:
    store_path: Path
    n_shards: int
    shards_written: int
    samples_written: int
    seconds: float
    resumed: bool


def _open_or_create(plan: ExtractionPlan, out: Path, overwrite: bool) -> tuple[Store, bool]:
    """Open a compatible store to resume it, or create a fresh one. Returns (store, resumed)."""
    if out.exists() and Store.exists(out):
        if not overwrite:
            store = Store.open(out, mode="r+")
            store.check_compatible(plan.description)
            return store, True
        Store.remove(out)
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UsageError(
            f"--out {str(out)!r} exists and is not an rba-store store; choose another path "
            "(it is left untouched, with or without --overwrite)"
        )
    # Build the new store beside its final place, then move it in: a crash leaves no half store.
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(out)  # a former store's worker statistics at this path must not resume
    staging = out.with_name(f".{out.name}.creating-{os.getpid()}")
    try:
        created = Store.create(staging, plan.description, plan.layout)
        if plan.weights_payload is not None:
            created.write_weights(plan.weights_payload)
    except OSError as e:  # e.g. a full disk: leave nothing behind, name --out
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(e.errno, e.strerror or str(e), str(out)) from e
    try:
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except OSError:  # another worker created it first: use theirs if it is the same extraction
        shutil.rmtree(staging, ignore_errors=True)
        if not Store.exists(out):
            raise
        store = Store.open(out, mode="r+")
        store.check_compatible(plan.description)
        return store, True
    return Store.open(out, mode="r+"), False


class _ShardWriter:
    """A thread that writes whole shards of every array, then marks them complete."""

    def __init__(self, store: Store) -> None:
        self.store, self.layout = store, store.layout
        self.queue: queue.Queue[tuple[int, dict[str, np.ndarray]] | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="rba-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def _write(self, shard_idx: int, arrays: dict[str, np.ndarray]) -> None:
        start, stop = self.layout.shard_rows(shard_idx)
        self.store.discard_torn_shard(shard_idx, list(arrays))
        for name, values in arrays.items():
            self.store.array(name)[start:stop] = values
        self.store.mark_shard_complete(shard_idx)
        self.written += 1

    def submit(self, shard_idx: int, arrays: dict[str, np.ndarray]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put((shard_idx, arrays), timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for the shards handed over so far (a second call does nothing more)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _batches(plan: ExtractionPlan, shards: list[int]) -> Iterator[tuple[int, int, int]]:
    """(shard, start, stop) of every batch, batches never crossing a shard boundary."""
    for shard_idx in shards:
        first, last = plan.layout.shard_rows(shard_idx)
        for start in range(first, last, plan.options.batch_size):
            yield shard_idx, start, min(start + plan.options.batch_size, last)


def shard_buffer(plan: ExtractionPlan, shard_idx: int) -> dict[str, np.ndarray]:
    """Empty arrays for one shard of every array (labels and ids filled), as the writer takes."""
    from rba_store.store.layout import encode_sample_ids, storage_dtype

    layout = plan.layout
    start, stop = layout.shard_rows(shard_idx)
    rows = stop - start
    dtype = storage_dtype(layout.dtype)
    buffer = {
        name: np.empty((rows, p.n_tokens, p.n_channels), dtype)
        for name, p in zip(layout.array_names, layout.all_points, strict=True)
    }
    buffer[FEATURES] = np.empty((rows, layout.n_features), storage_dtype(layout.dtype))
    buffer[LABEL] = plan.source.labels[start:stop]
    width = layout.sample_id_bytes
    assert width is not None, "plan_layout always sizes the sample_id array"
    buffer[SAMPLE_ID] = encode_sample_ids(plan.source.sample_ids[start:stop], width)
    if layout.seq_len is not None:  # filled batch by batch, like the activations
        buffer[INPUT_IDS] = np.empty((rows, layout.seq_len), np.int32)
    if plan.sampler is not None:
        buffer[TOKEN_POSITIONS] = np.empty((rows, layout.points[0].n_tokens), np.int32)
    return buffer


def _reopen_unfolded(store: Store, folded: set[int], index: int, workers: int) -> None:
    """Mark this worker's complete shards that its saved partials lack as incomplete again, so
    they are extracted (bit for bit the same) and folded once more."""
    complete = store.completed_shards()
    for shard in np.flatnonzero(complete):
        if shard % workers == index and int(shard) not in folded:
            store.array(LEDGER_PATH)[int(shard)] = 0


def run_extraction(
    plan: ExtractionPlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressHook | None = None,
) -> ExtractionResult:
    """Fill the store at ``out``: create it, or resume it when it holds the same configuration."""
    out = Path(out)
    store, resumed = _open_or_create(plan, out, overwrite)
    workers, index = plan.options.num_workers, plan.options.worker_index
    activations = plan.options.store_activations
    claim = store.claim_worker(index, workers)
    started = time.perf_counter()
    samples = 0
    options = plan.options
    streamed = (
        StreamedStats(
            store,
            options.stats_holdout,
            options.stats_holdout_seed,
            worker=(index, workers),
            checkpoint_every=options.checkpoint_every,
        )
        if options.stats
        else None
    )
    if streamed is not None and not activations:
        # Shards written after this worker last saved its partials: their statistics are gone
        # with the killed process and the store has no activations to read them back from.
        _reopen_unfolded(store, streamed.folded, index, workers)
    todo = [int(i) for i in np.flatnonzero(~store.completed_shards()) if i % workers == index]
    writer = _ShardWriter(store)
    device = plan.options.device
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rba-store-loader") as loader:
            batches = iter(_batches(plan, todo))
            nxt = next(batches, None)
            pending = (
                None if nxt is None else loader.submit(plan.source.load, *nxt[1:], plan.preprocess)
            )
            buffer: dict[str, np.ndarray] | None = None
            while nxt is not None and pending is not None:
                shard_idx, start, stop = nxt
                inputs = pending.result()
                nxt = next(batches, None)
                pending = (
                    None
                    if nxt is None
                    else loader.submit(plan.source.load, *nxt[1:], plan.preprocess)
                )
                if buffer is None:
                    buffer = shard_buffer(plan, shard_idx)
                captured = plan.capture(inputs.to(device))
                if plan.sampler is not None:  # --tokens random:K
                    positions = plan.sampler.positions(start, stop)
                    captured.points = plan.sampler.take(captured.points, positions)
                offset = start - plan.layout.shard_rows(shard_idx)[0]
                rows = slice(offset, offset + stop - start)
                dtype = plan.layout.dtype
                for name, point in zip(plan.layout.array_names, captured.points, strict=True):
                    buffer[name][rows] = encode_values(point.cpu().float().numpy(), dtype)
                features = captured.features.cpu().float().numpy()
                buffer[FEATURES][rows] = encode_values(features, dtype)
                if INPUT_IDS in buffer:
                    buffer[INPUT_IDS][rows] = inputs.numpy()
                if TOKEN_POSITIONS in buffer:
                    buffer[TOKEN_POSITIONS][rows] = positions
                samples += stop - start
                if progress is not None:
                    progress(stop - start, (stop - start) * plan.layout.sample_bytes())
                if stop == plan.layout.shard_rows(shard_idx)[1]:
                    if streamed is not None:
                        streamed.fold(shard_idx, buffer)
                    if not activations:
                        points = set(plan.layout.array_names)
                        buffer = {k: v for k, v in buffer.items() if k not in points}
                    writer.submit(shard_idx, buffer)
                    buffer = None
        writer.close()
        if streamed is not None:
            streamed.finish(store)
    finally:
        try:
            writer.close()
        finally:
            if streamed is not None:  # Ctrl-C or an error: keep what this worker folded
                streamed.save()
            store.release_claim(claim)
            store.consolidate()
    return ExtractionResult(
        store_path=out,
        n_shards=plan.layout.n_shards,
        shards_written=writer.written,
        samples_written=samples,
        seconds=time.perf_counter() - started,
        resumed=resumed,
    )
