"""Statistics benchmark: all block statistics ÷ a plain read of the same arrays, and scaling in N.

For stores of N, 2N, 4N (and 8N with --full) samples of the embedded default model, it times
  - read:  every shard of every h_k read and decompressed, through the same Dask graph shape;
  - stats: compute_block_stats (BR, relative change, cosine, norms and the exact CKA);
  - stats --no-cka: the same without the joint co-moment product;
and reports the ratios, MB/s of raw activations, and time per sample (flat = linear in N).
It also measures the machine's float64 GEMM rate, since the CKA's (p, p) product per chunk is a
GEMM: its efficiency explains the ratio.

    python -m benchmarks.bench_stats [--full] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch

from rba_store import schema
from rba_store.daskutil import on_shard, shard_ranges
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.stats import compute_block_stats


def make_inputs(path: Path, n_samples: int) -> None:
    """``n_samples`` preprocessed digit inputs (the train split tiled, with a little noise)."""
    from rba_store.data import DigitsSource, make_preprocess
    from rba_store.default_model import DATA_CONFIG

    source = DigitsSource("train")
    x = source.load(0, len(source), make_preprocess(dict(DATA_CONFIG))).numpy()
    reps = -(-n_samples // len(x))
    tiled = np.concatenate([x] * reps)[:n_samples]
    noise = np.random.default_rng(0).normal(scale=0.05, size=tiled.shape).astype(np.float32)
    np.savez(path, x=tiled + noise)


def _count(*chunks: np.ndarray) -> int:
    return sum(c.shape[0] for c in chunks)


def read_all(store: Path) -> None:
    """Read and decompress every shard of every h_k with the statistics' task layout, do nothing."""
    layout = schema.read_layout(schema.open_store(store))
    points = list(range(len(layout.points)))
    task = dask.delayed(on_shard, pure=True)
    ranges = shard_ranges(layout, np.arange(layout.n_samples))
    dask.compute(*[task(_count, str(store), points, start, stop) for _, start, stop in ranges])


def gemm_gflops(rows: int, p: int) -> float:
    """float64 GFLOP/s of the same symmetric product the CKA does (counted as 2·rows·p²)."""
    z = np.random.default_rng(0).normal(size=(rows, p))
    z @ z[:256].T  # warm-up
    start = time.perf_counter()
    z.T @ z
    return 2 * rows * p * p / (time.perf_counter() - start) / 1e9


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="sizes up to 8N and 5 repeats")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument("--base", type=int, default=1437, help="N, the smallest store")
    args = parser.parse_args()
    factors = (1, 2, 4, 8) if args.full else (1, 2, 4)
    repeats = 5 if args.full else 3
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rba-bench-stats-") as tmp:
        tmp_path = Path(tmp)
        for factor in factors:
            n = args.base * factor
            inputs = tmp_path / f"x{n}.npz"
            make_inputs(inputs, n)
            store = tmp_path / f"s{n}.zarr"
            run_extraction(plan_extraction(ExtractOptions(data=str(inputs), batch_size=256)), store)
            layout = schema.read_layout(schema.open_store(store))
            raw_mb = layout.sample_bytes() * n / 2**20
            read_s = median_time(lambda s=store: read_all(s), repeats)
            stats_s = median_time(lambda s=store: compute_block_stats(s), repeats)
            light_s = median_time(lambda s=store: compute_block_stats(s, cka=False), repeats)
            p = sum(pt.n_channels for pt in layout.points)
            n_rows = n * layout.points[0].n_tokens
            rows.append(
                {
                    "n_samples": n,
                    "raw_mb": raw_mb,
                    "read_s": read_s,
                    "stats_s": stats_s,
                    "stats_nocka_s": light_s,
                    "ratio": stats_s / read_s,
                    "ratio_nocka": light_s / read_s,
                    "read_mb_s": raw_mb / read_s,
                    "stats_mb_s": raw_mb / stats_s,
                    "us_per_sample": 1e6 * stats_s / n,
                    "cka_gflop": 2 * n_rows * p * p / 1e9,
                }
            )
            print(
                f"N={n}: read {read_s:.3f}s stats {stats_s:.3f}s no-cka {light_s:.3f}s", flush=True
            )
        p = sum(pt.n_channels for pt in layout.points)
        gemm = gemm_gflops(layout.shard_samples * layout.points[0].n_tokens, p)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gemm_f64_gflops": gemm,
        "date": time.strftime("%Y-%m-%d"),
    }
    for row in rows:
        row["cka_gemm_share"] = row["cka_gflop"] / gemm / row["stats_s"]
    print(f"\nmachine: {machine}\n")
    print(
        "| N | raw MB | read s | stats s | ratio | no-CKA s | ratio no-CKA | read MB/s | "
        "stats MB/s | µs/sample | CKA GEMM at machine rate ÷ stats time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n_samples']} | {r['raw_mb']:.0f} | {r['read_s']:.3f} | {r['stats_s']:.3f} | "
            f"{r['ratio']:.2f} | {r['stats_nocka_s']:.3f} | {r['ratio_nocka']:.2f} | "
            f"{r['read_mb_s']:.0f} | {r['stats_mb_s']:.0f} | {r['us_per_sample']:.0f} | "
            f"{r['cka_gemm_share']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
