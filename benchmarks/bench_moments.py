"""Joint moments during extraction: what ``extract --stats`` costs next to the forward pass.

For each model the very same batches are run four ways, ``repeats`` times, the order flipping
on every repetition (drift of a noisy machine hits all alike); the figures are medians:
  - forward:        the bare model on every batch (``benchmarks._extract_timing``);
  - plain:          ``run_extraction`` without statistics;
  - stats:          ``stats=True`` (``extract --stats``: block statistics and joint moments);
  - no activations: ``stats=True, store_activations=False`` (``--no-activations``).
The extra time of ``--stats`` is set against a count: the joint co-moment product is
2·tokens·p² FLOPs per image (p = (L+1)·channels), compared with the forward pass's FLOPs
(``count_flops``, same convention) and, in time, with the machine's float64 GEMM rate on the
product's own shape (one shard's rows by p), measured in the same run.

Models: the embedded default on its digits, timm's ``vit_tiny_patch16_224`` (``full`` adds
``vit_small_patch16_224``) with random weights on digits resized to 224 px.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._extract_timing import (
    ReferenceRun,
    batch_ranges,
    load,
    time_extraction,
    time_reference,
    warm_up,
)
from benchmarks._plots import bar_plot
from benchmarks._results import Context, Figures, Section, fmt, table
from benchmarks.bench_extract import Case
from rba_store.approx.surgery import count_flops
from rba_store.extract import ExtractionPlan, plan_extraction

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "stats": {"stats": True},
    "no_activations": {"stats": True, "store_activations": False},
}


@dataclass(frozen=True)
class Measured:
    """Medians of one case's runs, and what explains them."""

    n_samples: int
    tokens: int
    p: int
    forward_s: float
    seconds: dict[str, float]  # variant -> median extraction seconds
    forward_flops: int  # per image
    gemm_gflops: float  # float64, on one shard's (rows, p) product

    @property
    def extra_s(self) -> float:
        """What ``--stats`` adds to a plain extraction."""
        return self.seconds["stats"] - self.seconds["plain"]

    @property
    def extra_us_per_row(self) -> float:
        return 1e6 * self.extra_s / (self.n_samples * self.tokens)

    @property
    def extra_ms_per_image(self) -> float:
        return 1e3 * self.extra_s / self.n_samples

    @property
    def product_flops(self) -> int:
        """The joint co-moment product per image: 2·tokens·p²."""
        return 2 * self.tokens * self.p**2

    @property
    def product_share(self) -> float:
        """The product's time at the GEMM rate ÷ the measured extra time."""
        predicted = self.n_samples * self.product_flops / (self.gemm_gflops * 1e9)
        return predicted / self.extra_s


def make_cases(ctx: Context) -> list[Case]:
    """The embedded default (all its digits; 16 for smoke), vit_tiny and (full) vit_small."""
    cases = [Case("default", None, ctx.pick(smoke=16, quick=None, full=None), 64)]
    if ctx.size != "smoke":  # smoke: the default runs the same code paths (a timm ViT too)
        cases.append(Case("vit_tiny", "vit_tiny_patch16_224", ctx.pick(2, 64, 256), 32))
    if ctx.size == "full":
        cases.append(Case("vit_small", "vit_small_patch16_224", 128, 32))
    return cases


def gemm_gflops(rows: int, p: int, repeats: int = 3) -> float:
    """float64 GFLOP/s of zᵀz for a (rows, p) matrix z, fastest of ``repeats``, counted as
    2·rows·p² (NumPy runs it as a symmetric product, half of those, as the statistics do)."""
    z = np.random.default_rng(0).normal(size=(rows, p))
    z.T @ z[:, : min(p, 64)]  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        z.T @ z
        best = min(best, time.perf_counter() - start)
    return 2 * rows * p * p / best / 1e9


def measure(case: Case, repeats: int, work: Path) -> Measured:
    """Alternate the bare forward pass and the three extractions, flipping the order."""
    plans = {
        name: plan_extraction(replace(case.options(), **changes))
        for name, changes in VARIANTS.items()
    }
    reference = plans["plain"]
    ranges = batch_ranges(reference)
    for plan in plans.values():
        warm_up(plan, ranges)
    forwards: list[ReferenceRun] = []
    seconds: dict[str, list[float]] = {name: [] for name in plans}

    def extract(name: str, plan: ExtractionPlan) -> None:
        seconds[name].append(time_extraction(plan, work / f"moments-{name}.zarr").seconds)

    steps = [lambda: forwards.append(time_reference(reference, ranges))]
    steps += [lambda n=name, p=plan: extract(n, p) for name, plan in plans.items()]
    for rep in range(repeats):
        for step in steps if rep % 2 == 0 else steps[::-1]:
            step()
    for name in plans:
        shutil.rmtree(work / f"moments-{name}.zarr", ignore_errors=True)
    layout = reference.layout
    tokens = layout.points[0].n_tokens
    p = sum(point.n_channels for point in layout.points)
    image_shape = load(reference, *ranges[0]).shape[1:]
    return Measured(
        n_samples=layout.n_samples,
        tokens=tokens,
        p=p,
        forward_s=statistics.median(r.forward_s for r in forwards),
        seconds={name: statistics.median(s) for name, s in seconds.items()},
        forward_flops=count_flops(reference.loaded.module, image_shape),
        gemm_gflops=gemm_gflops(min(layout.shard_samples, layout.n_samples) * tokens, p),
    )


def _model_label(case: Case) -> str:
    return "default (embedded)" if case.model is None else case.model


def _add_figures(figures: Figures, case: Case, m: Measured) -> None:
    figures.add(f"forward_seconds_{case.name}", m.forward_s, "s")
    for name, s in m.seconds.items():
        figures.add(f"ratio_{name}_{case.name}", s / m.forward_s, "ratio")
    figures.add(f"stats_extra_us_per_row_{case.name}", m.extra_us_per_row, "µs")
    figures.add(f"stats_extra_ms_per_image_{case.name}", m.extra_ms_per_image, "ms")
    figures.add(f"product_flops_ratio_{case.name}", m.product_flops / m.forward_flops, "ratio")
    figures.add(f"gemm_f64_gflops_{case.name}", m.gemm_gflops, "GFLOP/s")
    figures.add(f"product_share_{case.name}", m.product_share, "ratio")


def run(ctx: Context) -> Section:
    repeats = ctx.pick_repeats(smoke=1, quick=5, full=5)
    figures = Figures("moments")
    done = [(case, measure(case, repeats, ctx.work)) for case in make_cases(ctx)]
    rows = []
    for case, m in done:
        _add_figures(figures, case, m)
        rows.append(
            [
                _model_label(case),
                m.n_samples,
                f"{m.tokens} x {m.p}",
                fmt(m.forward_s),
                *(fmt(m.seconds[name]) for name in VARIANTS),
                *(f"{m.seconds[name] / m.forward_s:.2f}" for name in VARIANTS),
                fmt(m.extra_us_per_row),
                fmt(m.extra_ms_per_image),
                f"{m.product_flops / m.forward_flops:.2f}",
                fmt(m.gemm_gflops),
                f"{m.product_share:.2f}",
            ]
        )
    bar_plot(
        ctx.plots / "moments.png",
        [f"{case.name} {name}" for case, _ in done for name in VARIANTS],
        [m.seconds[name] / m.forward_s for _, m in done for name in VARIANTS],
        "time ÷ bare forward",
        None,
    )
    header = ["model", "samples", "tokens x p", "fwd s", "plain s", "stats s", "no-act s"]
    header += ["plain ÷ fwd", "stats ÷ fwd", "no-act ÷ fwd", "extra µs/row", "extra ms/image"]
    header += ["product ÷ fwd FLOPs", "GEMM GFLOP/s", "product at GEMM rate ÷ extra"]
    markdown = "\n\n".join(
        [
            "**What is measured:** on the same batches, the bare forward pass and `run_extraction` "
            "plain, with `--stats` (block statistics and joint moments accumulated during the "
            f"pass) and with `--stats --no-activations`; median of {repeats} runs whose order "
            "flips every repetition (see `bench_moments.py`). vit_tiny and vit_small have random "
            "weights and take digits resized to 224 px. *extra* is `--stats` minus plain, per "
            "row (token vector) and per image. *product ÷ fwd FLOPs*: the joint co-moment "
            "product, 2·tokens·p² per image (p = (L+1)·channels), ÷ the forward pass's FLOPs "
            "(`count_flops`, 2 per multiply-add). *product at GEMM rate ÷ extra*: that product's "
            "time at the float64 rate of zᵀz on one shard's (rows, p) matrix, measured in the "
            "same run (fastest of 3; counted as 2·rows·p², of which BLAS's symmetric product "
            "does half, so the rate can pass the machine's GEMM peak), ÷ the measured extra "
            "time; near 1, the product is the cost.",
            table(header, rows),
            "![joint moments](plots/moments.png)",
        ]
    )
    return Section("moments", figures.results, markdown, ["moments.png"])
