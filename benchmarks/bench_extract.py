"""Extraction: extraction time ÷ bare forward time, for the same model, batches and data.

Every case is planned once with :func:`rba_store.extract.plan_extraction`, then measured
``repeats`` times, alternating an extraction (``run_extraction`` into a scratch store) with a
reference pass over the very same batches (``benchmarks._extract_timing``); the order flips on
every repetition (E R, R E, E R) so that drift of a noisy machine hits both sides alike, and the
figures are medians.

Extraction loads its data too, so the fair ratio is ``extract / (load + forward)``; the ratio
against the forward pass alone is the stricter one. Both carry the target (at most 1.15).

Models: the embedded default (its own digits) and timm's ``vit_tiny_patch16_224`` and
``vit_small_patch16_224`` with random weights (no network) on digits resized to 224 px, with
the default codec (blosc-lz4) and without compression. The uncompressed store of each model is
then re-encoded with every codec (``benchmarks._codecs``). ``full`` adds a float16 case and a
serial breakdown of one extraction per case (``benchmarks._extract_profile``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from benchmarks._codecs import CodecRun, reencode
from benchmarks._extract_profile import Breakdown, profile
from benchmarks._extract_timing import Timings, measure
from benchmarks._plots import bar_plot
from benchmarks._results import Context, Figures, Section, at_most, fmt, table
from rba_store import store as rs
from rba_store.extract import ExtractOptions, plan_extraction
from rba_store.store import DEFAULT_CODEC

TARGET_RATIO = 1.15
VIT_TINY = "vit_tiny_patch16_224"
VIT_SMALL = "vit_small_patch16_224"
CODECS = (DEFAULT_CODEC, "none")


@dataclass(frozen=True)
class Case:
    """One extraction configuration to measure."""

    name: str
    model: str | None
    limit: int | None
    batch_size: int
    codec: str = DEFAULT_CODEC
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return f"{self.name}_{self.codec}" + ("" if self.dtype == "float32" else f"_{self.dtype}")

    def options(self) -> ExtractOptions:
        return ExtractOptions(
            model=self.model,
            data="digits",
            limit=self.limit,
            batch_size=self.batch_size,
            codec=self.codec,
            dtype=self.dtype,
        )


def make_cases(ctx: Context) -> list[Case]:
    """The embedded default, vit_tiny and vit_small at 224 px, compressed and not."""
    tiny = ctx.pick(smoke=4, quick=128, full=None)
    small = ctx.pick(smoke=4, quick=64, full=512)
    batch = ctx.pick(smoke=4, quick=32, full=32)
    cases = [] if ctx.size == "smoke" else [Case("default", None, None, 64, c) for c in CODECS]
    cases += [Case("vit_tiny", VIT_TINY, tiny, batch, c) for c in CODECS]
    if ctx.size != "smoke":  # smoke: vit_tiny runs the same code paths, at a fifth of the cost
        cases += [Case("vit_small", VIT_SMALL, small, batch, c) for c in CODECS]
    if ctx.size == "full":
        cases.append(Case("vit_tiny", VIT_TINY, tiny, batch, DEFAULT_CODEC, "float16"))
    return cases


def _model_label(case: Case) -> str:
    return "default (embedded)" if case.model is None else case.model


def _case_rows(done: list[tuple[Case, Timings]]) -> list[list[object]]:
    return [
        [
            _model_label(c),
            r.n_samples,
            c.batch_size,
            f"{r.n_shards} x {r.shard_samples}",
            c.dtype,
            c.codec,
            fmt(r.extract_s),
            fmt(r.load_forward_s),
            fmt(r.forward_s),
            f"**{r.ratio:.2f}**",
            f"{r.ratio_forward:.2f}",
            fmt(r.bytes_per_image / 1024),
            " / ".join(f"{e.seconds:.2f}" for e in r.extractions),
            f"{r.loadavg_1m:.1f}",
        ]
        for c, r in done
    ]


def _add_case_figures(figures: Figures, case: Case, r: Timings) -> None:
    target = at_most(TARGET_RATIO)
    figures.add(f"ratio_{case.label}", r.ratio, "ratio", target)
    figures.add(f"ratio_forward_{case.label}", r.ratio_forward, "ratio", target)
    figures.add(f"extract_seconds_{case.label}", r.extract_s, "s")
    figures.add(f"forward_seconds_{case.label}", r.forward_s, "s")
    figures.add(f"kib_per_image_{case.label}", r.bytes_per_image / 1024, "KiB")
    compression = r.extractions[-1].compression_ratio
    if compression is not None:
        figures.add(f"compression_{case.label}", compression, "ratio")


def run(ctx: Context) -> Section:
    repeats = ctx.pick_repeats(smoke=1, quick=2, full=3)
    figures = Figures("extract")
    done: list[tuple[Case, Timings]] = []
    codec_runs: list[tuple[str, CodecRun]] = []
    breakdowns: list[tuple[Case, Breakdown]] = []
    for case in make_cases(ctx):
        plan = plan_extraction(case.options())
        out = ctx.work / f"extract-{case.label}.zarr"
        keep = case.codec == "none"
        timings = measure(plan, repeats, out, keep=keep)
        done.append((case, timings))
        _add_case_figures(figures, case, timings)
        if keep:  # every codec on this model's activations
            for codec in rs.CODECS:
                result = reencode(out, codec, ctx.work / f"codec-{codec}.zarr")
                codec_runs.append((case.name, result))
                figures.add(f"codec_ratio_{case.name}_{codec}", result.ratio, "ratio")
                figures.add(f"codec_write_mb_s_{case.name}_{codec}", result.write_mb_s, "MB/s")
                figures.add(f"codec_read_mb_s_{case.name}_{codec}", result.read_mb_s, "MB/s")
            shutil.rmtree(out, ignore_errors=True)
        if ctx.size == "full":
            breakdowns.append((case, profile(plan, ctx.work / "profile.zarr")))
    bar_plot(
        ctx.plots / "extract.png",
        [f"{c.name} {c.codec}" + ("" if c.dtype == "float32" else f" {c.dtype}") for c, _ in done],
        [r.ratio for _, r in done],
        "extraction ÷ (load + bare forward)",
        TARGET_RATIO,
    )
    header = ["model", "samples", "batch", "shards", "dtype", "codec", "extract s", "load+fwd s"]
    header += ["fwd s", "ratio (load+fwd)", "ratio (fwd)", "KiB/image", "extractions s", "load 1m"]
    parts = [
        "**What is measured:** extraction time ÷ bare forward time for the same model, batches "
        f"and data (median of {repeats} alternating runs; see `bench_extract.py`). vit_tiny and "
        "vit_small have random weights and take digits resized to 224 px. *ratio (load+fwd)* is "
        "the fair ratio (extraction loads its data too), *ratio (fwd)* the strict one. "
        "*load 1m* is the 1-minute load average after the case (this run alone makes it ≈ 2).",
        table(header, _case_rows(done)),
        "**Every codec on the same activations** (the uncompressed store re-encoded with the "
        "store's chunking through zarr's own write path; MB/s of raw activations):",
        table(
            ["model", "codec", "compression (raw ÷ stored)", "encode MB/s", "decode MB/s"],
            [
                [name, r.codec, fmt(r.ratio), fmt(r.write_mb_s), fmt(r.read_mb_s)]
                for name, r in codec_runs
            ],
        ),
        "![extraction](plots/extract.png)",
    ]
    if breakdowns:
        parts.append("**Serial breakdown** (each step alone in the main thread):")
        parts.append(
            table(
                ["model", "dtype", "codec", "load s", "capture s", "copy s", "write s", "sum s"],
                [
                    [_model_label(c), c.dtype, c.codec]
                    + [fmt(x) for x in (b.load_s, b.capture_s, b.copy_s, b.write_s, b.total_s)]
                    for c, b in breakdowns
                ],
            )
        )
    return Section("extract", figures.results, "\n\n".join(parts), ["extract.png"])
