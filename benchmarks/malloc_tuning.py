"""What glibc's allocator costs the solver: ``fit`` with its default malloc tuning ÷ with fresh
memory kept (no trimming, a fixed 1 GiB mmap threshold), in fresh processes.

Decoded shards and float64 copies are 10-100 MB blocks. By default glibc hands such blocks back
to the kernel (mmap, or trimming the heap) and gets them again for the next chunk, and every
first touch of a page is a page fault (on this machine a fresh 250 MB array costs 0.14-0.7 s to
fill against 0.03 s when reused). A synthetic store of 1016 samples x 197 tokens x D = 768
(200k rows) is fitted (span 0:1, ``bench_solver.fit_child``) in a child per run, after one
untimed shard, alternating the two allocator settings, 3 times each; minor page faults and peak
RSS are reported too.

    python -m benchmarks.malloc_tuning [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks._child import run_in_child
from benchmarks._synthetic import write_store
from benchmarks.bench_solver import fit_child

REPEATS = 3
KEEP_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_TOP_PAD_": str(2**28),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [a temp dir]")
    args = parser.parse_args()
    variants = {"glibc default": {}, "memory kept": KEEP_MEMORY}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        store = write_store(Path(work) / "malloc.zarr", 1016, 768)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(REPEATS):
            for name, env in variants.items():
                runs[name].append(
                    run_in_child(fit_child, Path(work), env, store=str(store), gemm_dtype="float64")
                )
    print("| allocator | fit s (median of 3) | ÷ default | minor page faults | peak RSS MB |")
    print("|---|---|---|---|---|")
    base = statistics.median(r["seconds"] for r in runs["glibc default"])
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        faults = statistics.median(r["minor_faults"] for r in results)
        rss = max(r["peak_rss_mb"] for r in results)
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} | {faults:,.0f} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
