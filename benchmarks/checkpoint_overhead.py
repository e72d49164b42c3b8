"""The cost of ``fit --checkpoint``: fit time with checkpoints ÷ without, in one process.

A synthetic store of 1024 samples x 197 tokens x D = 384 (20 shards) is fitted (span 0:1)
without a checkpoint, with the default one (every 60 s: the grouped, resumable fold only) and
with one after every group of shards (``--checkpoint-every 0``), alternating, 3 times each.

    python -m benchmarks.checkpoint_overhead [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._synthetic import write_store
from rba_store.solve import FitOptions, fit_spans

REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [a temp dir]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        store = write_store(Path(work) / "checkpoint.zarr", 1024, 384)
        checkpoint = str(Path(work) / "fit.ckpt.npz")
        variants = {
            "no checkpoint": {},
            "--checkpoint (every 60 s)": {"checkpoint": checkpoint},
            "--checkpoint-every 0": {"checkpoint": checkpoint, "checkpoint_every": 0.0},
        }

        def seconds(**kwargs: object) -> float:
            options = FitOptions(spans=((0, 1),), backend="numpy", overwrite=True, **kwargs)  # type: ignore[arg-type]
            start = time.perf_counter()
            fit_spans(store, options)
            return time.perf_counter() - start

        seconds()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(REPEATS):
            for name, kwargs in variants.items():
                times[name].append(seconds(**kwargs))
    base = statistics.median(times["no checkpoint"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median:6.2f} s  ratio {median / base:.2f}")


if __name__ == "__main__":
    main()
