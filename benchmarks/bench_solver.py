"""Solver benchmark: fit throughput from a compressed store vs the machine's own GEMM limit,
side by side with the in-memory alternatives (torch / numpy lstsq), and peak memory vs N.

Every measurement runs in a fresh child process, so its peak RSS (ru_maxrss) is its own.
  - fit:      rba-store's fit of span 0:1 (all tokens) from the store: read, decompress, cast,
              centre, accumulate, solve;
  - fit32:    the same with float32 GEMMs (float64 accumulation across chunks);
  - limit:    the same two products (XᵀX and XᵀY, float64) on the same rows already in memory;
  - torch32 / torch64 / numpy: lstsq on all rows loaded in memory (the reference approach).
Figures: limit_ratio = limit time ÷ fit time (target ≥ 0.7 for D ≥ 384), rows/s, GFLOP/s
(2·rows·D² per product), peak RSS, and the error of T against float64 numpy lstsq.

    python -m benchmarks.bench_solver [--full] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._synthetic import write_store

METHODS = ("fit", "fit32", "limit", "torch32", "torch64", "numpy")


def _rows(store: str, k: int) -> np.ndarray:
    import zarr

    h = zarr.open_group(store, mode="r", use_consolidated=False)[f"h{k}"][:]
    return h.reshape(-1, h.shape[-1])


def child(method: str, store: str, out: str) -> None:
    """Run one measurement; write {seconds, maxrss_mb} and T (as .npy) to ``out``."""
    t = None
    if method in ("fit", "fit32"):
        from rba_store.solve import FitOptions, fit_spans

        options = FitOptions(
            spans=((0, 1),),
            backend="numpy",
            name=f"bench-{method}",
            overwrite=True,
            gemm_dtype="float32" if method == "fit32" else "float64",
        )
        start = time.perf_counter()
        (fit,) = fit_spans(store, options)
        seconds = time.perf_counter() - start
        t = fit.solution.t
    else:
        x32, y32 = _rows(store, 0), _rows(store, 1)
        if method == "limit":
            x, y = x32.astype(np.float64), y32.astype(np.float64)
            start = time.perf_counter()
            x.T @ x
            x.T @ y
            seconds = time.perf_counter() - start
        elif method.startswith("torch"):
            import torch

            dtype = torch.float32 if method == "torch32" else torch.float64
            x, y = torch.from_numpy(x32).to(dtype), torch.from_numpy(y32).to(dtype)
            start = time.perf_counter()
            t = torch.linalg.lstsq(x, y).solution.numpy().astype(np.float64)
            seconds = time.perf_counter() - start
        else:
            x, y = x32.astype(np.float64), y32.astype(np.float64)
            start = time.perf_counter()
            t = np.linalg.lstsq(x, y, rcond=None)[0]
            seconds = time.perf_counter() - start
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if t is not None:
        np.save(out + ".npy", t)
    Path(out).write_text(json.dumps({"seconds": seconds, "maxrss_mb": maxrss_mb}))


def measure(method: str, store: Path, work: Path) -> dict[str, Any]:
    out = work / f"{method}-{time.monotonic_ns()}.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_solver", "--child", method, str(store), str(out)],
        check=True,
    )
    result = json.loads(out.read_text())
    t_path = Path(str(out) + ".npy")
    result["t"] = np.load(t_path) if t_path.exists() else None
    return result


def run_width(d: int, n_samples: int, repeats: int, work: Path) -> list[dict[str, Any]]:
    store = write_store(work / f"d{d}.zarr", n_samples, d)
    rows = n_samples * 197
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every method
        for method in METHODS:
            runs[method].append(measure(method, store, work))
    reference = next(r["t"] for r in runs["numpy"])
    limit = float(np.median([r["seconds"] for r in runs["limit"]]))
    flops = 2 * 2 * rows * d * d  # XᵀX and XᵀY, 2·rows·D² each
    results = []
    for method in METHODS:
        seconds = float(np.median([r["seconds"] for r in runs[method]]))
        t = runs[method][0]["t"]
        error = (
            None if t is None else float(np.linalg.norm(t - reference) / np.linalg.norm(reference))
        )
        results.append(
            {
                "d": d,
                "rows": rows,
                "method": method,
                "seconds": seconds,
                "rows_per_s": rows / seconds,
                "gflops": flops / seconds / 1e9,
                "limit_ratio": limit / seconds,
                "maxrss_mb": max(r["maxrss_mb"] for r in runs[method]),
                "t_error": error,
            }
        )
    return results


def run_memory(d: int, n_samples: int, work: Path) -> dict[str, Any]:
    small = measure("fit", write_store(work / "m1.zarr", n_samples, d, seed=1), work)
    large = measure("fit", write_store(work / "m4.zarr", 4 * n_samples, d, seed=1), work)
    return {
        "d": d,
        "n": n_samples,
        "rss_n_mb": small["maxrss_mb"],
        "rss_4n_mb": large["maxrss_mb"],
        "ratio": large["maxrss_mb"] / small["maxrss_mb"],
        "time_ratio": large["seconds"] / small["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1000 samples, D up to 1024, 3 repeats")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--child", nargs=3, metavar=("METHOD", "STORE", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    widths = (192, 384, 768, 1024) if args.full else (192, 384, 768)
    n_samples = 1000 if args.full else 400
    repeats = 3 if args.full else 1
    with tempfile.TemporaryDirectory(prefix="rba-bench-solver-") as tmp:
        work = Path(tmp)
        results = [r for d in widths for r in run_width(d, n_samples, repeats, work)]
        memory = run_memory(384, n_samples, work)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "n_samples": n_samples,
        "tokens": 197,
        "repeats": repeats,
    }
    print(f"machine: {machine}\n")
    print("| D | rows | method | s | rows/s | GFLOP/s | limit ÷ this | peak RSS MB | T error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        err = "—" if r["t_error"] is None else f"{r['t_error']:.1e}"
        print(
            f"| {r['d']} | {r['rows']} | {r['method']} | {r['seconds']:.3f} | "
            f"{r['rows_per_s']:,.0f} | {r['gflops']:.1f} | {r['limit_ratio']:.2f} | "
            f"{r['maxrss_mb']:.0f} | {err} |"
        )
    print(
        f"\npeak RSS of fit, D={memory['d']}: N={memory['n']} samples "
        f"{memory['rss_n_mb']:.0f} MB, 4N {memory['rss_4n_mb']:.0f} MB, ratio "
        f"{memory['ratio']:.2f} (time ratio {memory['time_ratio']:.2f})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "results": results, "memory": memory}, indent=2, default=float
            )
        )


if __name__ == "__main__":
    main()
