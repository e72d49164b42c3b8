"""What ``stats``, ``fit`` and ``select`` will take in memory, from the store's shape alone.

The joint moments of all L+1 points are ((L+1)·D)² float64 values, and every partial of the
reduction tree holds one: 5.2 GB for ViT-L/16, 146 GB for a Llama-3-8B. rba-store keeps only the
pairs of points that fits and selection use, ``b - a <= S`` (the band) and the diagonal:
(L+1)(S+1) blocks of D² float64 per partial. This module turns a configuration into those
figures, so that a command can say before it starts what it will take, and refuse in one line
when that is more than the machine has (:func:`check_fits`).

The model (measured, see the README): a local pass runs ``workers`` shard tasks at once. Each
task holds its shard as stored, the shard's rows in float64 twice (the per-sample Gram stack and
the joint rows) and builds one partial; finished partials wait to be merged (in place) in a
tree, so about ``workers + 2`` partials per set of moments (two sets with ``--holdout``) are
alive at the peak.

Run as a script for figures of any shape, without a store::

    python -m rba_store.stats --blocks 24 --width 1024 --tokens 197   # ViT-L/16
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from rba_store.errors import MemoryBudgetError

BASE_BYTES = 400 * 2**20  # the interpreter with numpy, dask, xarray, zarr (measured: 0.3-0.4 GB)
FULL_AUTO_LIMIT = 2**30  # --cka-pairs auto keeps every pair when one partial is at most this
GIB = 2**30


def available_memory() -> int | None:
    """Bytes this process may still take: the smaller of the system's available memory and
    what its cgroup allows; None when neither can be read. ``RBA_STORE_MEMORY_GIB`` overrides."""
    override = os.environ.get("RBA_STORE_MEMORY_GIB")
    if override:
        return int(float(override) * GIB)
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read().strip()))
    except OSError:
        pass
    return min(found) if found else None


def n_band_pairs(n_points: int, band: int | None) -> int:
    """Pairs (a, b), a <= b, at most ``band`` apart (None: every pair)."""
    reach = n_points if band is None else min(band + 1, n_points)
    return sum(min(reach, n_points - a) for a in range(n_points))


@dataclass(frozen=True)
class StatsMemory:
    """The memory of one ``stats`` pass (bytes)."""

    pairs: int  # pairs of points whose co-moment blocks are kept
    total_pairs: int  # every pair, a <= b
    partial: int  # one partial's joint moments (all sets)
    task: int  # one running shard task: its shard, float64 rows, the products
    workers: int
    peak: int

    def describe(self) -> str:
        return (
            f"{self.pairs} of {self.total_pairs} pairs of points, {gib(self.partial)} per partial; "
            f"about {gib(self.peak)} at the peak with {self.workers} concurrent shard tasks"
        )


def stats_memory(
    widths: Sequence[int],
    tokens: int,
    shard_samples: int,
    itemsize: int,
    band: int | None,
    *,
    cka: bool = True,
    holdout: bool = False,
    workers: int = 2,
    mlp_outputs: bool = False,
) -> StatsMemory:
    """The memory of a ``stats`` pass over ``len(widths)`` points of ``tokens`` token vectors
    per sample, read ``shard_samples`` samples at a time (``itemsize`` bytes per stored value),
    keeping the pairs at most ``band`` apart (None: every pair). ``mlp_outputs``: the pairs of
    the stored MLP outputs are kept besides (``fold_pairs``; their L points are read too)."""
    k, p, wide = len(widths), int(sum(widths)), int(max(widths))
    mlp_pairs = 0
    if mlp_outputs and cka:
        from rba_store.stats.moments import fold_pairs

        p += (k - 1) * wide
        mlp_pairs = len(fold_pairs(k, band))
    rows = shard_samples * tokens
    pairs = n_band_pairs(k, band) + mlp_pairs if cka else 0
    sets = 2 if holdout else 1
    partial = sets * (pairs * wide * wide * 8 + p * 8)
    reach = k if band is None else min(band + 1, k)
    task = rows * p * (itemsize + 8 + (8 if cka else 0)) + (reach * wide * wide * 8 if cka else 0)
    live = workers + 2 if cka else 0
    peak = BASE_BYTES + workers * task + live * partial
    return StatsMemory(pairs, n_band_pairs(k, None), partial, task, workers, peak)


def fit_memory(
    widths: Sequence[int],
    tokens: int,
    shard_samples: int,
    itemsize: int,
    spans: Sequence[tuple[int, int]],
    workers: int = 2,
) -> dict[str, int]:
    """A streaming fit of ``spans`` (one pass), and the same fits read from saved moments."""
    sources: dict[int, list[int]] = {}
    for a, b in spans:
        sources.setdefault(a, []).append(b)
    rows = shard_samples * tokens
    accumulators = sum(
        8 * widths[a] * (widths[a] + sum(widths[b] for b in bs)) for a, bs in sources.items()
    )
    points = {a for a, _ in spans} | {b for _, b in spans}
    read = rows * sum(widths[k] for k in points) * itemsize
    products = max(8 * rows * (widths[a] + sum(widths[b] for b in bs)) for a, bs in sources.items())
    streaming = BASE_BYTES + workers * (read + products) + (workers + 2) * accumulators
    return {
        "streaming": streaming,
        "from_moments": BASE_BYTES + 2 * accumulators,
        "accumulators": accumulators,
    }


def select_memory(
    widths: Sequence[int],
    tokens: int,
    shard_samples: int,
    itemsize: int,
    max_span: int,
    workers: int = 2,
) -> dict[str, int]:
    """``select --max-span S``: its statistics pass (band S), and the maps of every candidate
    span held at once (float64 T as loaded, plus a float32 module each)."""
    k = len(widths)
    spans = [(a, a + s) for s in range(1, max_span + 1) for a in range(k - s)]
    maps = sum(widths[a] * widths[b] * 12 for a, b in spans)
    stats = stats_memory(widths, tokens, shard_samples, itemsize, max_span, workers=workers)
    return {"stats": stats.peak, "maps": maps, "candidates": len(spans)}


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.0f} MiB"


def check_fits(needed: int, what: str, alternatives: str) -> None:
    """Refuse, in one line, a configuration that needs more than the memory available."""
    available = available_memory()
    if available is not None and needed > available:
        raise MemoryBudgetError(
            f"{what} needs about {gib(needed)} of memory and {gib(available)} is available; "
            f"{alternatives}"
        )


def shard_samples_for(n_tokens: int, width: int, n_points: int, dtype: str) -> int:
    """The shard size ``extract`` chooses for such points (its default chunk and shard sizes)."""
    from rba_store.store.layout import CapturePoint, plan_layout

    points = [CapturePoint(n_tokens, width, (n_tokens, width))] * n_points
    return plan_layout(
        10**6, points, width, "float16" if dtype == "bfloat16" else dtype
    ).shard_samples


def report(
    blocks: int, width: int, tokens: int, band: int, dtype: str, workers: int, select_span: int
) -> str:
    """The README's figures for one shape, from the configuration alone."""
    k = blocks + 1
    widths = [width] * k
    itemsize = 2 if dtype in ("float16", "bfloat16") else 4
    shard = shard_samples_for(tokens, width, k, dtype)
    full = stats_memory(widths, tokens, shard, itemsize, None, workers=workers)
    banded = stats_memory(widths, tokens, shard, itemsize, band, workers=workers)
    nocka = stats_memory(widths, tokens, shard, itemsize, band, cka=False, workers=workers)
    one = fit_memory(widths, tokens, shard, itemsize, [(k // 2, k // 2 + 1)], workers)
    every = fit_memory(
        widths,
        tokens,
        shard,
        itemsize,
        [(a, a + s) for s in range(1, band + 1) for a in range(k - s)],
        workers,
    )
    select = select_memory(widths, tokens, shard, itemsize, select_span, workers)
    lines = [
        f"L={blocks} blocks, D={width}, {tokens} tokens per sample, {dtype} store "
        f"({shard} samples per shard), {workers} concurrent tasks:",
        f"  stats, every pair (full CKA in one pass): {full.describe()}",
        f"  stats, band {band} (default for this size): {banded.describe()}",
        f"  stats --no-cka: about {gib(nocka.peak)}",
        f"  fit, one span streamed: about {gib(one['streaming'])} "
        f"(accumulators {gib(one['accumulators'])}); from saved moments {gib(one['from_moments'])}",
        f"  fit, every span of the band in one pass: about {gib(every['streaming'])} streamed, "
        f"{gib(every['from_moments'])} from saved moments",
        f"  select --max-span {select_span}: statistics pass {gib(select['stats'])}, then the maps "
        f"of its {select['candidates']} candidate spans {gib(select['maps'])}, plus the model",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rba_store.stats",
        description="Memory of stats, fit and select for a model shape, from its configuration.",
    )
    parser.add_argument("--blocks", type=int, required=True, help="L, the number of blocks")
    parser.add_argument("--width", type=int, required=True, help="D, channels of the stream")
    parser.add_argument("--tokens", type=int, required=True, help="token vectors per sample")
    parser.add_argument("--band", type=int, default=4, help="stats --max-span [4]")
    parser.add_argument("--select-span", type=int, default=2, help="select --max-span [2]")
    parser.add_argument("--dtype", default="float16", help="the store's dtype [float16]")
    parser.add_argument("--workers", type=int, default=2, help="concurrent shard tasks [2]")
    args = parser.parse_args(argv)
    print(
        report(
            args.blocks,
            args.width,
            args.tokens,
            args.band,
            args.dtype,
            args.workers,
            args.select_span,
        )
    )
