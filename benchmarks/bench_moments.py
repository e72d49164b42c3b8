"""Joint moments during extraction: what ``extract --stats`` costs next to the forward pass.

For each model the very same batches are run four ways, ``repeats`` times, the order flipping
on every repetition (drift of a noisy machine hits all alike); the figures are medians:
  - forward:        the bare model on every batch (``benchmarks._extract_timing``);
  - plain:          ``run_extraction`` without statistics;
  - stats:          ``stats=True`` (``extract --stats``: block statistics and joint moments);
  - no activations: ``stats=True, store_activations=False`` (``--no-activations``).
The extra time of ``--stats`` is set against a count: the joint co-moment product is, in the
FLOPs a user needs (one triangle, as ``syrk`` computes it), tokens·p·(p+1) per image when every
pair of points is kept (p = (L+1)·channels), compared with the forward pass's FLOPs
(``count_flops``, same convention) and, in time, with the machine's float64 ``syrk`` rate on the
product's own shape (one shard's rows by p), measured in the same run. The joint moments alone
(one shard's rows cast, centred and multiplied as ``extract --stats`` does it) are timed against
that ``syrk`` on the same rows, alternately: moments GFLOP/s ÷ the machine's ``syrk`` rate.

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
from benchmarks._machine import syrk_gflops
from benchmarks._plots import bar_plot
from benchmarks._results import Context, Figures, Section, at_least, fmt, table
from benchmarks.bench_extract import Case
from rba_store.approx.surgery import count_flops
from rba_store.extract import ExtractionPlan, plan_extraction
from rba_store.extract.streamed_stats import streamed_cost
from rba_store.extract.worker_partials import partials_folder
from rba_store.solve.symmetric import symmetric_flops, symmetric_product
from rba_store.stats.moments import Pair, band_pairs
from rba_store.stats.partials import pair_moments_of_chunk

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "stats": {"stats": True},
    "no_activations": {"stats": True, "store_activations": False},
}
MOMENTS_TARGET = 0.7  # joint moments' GFLOP/s ÷ the machine's syrk rate (issue 22)


@dataclass(frozen=True)
class Measured:
    """Medians of one case's runs, and what explains them."""

    n_samples: int
    tokens: int
    p: int
    forward_s: float
    seconds: dict[str, float]  # variant -> median extraction seconds
    forward_flops: int  # per image
    product_flops: int  # per image: the joint moments' pairs, one triangle (syrk's count)
    syrk_gflops: float  # float64, on one shard's (rows, p) product
    moments_gflops: float  # the joint moments of one shard, as extract --stats computes them
    moments_syrk_gflops: float  # syrk on the same rows, timed alternately with them

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
    def product_share(self) -> float:
        """The product's time at the syrk rate ÷ the measured extra time."""
        predicted = self.n_samples * self.product_flops / (self.syrk_gflops * 1e9)
        return predicted / self.extra_s

    @property
    def moments_ratio(self) -> float:
        """The joint moments' GFLOP/s ÷ the machine's syrk rate on the same rows."""
        return self.moments_gflops / self.moments_syrk_gflops


def make_cases(ctx: Context) -> list[Case]:
    """The embedded default (all its digits; 16 for smoke), vit_tiny and (full) vit_small."""
    cases = [Case("default", None, ctx.pick(smoke=16, quick=None, full=None), 64)]
    if ctx.size != "smoke":  # smoke: the default runs the same code paths (a timm ViT too)
        cases.append(Case("vit_tiny", "vit_tiny_patch16_224", ctx.pick(2, 64, 256), 32))
    if ctx.size == "full":
        cases.append(Case("vit_small", "vit_small_patch16_224", 128, 32))
    return cases


def pair_flops(rows: int, widths: list[int], pairs: tuple[Pair, ...]) -> int:
    """The FLOPs a user needs for the co-moment blocks ``pairs``: ``syrk``'s count on the
    diagonal blocks, 2·rows·w_a·w_b on the others (rows·p·(p+1) when every pair is kept)."""
    return sum(
        symmetric_flops(rows, widths[a]) if a == b else 2 * rows * widths[a] * widths[b]
        for a, b in pairs
    )


def time_moments(
    n: int, tokens: int, widths: list[int], band: int | None, repeats: int = 3
) -> tuple[float, float]:
    """GFLOP/s of one shard's joint moments (``pair_moments_of_chunk``, ``chunk_partials``'s
    code: float32 points cast into the joint rows, centred, the blocks of the band) and of
    ``syrk`` on the same (rows, p) float64 rows, fastest of ``repeats`` each, alternately."""
    rng = np.random.default_rng(0)
    points = [rng.normal(size=(n, tokens, w)).astype(np.float32) for w in widths]
    pairs = band_pairs(len(widths), band)
    z = rng.normal(size=(n * tokens, sum(widths)))

    def moments() -> None:
        pair_moments_of_chunk(points, pairs)

    best = {"moments": float("inf"), "syrk": float("inf")}
    steps = {"moments": moments, "syrk": lambda: symmetric_product(z)}
    for step in steps.values():
        step()  # warm-up: the reused buffers, thread pools
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    flops = pair_flops(n * tokens, widths, pairs)
    syrk = symmetric_flops(n * tokens, sum(widths))
    return flops / best["moments"] / 1e9, syrk / best["syrk"] / 1e9


def _store_path(work: Path, case: Case, variant: str) -> Path:
    """One store per case and variant. A finished ``extract --stats`` leaves its worker's
    partials beside the store (saved again after the merge removed them), and ``--overwrite``
    does not remove them: a later run at the same path resumes from them (skipping every shard's
    statistics), or fails on another model's. The benchmark removes them before each run."""
    return work / f"moments-{case.name}-{variant}.zarr"


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
        path = _store_path(work, case, name)
        shutil.rmtree(partials_folder(path), ignore_errors=True)  # else the run resumes from them
        seconds[name].append(time_extraction(plan, path).seconds)

    steps = [lambda: forwards.append(time_reference(reference, ranges))]
    steps += [lambda n=name, p=plan: extract(n, p) for name, plan in plans.items()]
    for rep in range(repeats):
        for step in steps if rep % 2 == 0 else steps[::-1]:
            step()
    for name in plans:
        path = _store_path(work, case, name)
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(partials_folder(path), ignore_errors=True)
    layout = reference.layout
    tokens = layout.points[0].n_tokens
    widths = [point.n_channels for point in layout.points]
    p = sum(widths)
    image_shape = load(reference, *ranges[0]).shape[1:]
    band = streamed_cost(layout)[0]
    shard = min(layout.shard_samples, layout.n_samples)
    moments_gflops, moments_syrk = time_moments(shard, tokens, widths, band)
    return Measured(
        n_samples=layout.n_samples,
        tokens=tokens,
        p=p,
        forward_s=statistics.median(r.forward_s for r in forwards),
        seconds={name: statistics.median(s) for name, s in seconds.items()},
        forward_flops=count_flops(reference.loaded.module, image_shape),
        product_flops=pair_flops(tokens, widths, band_pairs(len(widths), band)),
        syrk_gflops=syrk_gflops(shard * tokens, p),
        moments_gflops=moments_gflops,
        moments_syrk_gflops=moments_syrk,
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
    figures.add(f"syrk_f64_gflops_{case.name}", m.syrk_gflops, "GFLOP/s")
    figures.add(f"product_share_{case.name}", m.product_share, "ratio")
    figures.add(f"moments_gflops_{case.name}", m.moments_gflops, "GFLOP/s")
    figures.add(
        f"moments_syrk_ratio_{case.name}", m.moments_ratio, "ratio", at_least(MOMENTS_TARGET)
    )


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
                fmt(m.syrk_gflops),
                f"{m.product_share:.2f}",
                fmt(m.moments_gflops),
                f"**{m.moments_ratio:.2f}**",
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
    header += ["product ÷ fwd FLOPs", "syrk GFLOP/s", "product at syrk rate ÷ extra"]
    header += ["moments GFLOP/s", "moments ÷ syrk"]
    markdown = "\n\n".join(
        [
            "**What is measured:** on the same batches, the bare forward pass and `run_extraction` "
            "plain, with `--stats` (block statistics and joint moments accumulated during the "
            f"pass) and with `--stats --no-activations`; median of {repeats} runs whose order "
            "flips every repetition (see `bench_moments.py`). vit_tiny and vit_small have random "
            "weights and take digits resized to 224 px. *extra* is `--stats` minus plain, per "
            "row (token vector) and per image. *product ÷ fwd FLOPs*: the joint co-moment "
            "product in the FLOPs a user needs (one triangle, as BLAS `syrk` computes it: "
            "tokens·p·(p+1) per image with every pair of points kept, p = (L+1)·channels), ÷ "
            "the forward pass's FLOPs (`count_flops`, 2 per multiply-add). *product at syrk "
            "rate ÷ extra*: that product's time at the machine's float64 `syrk` rate on one "
            "shard's (rows, p) matrix, measured in the same run (fastest of 3), ÷ the measured "
            "extra time; near 1, the product is the cost. *moments GFLOP/s*: the joint moments "
            "of one shard alone, as `extract --stats` computes them (float32 points cast into "
            "the float64 joint rows, centred, one symmetric product per group of consecutive "
            "points of at most 1,024 columns, one GEMM per run of points with the same partners "
            "across groups, blocks copied out), on random values of the shard's shape; *moments "
            "÷ syrk*: that rate ÷ "
            "`syrk` on the same (rows, p) float64 rows, fastest of 3 each, timed alternately "
            f"(target ≥ {MOMENTS_TARGET}).",
            table(header, rows),
            "![joint moments](plots/moments.png)",
        ]
    )
    return Section("moments", figures.results, markdown, ["moments.png"])
