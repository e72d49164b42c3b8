"""Model -> activations of every block -> store, one forward pass per batch, resumable.

The write unit is a shard: samples are computed batch by batch into a shard buffer, and a writer
thread writes each full shard of every array at once (zarr cannot safely write part of a shard)
while the model computes the next one. Only then is the shard marked complete in the ledger, so
an interrupted run resumes at the first shard that is not.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from rba_store import schema
from rba_store.capture import ActivationCapture
from rba_store.data import DataSource, Preprocess, make_preprocess, open_source
from rba_store.errors import StoreError, UsageError
from rba_store.models import LoadedModel, build_model

logger = logging.getLogger(__name__)

ProgressHook = Callable[[int, int], None]  # (samples just computed, raw bytes just computed)
DEFAULT_DATA = "digits"


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``rba-store extract`` can be asked for."""

    model: str | None = None
    checkpoint: Path | None = None
    pretrained: bool = False
    data: str = DEFAULT_DATA
    split: str | None = None
    limit: int | None = None
    tokens: str = "all"
    dtype: str = "float32"
    codec: str = "blosc-zstd"
    clevel: int = 3
    batch_size: int = 64
    device: str = "cpu"
    chunk_mb: float = 4.0
    shard_mb: float = 16.0
    chunk_samples: int | None = None
    shard_samples: int | None = None
    num_workers: int = 1  # processes filling the same store, each its own shards
    worker_index: int = 0


@dataclass
class ExtractionPlan:
    """A model, a data source and a store layout, checked and ready; nothing written yet."""

    options: ExtractOptions
    loaded: LoadedModel
    source: DataSource
    capture: ActivationCapture
    preprocess: Preprocess
    layout: schema.StoreLayout
    description: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Bytes on disk (uncompressed) and memory per batch and per shard buffer."""
        layout = self.layout
        feature_bytes = layout.n_features * np.dtype(layout.dtype).itemsize
        per_sample = layout.sample_bytes() + feature_bytes
        f32_per_sample = sum(p.n_tokens * p.n_channels for p in layout.points) * 4
        batch = min(self.options.batch_size, layout.shard_samples)
        return {
            "n_samples": layout.n_samples,
            "store_bytes_raw": per_sample * layout.n_samples,
            "batch_activation_bytes": f32_per_sample * batch,
            "shard_buffer_bytes": per_sample * layout.shard_samples,
            # one batch in float32 + the shard being filled + the shard being written
            "peak_bytes_estimate": f32_per_sample * batch + 2 * per_sample * layout.shard_samples,
        }


@dataclass(frozen=True)
class ExtractionResult:
    store_path: Path
    n_shards: int
    shards_written: int
    samples_written: int
    seconds: float
    resumed: bool


def _library_versions() -> dict[str, str]:
    import dask
    import numcodecs
    import timm
    import xarray

    from rba_store import __version__

    return {
        "rba_store": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "xarray": xarray.__version__,
    }


def _check_options(options: ExtractOptions) -> None:
    if options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size} is invalid; pass a positive number")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {options.device!r} asked for, but no CUDA GPU is visible; use --device cpu"
        )
    try:
        torch.device(options.device)
    except RuntimeError as e:
        raise UsageError(
            f"--device {options.device!r} is not a torch device; use cpu or cuda"
        ) from e
    if options.num_workers < 1:
        raise UsageError(f"--num-workers {options.num_workers} is invalid; pass 1 or more")
    if not 0 <= options.worker_index < options.num_workers:
        raise UsageError(
            f"--worker-index {options.worker_index} is out of range for --num-workers "
            f"{options.num_workers}; pass 0..{options.num_workers - 1}"
        )
    top = 9 if options.codec.startswith("blosc") else 22
    if not 0 <= options.clevel <= top:
        raise UsageError(
            f"--clevel {options.clevel} is out of range for --codec {options.codec}; use 0..{top}"
        )
    for flag, value in (("--chunk-mb", options.chunk_mb), ("--shard-mb", options.shard_mb)):
        if not value > 0:
            raise UsageError(f"{flag} {value} is invalid; pass a positive size in MB (e.g. 4)")


def plan_extraction(options: ExtractOptions) -> ExtractionPlan:
    """Build the model and the data source and probe the shapes, without touching any store."""
    _check_options(options)
    source = open_source(options.data, options.split, options.limit)
    loaded = build_model(
        options.model,
        checkpoint=options.checkpoint,
        pretrained=options.pretrained,
        device=options.device,
    )
    capture = ActivationCapture(loaded, options.tokens)
    preprocess = make_preprocess(loaded.data_config)
    probe = capture(source.load(0, 1, preprocess).to(options.device))
    points = [
        schema.CapturePoint(p.shape[1], p.shape[2], tuple(s))
        for p, s in zip(probe.points, probe.source_shapes, strict=True)
    ]
    layout = schema.plan_layout(
        len(source),
        points,
        probe.features.shape[1],
        options.dtype,
        codec=options.codec,
        clevel=options.clevel,
        chunk_mb=options.chunk_mb,
        shard_mb=options.shard_mb,
        chunk_samples=options.chunk_samples,
        shard_samples=options.shard_samples,
    )
    description: dict[str, Any] = {
        "format_version": schema.FORMAT_VERSION,
        "kind": "activations",
        "model": loaded.describe() | {"capture_method": capture.method},
        "data": source.describe(),
        "preprocessing": "none (inputs given as arrays)"
        if source.preprocessed
        else loaded.data_config,
        "tokens": options.tokens,
        "dtype": options.dtype,
        "codec": {"name": options.codec, "clevel": options.clevel},
        "layout": layout.to_attrs(),
        "versions": _library_versions(),
        "run": {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": options.device,
            "batch_size": options.batch_size,
        },
    }
    description = schema.normalize(description)
    description["fingerprint"] = schema.fingerprint(description)
    return ExtractionPlan(options, loaded, source, capture, preprocess, layout, description)


def _open_or_create(plan: ExtractionPlan, out: Path, overwrite: bool) -> tuple[zarr.Group, bool]:
    """Open a compatible store to resume it, or create a fresh one. Returns (group, resumed)."""
    if out.exists() and schema.is_store(out):
        if not overwrite:
            group = schema.open_store(out, mode="r+")
            schema.check_compatible(group, plan.description)
            return group, True
        schema.remove_store(out)
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise StoreError(
            f"--out {str(out)!r} exists and is not an rba-store store; choose another path "
            "(it is left untouched, with or without --overwrite)"
        )
    # Build the new store beside its final place, then move it in: a crash leaves no half store.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.creating-{os.getpid()}")
    try:
        schema.create_store(staging, plan.description, plan.layout)
    except OSError as e:  # e.g. a full disk: leave nothing behind, name --out
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(e.errno, e.strerror or str(e), str(out)) from e
    try:
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except OSError:  # another worker created it first: use theirs if it is the same extraction
        shutil.rmtree(staging, ignore_errors=True)
        if not schema.is_store(out):
            raise
        group = schema.open_store(out, mode="r+")
        schema.check_compatible(group, plan.description)
        return group, True
    return schema.open_store(out, mode="r+"), False


class _ShardWriter:
    """A thread that writes whole shards of every array, then marks them complete."""

    def __init__(self, group: zarr.Group, layout: schema.StoreLayout) -> None:
        self.group, self.layout = group, layout
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
        schema.discard_torn_shard(self.group, shard_idx, list(arrays))
        for name, values in arrays.items():
            self.group[name][start:stop] = values
        schema.mark_shard_complete(self.group, shard_idx)
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
    layout = plan.layout
    start, stop = layout.shard_rows(shard_idx)
    rows = stop - start
    buffer = {
        schema.h_name(k): np.empty((rows, p.n_tokens, p.n_channels), layout.dtype)
        for k, p in enumerate(layout.points)
    }
    buffer[schema.FEATURES] = np.empty((rows, layout.n_features), layout.dtype)
    buffer[schema.LABEL] = plan.source.labels[start:stop]
    buffer[schema.SAMPLE_ID] = np.asarray(plan.source.sample_ids[start:stop], dtype=str)
    return buffer


def run_extraction(
    plan: ExtractionPlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressHook | None = None,
) -> ExtractionResult:
    """Fill the store at ``out``: create it, or resume it when it holds the same configuration."""
    out = Path(out)
    group, resumed = _open_or_create(plan, out, overwrite)
    workers, index = plan.options.num_workers, plan.options.worker_index
    todo = [int(i) for i in np.flatnonzero(~schema.completed_shards(group)) if i % workers == index]
    claim = schema.claim_worker(group, index, workers)
    started = time.perf_counter()
    samples = 0
    writer = _ShardWriter(group, plan.layout)
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
                offset = start - plan.layout.shard_rows(shard_idx)[0]
                rows = slice(offset, offset + stop - start)
                for k, point in enumerate(captured.points):
                    buffer[schema.h_name(k)][rows] = point.cpu().numpy()
                buffer[schema.FEATURES][rows] = captured.features.cpu().numpy()
                samples += stop - start
                if progress is not None:
                    progress(stop - start, (stop - start) * plan.layout.sample_bytes())
                if stop == plan.layout.shard_rows(shard_idx)[1]:
                    writer.submit(shard_idx, buffer)
                    buffer = None
    finally:
        try:
            writer.close()
        finally:
            schema.release_claim(group, claim)
            schema.consolidate(out)
    return ExtractionResult(
        store_path=out,
        n_shards=plan.layout.n_shards,
        shards_written=writer.written,
        samples_written=samples,
        seconds=time.perf_counter() - started,
        resumed=resumed,
    )
