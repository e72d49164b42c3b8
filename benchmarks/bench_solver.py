"""Solver: ``fit`` throughput from a compressed store vs the machine's own product rate, side by
side with the in-memory alternatives (torch / numpy lstsq, scikit-learn).

For each width D, a synthetic ViT-like store (197 tokens, float32, blosc-lz4) is fitted for span
0:1 (all tokens as rows): at least 200,000 rows in the quick size, 1,000,000 in the full size,
where users run it (at 25k rows the fixed costs of a fit outweigh its products). Every method runs
in a fresh child process (its own peak RSS):
  - fit:     rba-store's ``fit_spans`` from the store, end to end (open, read, decompress, cast,
             centre, accumulate, solve, save), after an untimed fit of one shard that pays the
             fresh-process costs (imports, thread pools; reported apart); fit32 is the same with
             ``gemm_dtype="float32"``;
  - dask_lstsq: the out-of-core peer, ``dask.array.linalg.lstsq`` (tall-and-skinny QR) on the same
             Zarr arrays (``da.from_zarr``, shard-aligned chunks, reshaped to rows), float64;
  - limit:   the same two float64 products, XᵀX (``syrk``) and XᵀY (GEMM), on rows already in
             memory: the machine's own float64 rate for them, measured in the same run;
  - torch32 / torch64 / numpy: ``lstsq`` on all rows in memory (the reference approach);
  - sklearn_ridge (alpha 1e-6) / sklearn_linreg: scikit-learn on all rows, float64.
The in-memory methods run on the store's rows, capped so that they fit in half the free memory;
when capped, the store repeats its first M samples (``period``), so that its least-squares map is
exactly theirs, and times are compared per row. GFLOP/s counts the FLOPs a user needs: XᵀX as
the symmetric product ``syrk`` computes it (rows·D·(D+1)) and XᵀY (2·rows·D²); T errors
are max |T - T_lstsq| against float64 numpy lstsq on the in-memory rows.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._child import run_in_child
from benchmarks._machine import available_bytes
from benchmarks._plots import line_plot
from benchmarks._results import Context, Figures, Section, at_least, at_most, fmt, table
from benchmarks._synthetic import read_rows, write_store
from rba_store.solve.symmetric import symmetric_flops, symmetric_product

TOKENS = 197
METHODS = (
    "fit",
    "fit32",
    "fit_ckpt",
    "dask_lstsq",
    "limit",
    "torch32",
    "torch64",
    "numpy",
    "sklearn_ridge",
    "sklearn_linreg",
)
# same code paths as fit, torch32, ridge
SMOKE_SKIPS = ("fit32", "fit_ckpt", "torch64", "sklearn_linreg")
FIT_METHODS = ("fit", "fit32", "fit_ckpt", "dask_lstsq")  # from the store, all its rows
BYTES_PER_ROW_CHANNEL = 48  # peak of the in-memory lstsq methods: ~44 bytes per row and channel
LIMIT_RATIO_TARGET = 0.6  # on a CPU, from a compressed store, for D >= LIMIT_RATIO_MIN_D
LIMIT_RATIO_MIN_D = 768
T_ERROR_TARGET = 1e-6


# -- child processes ----------------------------------------------------------------------------


def fit_child(store: str, gemm_dtype: str, checkpoint: str | None = None) -> dict[str, Any]:
    """rba-store's fit of span 0:1 from the store, after one untimed fit of its first shard.

    The untimed fit pays the first-call costs of a fresh process (imports on first use, thread
    pools); its time is returned as ``first_call_seconds``. With ``checkpoint``, the timed fit
    saves its partial sums there after every group of shards (``--checkpoint-every 0``).
    """
    start = time.perf_counter()  # the fresh-process cost includes rba-store's imports
    from rba_store.solve import FitOptions, fit_spans
    from rba_store.store import Store
    from rba_store.store.selection import SampleSelection

    def options(name: str, selection: SampleSelection) -> FitOptions:
        return FitOptions(
            spans=((0, 1),),
            selection=selection,
            backend="numpy",
            gemm_dtype=gemm_dtype,
            name=name,
            overwrite=True,
            checkpoint=checkpoint if name.startswith("bench-fit") else None,
            checkpoint_every=0.0,
        )

    shard = Store.open(store).layout.shard_samples
    fit_spans(store, options("bench-warm-up", SampleSelection(limit=shard)))
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    (fit,) = fit_spans(store, options(f"bench-fit-{gemm_dtype}", SampleSelection()))
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # page faults (malloc_tuning)
    return {
        "seconds": seconds,
        "first_call_seconds": first_call,
        "minor_faults": faults,
        "t": fit.solution.t,
    }


def _dask_rows(store: str, point_idx: int, n_samples: int | None = None) -> Any:
    """``h_k`` as Dask rows ``(samples·tokens, channels)``, float64, one chunk per shard."""
    import dask.array as da
    import zarr

    from rba_store import store as rs

    group = zarr.open_group(store, mode="r", use_consolidated=False)
    array = group[rs.h_name(point_idx)]
    shard = (array.shards or array.chunks)[0]
    h = da.from_zarr(array, chunks=(shard, *array.shape[1:]))
    if n_samples is not None:
        h = h[:n_samples]
    return h.reshape(-1, array.shape[-1]).astype(np.float64)


def dask_lstsq_child(store: str) -> dict[str, Any]:
    """``dask.array.linalg.lstsq`` (tall-and-skinny QR) on the store's Zarr arrays, after one
    untimed solve of the first shard (imports, thread pools; returned as ``first_call_seconds``).
    """
    start = time.perf_counter()
    from dask.array.linalg import lstsq

    x = _dask_rows(store, 0)
    shard = x.chunks[0][0] // TOKENS
    lstsq(_dask_rows(store, 0, shard), _dask_rows(store, 1, shard))[0].compute()
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    t = lstsq(x, _dask_rows(store, 1))[0].compute()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_call_seconds": first_call, "t": np.asarray(t)}


def limit_child(store: str, n_samples: int, repeats: int = 3) -> dict[str, Any]:
    """The two float64 products on rows already in memory (the fastest of ``repeats``), and
    each alone: XᵀX (``syrk``) and XᵀY (GEMM)."""
    x = read_rows(store, 0, n_samples).astype(np.float64)
    y = read_rows(store, 1, n_samples).astype(np.float64)
    times: dict[str, list[float]] = {"syrk": [], "gemm": []}
    for _ in range(repeats):
        start = time.perf_counter()
        symmetric_product(x)
        middle = time.perf_counter()
        x.T @ y
        times["syrk"].append(middle - start)
        times["gemm"].append(time.perf_counter() - middle)
    both = [a + b for a, b in zip(times["syrk"], times["gemm"], strict=True)]
    return {
        "seconds": min(both),
        "syrk_seconds": min(times["syrk"]),
        "gemm_seconds": min(times["gemm"]),
    }


def _lstsq(method: str, x32: np.ndarray, y32: np.ndarray) -> np.ndarray:
    if method.startswith("torch"):
        import torch

        dtype = torch.float32 if method == "torch32" else torch.float64
        x, y = torch.from_numpy(x32).to(dtype), torch.from_numpy(y32).to(dtype)
        return torch.linalg.lstsq(x, y).solution.numpy()
    x, y = x32.astype(np.float64), y32.astype(np.float64)
    if method.startswith("sklearn"):
        from sklearn.linear_model import LinearRegression, Ridge

        model = (
            Ridge(alpha=1e-6, fit_intercept=False)
            if method == "sklearn_ridge"
            else LinearRegression(fit_intercept=False)
        )
        return model.fit(x, y).coef_.T
    return np.linalg.lstsq(x, y, rcond=None)[0]


def lstsq_child(store: str, method: str, n_samples: int) -> dict[str, Any]:
    """An in-memory least-squares solver on the first ``n_samples``' rows, after an untimed call
    on a few rows.

    Timed: the dtype conversion (the rows are loaded as stored, float32) and the solve.
    """
    x32, y32 = read_rows(store, 0, n_samples), read_rows(store, 1, n_samples)
    warm = 4 * x32.shape[1]
    _lstsq(method, x32[:warm], y32[:warm])
    start = time.perf_counter()
    t = _lstsq(method, x32, y32)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "t": np.asarray(t, dtype=np.float64)}


def measure(method: str, store: Path, work: Path, n_mem: int) -> dict[str, Any]:
    if method in ("fit", "fit32", "fit_ckpt"):
        dtype = "float32" if method == "fit32" else "float64"
        checkpoint = str(work / "solver.ckpt.npz") if method == "fit_ckpt" else None
        return run_in_child(
            fit_child, work, store=str(store), gemm_dtype=dtype, checkpoint=checkpoint
        )
    if method == "dask_lstsq":
        return run_in_child(dask_lstsq_child, work, store=str(store))
    if method == "limit":
        return run_in_child(limit_child, work, store=str(store), n_samples=n_mem)
    return run_in_child(lstsq_child, work, store=str(store), method=method, n_samples=n_mem)


# -- the benchmark ------------------------------------------------------------------------------


def n_samples_for(ctx: Context, d: int) -> tuple[int, int]:
    """The store's N (at least the size's rows) and the in-memory methods' N (capped so that
    they fit in half the free memory). When capped, the store's N is a whole multiple of it: the
    store repeats those samples a whole number of times, so that its least-squares map is
    exactly theirs (a partial last repeat would weight some samples more)."""
    rows = ctx.pick(smoke=24 * TOKENS, quick=200_000, full=1_000_000)
    n_store = -(-rows // TOKENS)
    budget = available_bytes() // 2
    n_mem = max(8, min(n_store, budget // (BYTES_PER_ROW_CHANNEL * d * TOKENS)))
    return -(-n_store // n_mem) * n_mem, n_mem


def run_width(ctx: Context, d: int, repeats: int, figures: Figures) -> list[dict[str, Any]]:
    """Measure every method at width ``d``; add its figures; return one row per method."""
    n_store, n_mem = n_samples_for(ctx, d)
    period = n_mem if n_mem < n_store else None
    store = write_store(ctx.work / f"solver-d{d}.zarr", n_store, d, period=period)
    methods = [m for m in METHODS if ctx.size != "smoke" or m not in SMOKE_SKIPS]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    try:
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every method
            for method in methods:
                runs[method].append(measure(method, store, ctx.work, n_mem))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    seconds = {m: statistics.median(r["seconds"] for r in runs[m]) for m in methods}
    rows = {m: (n_store if m in FIT_METHODS else n_mem) * TOKENS for m in methods}
    flops = {m: symmetric_flops(rows[m], d) + 2 * rows[m] * d * d for m in methods}  # XᵀX, XᵀY
    gflops = {m: flops[m] / seconds[m] / 1e9 for m in methods}
    per_row = {m: seconds[m] / rows[m] for m in methods}
    reference = runs["numpy"][0]["t"]
    fit_t = runs["fit"][0]["t"]

    figures.add(f"rows_d{d}", rows["fit"], "rows")
    figures.add(f"fit_rows_per_s_d{d}", rows["fit"] / seconds["fit"], "rows/s")
    figures.add(f"fit_gflops_d{d}", gflops["fit"], "GFLOP/s")
    first_call = statistics.median(r["first_call_seconds"] for r in runs["fit"])
    figures.add(f"fit_first_call_seconds_d{d}", first_call, "s")
    figures.add(f"limit_gflops_d{d}", gflops["limit"], "GFLOP/s")
    for product, count in (
        ("syrk", symmetric_flops(rows["limit"], d)),
        ("gemm", 2 * rows["limit"] * d * d),
    ):
        best = min(r[f"{product}_seconds"] for r in runs["limit"])
        figures.add(f"{product}_f64_gflops_d{d}", count / best / 1e9, "GFLOP/s")
    target = at_least(LIMIT_RATIO_TARGET) if d >= LIMIT_RATIO_MIN_D else None
    figures.add(f"limit_ratio_d{d}", gflops["fit"] / gflops["limit"], "ratio", target)
    if "fit32" in seconds:
        figures.add(f"fit32_limit_ratio_d{d}", gflops["fit32"] / gflops["limit"], "ratio")
    if "fit_ckpt" in seconds:
        overhead = seconds["fit_ckpt"] / seconds["fit"]
        figures.add(f"checkpoint_overhead_d{d}", overhead, "ratio")
    dask_first = statistics.median(r["first_call_seconds"] for r in runs["dask_lstsq"])
    figures.add(f"dask_lstsq_first_call_seconds_d{d}", dask_first, "s")
    dask_t = runs["dask_lstsq"][0]["t"]
    rel = float(np.linalg.norm(dask_t - fit_t) / np.linalg.norm(fit_t))
    figures.add(f"dask_lstsq_t_rel_diff_vs_fit_d{d}", rel, "rel")
    out = []
    for method in methods:
        t = runs[method][0].get("t")
        error = None if t is None else float(np.abs(t - reference).max())
        rss = max(r["peak_rss_mb"] for r in runs[method])
        figures.add(f"{method}_seconds_d{d}", seconds[method], "s")
        figures.add(f"{method}_peak_rss_mb_d{d}", rss, "MB")
        if error is not None:
            err_target = at_most(T_ERROR_TARGET) if method == "fit" else None
            figures.add(f"{method}_t_max_abs_err_d{d}", error, "abs", err_target)
        if not method.startswith(("fit", "limit")):
            speed_target = at_least(1.0) if method.startswith("torch") else None
            speedup = per_row[method] / per_row["fit"]  # time per row: equal rows, time ratio
            figures.add(f"speedup_vs_{method}_d{d}", speedup, "ratio", speed_target)
        if method == "dask_lstsq":
            rss_ratio = rss / max(r["peak_rss_mb"] for r in runs["fit"])
            figures.add(f"rss_ratio_dask_lstsq_vs_fit_d{d}", rss_ratio, "ratio")
        out.append(
            {
                "d": d,
                "rows": rows[method],
                "method": method,
                "seconds": seconds[method],
                "gflops": gflops[method],
                "limit_ratio": gflops[method] / gflops["limit"],
                "rss": rss,
                "error": error,
                "rel_diff": rel,
                "first_call": statistics.median(
                    r.get("first_call_seconds", float("nan")) for r in runs[method]
                ),
            }
        )
    return out


def _headline(rows: list[dict[str, Any]]) -> str:
    """Per D: fit from the store against the machine's GEMM rate and against Dask's lstsq."""
    by = {(r["d"], r["method"]): r for r in rows}
    out = []
    for d in dict.fromkeys(r["d"] for r in rows):
        fit, limit, dask = by[(d, "fit")], by[(d, "limit")], by[(d, "dask_lstsq")]
        out.append(
            [
                d,
                f"{fit['rows']:,}",
                fmt(fit["first_call"]),
                fmt(fit["seconds"]),
                fmt(fit["gflops"]),
                fmt(limit["gflops"]),
                f"**{fmt(fit['limit_ratio'], 2)}**",
                fmt(dask["first_call"]),
                fmt(dask["seconds"]),
                fmt((dask["seconds"] / dask["rows"]) / (fit["seconds"] / fit["rows"]), 2),
                fmt(fit["rss"]),
                fmt(dask["rss"]),
                f"{dask['rel_diff']:.1e}",
            ]
        )
    return table(
        [
            "D",
            "rows (store)",
            "fit: fresh-process s",
            "fit s",
            "fit GFLOP/s",
            "in-memory products GFLOP/s",
            "fit ÷ in memory",
            "dask lstsq: fresh-process s",
            "dask lstsq s",
            "dask ÷ fit (time)",
            "fit peak RSS MB",
            "dask peak RSS MB",
            "‖T_dask - T_fit‖ ÷ ‖T_fit‖",
        ],
        out,
    )


def _table(rows: list[dict[str, Any]]) -> str:
    header = ["D", "rows", "method", "s", "rows/s", "GFLOP/s", "÷ in-memory rate", "peak RSS MB"]
    return table(
        [*header, "T max abs err"],
        [
            [
                r["d"],
                r["rows"],
                r["method"],
                fmt(r["seconds"]),
                fmt(r["rows"] / r["seconds"]),
                fmt(r["gflops"]),
                fmt(r["limit_ratio"], 2),
                fmt(r["rss"]),
                "—" if r["error"] is None else f"{r['error']:.1e}",
            ]
            for r in rows
        ],
    )


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def series(key: str, skip: tuple[str, ...] = ()) -> dict[str, tuple[list[float], list[float]]]:
        return {
            m: (
                [r["d"] for r in rows if r["method"] == m],
                [r[key] for r in rows if r["method"] == m],
            )
            for m in methods
            if m not in skip
        }

    line_plot(
        path,
        "width D",
        [
            ("effective GFLOP/s (rows·D·(3D+1) / s)", series("gflops")),
            ("peak RSS (MB)", series("rss")),
        ],
        title="Solver: fit from a compressed store vs in-memory alternatives",
    )


def run(ctx: Context) -> Section:
    widths = ctx.pick(smoke=(64,), quick=(192, 384, 768), full=(192, 384, 768, 1024))
    repeats = ctx.pick_repeats(smoke=1, quick=1, full=3)
    figures = Figures("solver")
    rows = [row for d in widths for row in run_width(ctx, d, repeats, figures)]
    _plot(rows, ctx.plots / "solver.png")
    markdown = "\n\n".join(
        [
            "**What is measured:** `fit` of span 0:1 (all 197 tokens per sample as rows, "
            "float64, NumPy backend) from a compressed synthetic store (float32, blosc-lz4; "
            f"{rows[0]['rows']:,} rows in this size), end to end (open, read, decompress, cast, "
            "centre, accumulate, solve, save), in a child process that has first fitted one "
            "shard untimed: that untimed fit, with rba-store's imports, is the *fresh-process* "
            "cost (imports, thread pools), reported apart as `fit_first_call_seconds_d*`. "
            "*limit*: the same two float64 products XᵀX and XᵀY on rows already in memory "
            "(fastest of 3; XᵀX through BLAS `syrk`, as `fit` computes it, XᵀY a GEMM): the "
            "machine's own float64 rate for them, measured in the same run; *fit ÷ in memory* "
            "is fit GFLOP/s ÷ that rate (target ≥ 0.6 at D ≥ 768). GFLOP/s count the FLOPs a "
            "user needs, rows·D·(D+1) for XᵀX (one triangle) and 2·rows·D² for XᵀY, not the "
            "4·rows·D² of two general products; `syrk_f64_gflops_d*` and `gemm_f64_gflops_d*` "
            "are each product alone in the limit's child. *dask_lstsq*: the "
            "out-of-core peer, `dask.array.linalg.lstsq` (tall-and-skinny QR, default threaded "
            "scheduler) on the same Zarr arrays (`da.from_zarr`, one chunk per shard, reshaped "
            "to rows, cast to float64), timed after an untimed solve of one shard (its "
            "fresh-process cost). "
            "In-memory alternatives on the same rows, capped to half the free memory (when "
            "capped, the store repeats its first M samples, so the least-squares map is the "
            "same, and times are compared per row); rows loaded as stored, float32; the cast to "
            "float64 and the solve are timed, after an untimed call on a few rows: "
            "`torch.linalg.lstsq` float32 and float64, `numpy.linalg.lstsq`, scikit-learn "
            "`Ridge` (alpha 1e-6) and `LinearRegression`. Each method in its own process (peak "
            f"RSS); median of {repeats} interleaved run(s). T error: max |T - T_lstsq| against "
            "float64 `numpy.linalg.lstsq`. fit32 is `fit --gemm float32`; fit_ckpt is `fit "
            "--checkpoint FILE --checkpoint-every 0` (partial sums saved after every group of "
            "shards; `checkpoint_overhead_d*` = its time ÷ fit's).",
            _headline(rows),
            "All methods:",
            _table(rows),
            "![solver](plots/solver.png)",
        ]
    )
    return Section("solver", figures.results, markdown, ["solver.png"])
