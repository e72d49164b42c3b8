"""What ``extract --dry-run`` says before anything is written: the store's size on disk (the
compression measured on a few real samples, the kept random weights, the statistics), the free
disk where it goes, and the peak memory of the run, for the samples there or for N of them.

Memory model of a run (checked against ``/usr/bin/time -v``, see ``benchmarks/bench_dry_run.py``):

- the process as the dry run finds it once the plan is ready: interpreter and libraries, the
  model's weights and, for random weights, the safetensors copy kept for the store (measured:
  the resident set now);
- the loader: the batch being computed and the next one, as float32 model inputs;
- the forward pass: every capture point of the batch in float32, twice (the previous batch's
  are still held while the next forward runs), plus the largest step inside a block (the
  largest input + output of one leaf module, measured with hooks on the samples run through
  the model);
- the shard buffers: the one being filled and the one the writer holds (a third waits in its
  queue on a GPU), at most as many as there are shards;
- with ``--stats``: folding a shard into the joint moments (:mod:`rba_store.stats.memory`);
- all but the first part times :data:`ALLOCATOR_OVERHEAD` (memory freed and taken again).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rba_store.extract.plan import ExtractionPlan
from rba_store.store.layout import (
    StoreLayout,
    compressors,
    encode_values,
    plan_layout,
    storage_dtype,
)

# Float32 bytes of the largest point that the compression sample aims at (enough for the codec's
# blocks to behave as on whole chunks); at least MIN_SAMPLE, at most the batch.
SAMPLE_TARGET_BYTES = 2**20
MIN_SAMPLE = 4
# The shard being filled and the one the writer holds (until it takes the next: writing is far
# faster than a forward pass on a CPU); on a GPU, when the writer lags, a third waits in its queue.
SHARD_BUFFERS_CPU, SHARD_BUFFERS_GPU = 2, 3
LOADER_BATCHES = 2  # the batch being computed and the one the loader thread prepares
# Capture points of the batch in float32: this batch's, and the previous batch's (still held
# while the next forward pass runs).
CAPTURED_BATCHES = 2
# What glibc's allocator keeps resident beyond the live buffers (freed batches and shards of the
# same sizes come back from fragmented heap, not all returned): measured on ViT-S/16, 224 px,
# 144 images, 3 shards (benchmarks/bench_dry_run.py), the run's memory beyond the process's was
# 1.36x the live bytes above.
ALLOCATOR_OVERHEAD = 1.3


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes the store will take on disk, by part."""

    activations_raw: int
    activations: int  # compressed, at the measured ratio
    ratio: float | None  # raw / stored, measured on ``sample_size`` samples (None: not measured)
    sample_size: int
    other: int  # features, labels, sample ids, ledger, metadata
    weights: int  # the random weights kept in the store (0 for named weights)
    moments: int  # extract --stats: the joint moments saved in the store
    moments_pairs: tuple[int, int]  # pairs of points they keep, of every pair
    later_stats: int  # what a later ``rba-store stats`` (defaults) saves beside them
    free: int | None  # free bytes where --out goes (None: unknown)
    free_path: Path

    @property
    def total(self) -> int:
        return self.activations + self.other + self.weights + self.moments


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident memory of the run, by part (bytes)."""

    process: int  # interpreter, libraries, model (+ kept weights): measured now
    loader: int
    forward: int
    shard_buffers: int
    n_shard_buffers: int
    stats: int
    available: int | None

    @property
    def peak(self) -> int:
        run = self.loader + self.forward + self.shard_buffers + self.stats
        return self.process + round(ALLOCATOR_OVERHEAD * run)


@dataclass(frozen=True)
class DryRun:
    n_samples: int  # planned
    n_available: int  # in the data (after --limit)
    layout: StoreLayout  # for n_samples
    batch: int
    disk: DiskEstimate
    memory: MemoryEstimate


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux), else its peak so far; None if unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except (ImportError, OSError):
        return None


def free_disk(out: Path) -> tuple[int | None, Path]:
    """Free bytes on the file system that will hold ``out`` (its nearest existing parent)."""
    where = out.expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free, where
    except OSError:
        return None, where


def layout_for(plan: ExtractionPlan, n_samples: int) -> StoreLayout:
    """The layout the same configuration gets for ``n_samples`` samples."""
    layout, options = plan.layout, plan.options
    if n_samples == layout.n_samples:
        return layout
    planned = plan_layout(
        n_samples,
        layout.points,
        layout.n_features,
        layout.dtype,
        codec=layout.codec,
        clevel=layout.clevel,
        chunk_mb=options.chunk_mb,
        shard_mb=options.shard_mb,
        chunk_samples=options.chunk_samples,
        shard_samples=options.shard_samples,
        seq_len=layout.seq_len,
        mlp_points=layout.mlp_points,
    )
    return replace(planned, sample_id_bytes=layout.sample_id_bytes)


def _stored_bytes(values: np.ndarray, codec: str, clevel: int, chunk_rows: int) -> int:
    """Bytes ``values`` take compressed as the store compresses them (chunks of ``chunk_rows``)."""
    import zarr
    from zarr.storage import MemoryStore

    array = zarr.create_array(
        MemoryStore(),
        shape=values.shape,
        chunks=(max(1, min(chunk_rows, len(values))), *values.shape[1:]),
        dtype=values.dtype,
        compressors=compressors(codec, clevel),
        fill_value=0,
    )
    metadata = int(array.nbytes_stored())
    array[...] = values
    return int(array.nbytes_stored()) - metadata


def _default_stored_bytes(data: bytes) -> int:
    """Bytes of ``data`` as zarr's default codec keeps a uint8 array (the kept weights), from
    its first 16 MiB chunk."""
    head = np.frombuffer(data[: 16 * 2**20], dtype=np.uint8)
    if not len(head):
        return 0
    import zarr
    from zarr.storage import MemoryStore

    array = zarr.create_array(MemoryStore(), shape=head.shape, chunks=head.shape, dtype="uint8")
    metadata = int(array.nbytes_stored())
    array[:] = head
    return round((int(array.nbytes_stored()) - metadata) * len(data) / len(head))


@dataclass(frozen=True)
class _Sample:
    ratio: float | None
    n: int
    step_bytes_per_sample: float  # largest leaf module's input + output, per sample


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def measure_sample(plan: ExtractionPlan, n: int, compress: bool = True) -> _Sample:
    """Run the first ``n`` samples through the model as the extractor does: the compression
    ratio of their capture points with the store's codec, and the largest step of the forward
    pass (a leaf module's input + output)."""
    from rba_store.errors import DataSourceError

    layout = plan.layout
    try:
        inputs = plan.source.load(0, n, plan.preprocess)
    except DataSourceError:  # an unreadable image: the run refuses or skips it, not the plan
        n, inputs = 1, plan.source.load(0, 1, plan.preprocess)  # the probe's sample
    inputs = inputs.to(plan.options.device)
    step = [0]

    def hook(_module: torch.nn.Module, args: Any, output: Any) -> None:
        step[0] = max(step[0], _tensor_bytes(args) + _tensor_bytes(output))

    leaves = [m for m in plan.loaded.module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        captured = plan.capture(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if plan.sampler is not None:
        captured.points = plan.sampler.take(captured.points, plan.sampler.positions(0, n))
    ratio = None
    if compress and layout.codec != "none":
        dtype = storage_dtype(layout.dtype)
        raw = stored = 0
        for point in captured.points:
            values = np.asarray(
                encode_values(point.detach().cpu().float().numpy(), layout.dtype), dtype=dtype
            )
            raw += values.nbytes
            stored += _stored_bytes(values, layout.codec, layout.clevel, layout.chunk_samples)
        ratio = raw / stored if stored else None
    elif layout.codec == "none":
        ratio = 1.0
    return _Sample(ratio, n, step[0] / n)


def sample_size(plan: ExtractionPlan) -> int:
    """How many samples the dry run runs through the model (cheap, but enough to measure)."""
    widest = max(p.n_tokens * p.n_channels for p in plan.layout.points) * 4
    wanted = max(MIN_SAMPLE, math.ceil(SAMPLE_TARGET_BYTES / widest))
    return max(1, min(wanted, plan.options.batch_size, plan.layout.n_samples))


def later_stats_bytes(layout: StoreLayout) -> int:
    """The joint moments a later ``rba-store stats`` (its defaults) saves in the store."""
    from rba_store.stats import memory

    widths = [p.n_channels for p in layout.points]
    itemsize = storage_dtype(layout.dtype).itemsize
    t = layout.points[0].n_tokens
    mlp = bool(layout.mlp_points)

    def partial(band: int | None) -> int:
        return memory.stats_memory(
            widths, t, layout.shard_samples, itemsize, band, mlp_outputs=mlp
        ).partial

    full = partial(None)
    return full if full <= memory.FULL_AUTO_LIMIT else partial(min(4, len(widths) - 1))


def dry_run(
    plan: ExtractionPlan, out: Path, n_samples: int | None = None, *, measure: bool = True
) -> DryRun:
    """Everything ``extract --dry-run`` reports, for ``n_samples`` samples (default: those in
    the data). ``measure``: run a few samples through the model (compression, forward step)."""
    process = resident_bytes() or 0  # before the sample's forward pass
    available = plan.layout.n_samples
    n = n_samples or available
    layout = layout_for(plan, n)
    options = plan.options
    batch = min(options.batch_size, layout.shard_samples)
    points = layout.all_points
    itemsize = storage_dtype(layout.dtype).itemsize
    per_sample = layout.sample_bytes()
    f32_per_sample = sum(p.n_tokens * p.n_channels for p in points) * 4
    sample = measure_sample(plan, sample_size(plan), compress=measure) if measure else None
    ratio = sample.ratio if sample else None

    activations_raw = per_sample * n if options.store_activations else 0
    activations = round(activations_raw / ratio) if ratio else activations_raw
    feature_bytes = layout.n_features * itemsize
    id_bytes = layout.sample_id_bytes or 0
    other = round(feature_bytes * n / (ratio or 1.0)) + (8 + id_bytes) * n + layout.n_shards
    weights = _default_stored_bytes(plan.weights_payload) if plan.weights_payload else 0
    sizes_moments = moments_peak = 0
    pairs = (0, 0)
    if options.stats:
        from rba_store.extract.streamed_stats import streamed_cost
        from rba_store.stats.memory import BASE_BYTES

        _, cost = streamed_cost(layout, bool(options.stats_holdout))
        sizes_moments, moments_peak = cost.partial, max(0, cost.peak - BASE_BYTES)
        pairs = (cost.pairs, cost.total_pairs)
    later = 0 if options.stats or not options.store_activations else later_stats_bytes(layout)
    free, free_path = free_disk(out)
    disk = DiskEstimate(
        activations_raw,
        activations,
        ratio,
        sample.n if sample else 0,
        other,
        weights,
        sizes_moments,
        pairs,
        later,
        free,
        free_path,
    )

    input_bytes = 0
    if sample is not None:
        first = plan.source.load(0, 1, plan.preprocess)
        input_bytes = first.numel() * first.element_size()
    step = round(sample.step_bytes_per_sample * batch) if sample else 0
    buffers = SHARD_BUFFERS_CPU if options.device == "cpu" else SHARD_BUFFERS_GPU
    n_buffers = min(buffers, layout.n_shards)
    shard_bytes = (per_sample + feature_bytes + id_bytes + 8) * layout.shard_samples
    from rba_store.stats.memory import available_memory

    memory = MemoryEstimate(
        process=process,
        loader=LOADER_BATCHES * batch * input_bytes,
        forward=CAPTURED_BATCHES * batch * f32_per_sample + step,
        shard_buffers=n_buffers * shard_bytes,
        n_shard_buffers=n_buffers,
        stats=moments_peak,
        available=available_memory(),
    )
    return DryRun(n, available, layout, batch, disk, memory)


def binary_size(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``3.4 KiB``, ``58.4 MiB``, ``347.2 GiB``, ``1.2 TiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"
