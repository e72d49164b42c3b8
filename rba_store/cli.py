"""The ``rba-store`` command line: parse options, call the library, print a summary.

Errors on bad input become one line on stderr and a non-zero exit code; ``--verbose`` (anywhere on
the command line) adds the traceback and INFO logging.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from rba_store.errors import Interrupted, RBAStoreError, UsageError, describe_os_error

app = typer.Typer(
    name="rba-store",
    help="Find and replace redundant blocks of neural networks from an activation store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Tokens(str, Enum):
    all = "all"
    cls = "cls"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


class Codec(str, Enum):
    blosc_zstd = "blosc-zstd"
    zstd = "zstd"
    blosc_lz4 = "blosc-lz4"
    none = "none"


# Options shared by several commands.
StoreArg = Annotated[Path, typer.Argument(help="A store written by 'rba-store extract'.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use the first N samples.")]
SampleOpt = Annotated[int | None, typer.Option(help="Use N samples drawn at random.")]
SchedulerOpt = Annotated[
    str | None, typer.Option(help="Address of a running dask.distributed scheduler.")
]
SchedulerFileOpt = Annotated[
    Path | None, typer.Option(help="Scheduler file of a running dask.distributed cluster.")
]
AllowIncompleteOpt = Annotated[
    bool, typer.Option(help="Use the complete shards of an unfinished store.")
]


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and progress logging.")
    ] = False,
) -> None:
    """rba-store: extract activations once, then analyse them out of core."""


def _default_out(model: str | None, data: str, split: str | None) -> Path:
    from rba_store.default_model import MODEL_NAME

    stem = "_".join(x for x in (model or MODEL_NAME, Path(data).stem, split) if x)
    return Path("runs") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) + ".zarr")


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


class _ProgressBar:
    """A rich progress bar on stderr (images/s, MB/s, ETA); silent when stderr is not a terminal."""

    def __init__(self, total: int, done: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.enabled = console.is_terminal
        self.start = time.perf_counter()
        self.samples = self.nbytes = 0
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )
        self.task = self.progress.add_task(label, total=total, completed=done, rate="")

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, samples: int, nbytes: int) -> None:
        self.samples += samples
        self.nbytes += nbytes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.samples / elapsed:,.0f} img/s {self.nbytes / elapsed / 2**20:,.1f} MB/s"
        self.progress.update(self.task, advance=samples, rate=rate)


@app.command()
def extract(
    model: Annotated[
        str | None, typer.Option(help="timm model name; the embedded default when omitted.")
    ] = None,
    data: Annotated[
        str, typer.Option(help="'digits', an image folder, or a .npz file with an array 'x'.")
    ] = "digits",
    out: Annotated[
        Path | None, typer.Option(help="Store directory [default: runs/<model>_<data>.zarr].")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Local weights: a state dict (.pth) or .safetensors.")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Load timm's pretrained weights (hub or local cache).")
    ] = False,
    split: Annotated[
        str | None, typer.Option(help="Data split: train/test (digits), a sub-folder name.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N samples.")] = None,
    tokens: Annotated[Tokens, typer.Option(help="Store all tokens, or the class token only.")] = (
        Tokens.all
    ),
    dtype: Annotated[DType, typer.Option(help="Stored dtype.")] = DType.float32,
    codec: Annotated[Codec, typer.Option(help="Compression codec (lossless).")] = Codec.blosc_zstd,
    clevel: Annotated[int, typer.Option(help="Compression level.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 ...")] = "cpu",
    chunk_mb: Annotated[float, typer.Option(help="Target chunk size in MB.")] = 4.0,
    shard_mb: Annotated[float, typer.Option(help="Target shard (write unit) size in MB.")] = 16.0,
    chunk_samples: Annotated[
        int | None, typer.Option(help="Samples per chunk (overrides --chunk-mb).")
    ] = None,
    shard_samples: Annotated[
        int | None, typer.Option(help="Samples per shard, a multiple of the chunk.")
    ] = None,
    num_workers: Annotated[
        int, typer.Option(help="Processes filling this store together (one per GPU or node).")
    ] = 1,
    worker_index: Annotated[
        int, typer.Option(help="Which of --num-workers this process is (0-based).")
    ] = 0,
    dry_run: Annotated[
        bool, typer.Option(help="Print the store's size and memory per batch; write nothing.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing store made with another configuration.")
    ] = False,
) -> None:
    """Run a model over a data set and store the residual stream after every block."""
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
    from rba_store.schema import completed_shards, is_store, open_store

    options = ExtractOptions(
        model=model,
        checkpoint=checkpoint,
        pretrained=pretrained,
        data=data,
        split=split,
        limit=limit,
        tokens=tokens.value,
        dtype=dtype.value,
        codec=codec.value,
        clevel=clevel,
        batch_size=batch_size,
        device=device,
        chunk_mb=chunk_mb,
        shard_mb=shard_mb,
        chunk_samples=chunk_samples,
        shard_samples=shard_samples,
        num_workers=num_workers,
        worker_index=worker_index,
    )
    out = out or _default_out(model, data, split)
    plan = plan_extraction(options)
    layout = plan.layout
    point = layout.points[0]
    shape = f"{layout.n_samples} x {point.n_tokens} tokens x {point.n_channels} channels"
    if dry_run:
        sizes = plan.sizes()
        typer.echo(
            f"dry run: {plan.loaded.name} on {plan.description['data']['source']} -> {out}\n"
            f"  arrays      h0..h{layout.n_blocks} of {shape}, {layout.dtype}, "
            f"tokens={options.tokens}\n"
            f"  layout      {layout.chunk_samples} samples/chunk, {layout.shard_samples} "
            f"samples/shard, {layout.n_shards} shards, codec {layout.codec}\n"
            f"  store size  {_mb(sizes['store_bytes_raw'])} uncompressed (lossless codecs save "
            "10-20% on float activations)\n"
            f"  memory      {_mb(sizes['batch_activation_bytes'])} per batch of "
            f"{min(batch_size, layout.shard_samples)} (float32), "
            f"{_mb(sizes['shard_buffer_bytes'])} per shard buffer, "
            f"about {_mb(sizes['peak_bytes_estimate'])} in all\n"
            "  nothing was written"
        )
        return
    done = shards_before = 0
    if is_store(out) and not overwrite:
        done_mask = completed_shards(open_store(out))
        shards_before = int(done_mask.sum())
        done = sum(
            b - a
            for i, (a, b) in enumerate(map(layout.shard_rows, range(layout.n_shards)))
            if i < len(done_mask) and done_mask[i]
        )
    try:
        with _ProgressBar(layout.n_samples, done, "extract") as bar:
            result = run_extraction(plan, out, overwrite=overwrite, progress=bar)
    except KeyboardInterrupt:
        kept = int(completed_shards(open_store(out)).sum()) if is_store(out) else 0
        raise Interrupted(
            f"interrupted: {kept}/{layout.n_shards} shards of {str(out)!r} are complete and "
            "kept; re-run the same command to resume"
        ) from None
    from rba_store.info import store_info

    info = store_info(out)
    rate = result.samples_written / result.seconds if result.seconds > 0 else 0.0
    complete = info["complete"]
    if result.resumed and result.shards_written == 0 and complete:
        head = f"{out} is already complete ({layout.n_shards} shards); nothing to do"
    else:
        resumed = (
            f" (resumed: {shards_before} of {layout.n_shards} shards were already complete)"
            if result.resumed
            else ""
        )
        if not complete:
            resumed += (
                f"; {info['shards_complete']}/{layout.n_shards} shards complete so far "
                "(other workers fill the rest)"
            )
        head = (
            f"extracted {result.samples_written} samples in {result.seconds:.1f} s "
            f"({rate:,.0f} img/s) into {out}{resumed}"
        )
    ratio = info["compression_ratio"]
    typer.echo(
        f"{head}\n  h0..h{layout.n_blocks}: {shape}, {layout.dtype}; stored "
        f"{_mb(info['bytes_stored'])} of {_mb(info['bytes_raw'])} raw"
        + (f" (ratio {ratio:.3f})" if ratio else "")
    )


@app.command()
def info(
    store: StoreArg,
    as_json: JsonOpt = False,
) -> None:
    """Shapes, dtype, codec, bytes stored vs raw, completeness and provenance of a store."""
    from rba_store.info import format_info, store_info

    summary = store_info(store)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@app.command()
def stats(
    store: StoreArg,
    tokens: Annotated[Tokens, typer.Option(help="Token vectors: all (flattened) or cls.")] = (
        Tokens.all
    ),
    limit: LimitOpt = None,
    sample: SampleOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    name: Annotated[
        str | None, typer.Option(help="Save as stats/NAME [default: from the options].")
    ] = None,
    as_json: JsonOpt = False,
    plots: Annotated[Path | None, typer.Option(help="Write PNG figures into this folder.")] = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    allow_incomplete: AllowIncompleteOpt = False,
    overwrite: Annotated[
        bool, typer.Option(help="Recompute and replace saved statistics of the same name.")
    ] = False,
    cka: Annotated[
        bool, typer.Option(help="Compute the CKA matrix (the costly part for wide models).")
    ] = True,
    max_span: Annotated[int, typer.Option(help="Longest span (blocks) to rank.")] = 4,
    top: Annotated[int, typer.Option(help="Number of candidate spans to show.")] = 10,
) -> None:
    """Block Redundancy, relative change, cosine and CKA of every block; candidate spans."""
    from rba_store.stats import SampleSelection, run_stats

    if max_span < 1 or top < 1:
        raise UsageError(f"--max-span {max_span} and --top {top} must be positive numbers")
    _check_folder(plots, "--plots")
    result, reused = run_stats(
        store,
        name=name,
        tokens=tokens.value,
        selection=SampleSelection(limit=limit, sample=sample, seed=seed),
        allow_incomplete=allow_incomplete,
        scheduler=scheduler,
        scheduler_file=str(scheduler_file) if scheduler_file else None,
        overwrite=overwrite,
        cka=cka,
    )
    written = []
    if plots is not None:
        from rba_store.stats.plots import write_plots

        written = write_plots(result, plots, title=Path(store).name)
    if as_json:
        typer.echo(json.dumps(result.to_json(max_span, top), indent=2))
        return
    saved = "reused the saved" if reused else "saved as"
    typer.echo(
        f"{store}: {result.n_blocks} blocks, {result.n_samples} samples, "
        f"{result.n_rows} token vectors (tokens={tokens.value}); {saved} "
        f"stats/{result.attrs.get('name')}\n"
    )
    typer.echo(result.format_table(max_span, top))
    for path in written:
        typer.echo(f"plot: {path}")


class Backend(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"


class Gemm(str, Enum):
    float64 = "float64"
    float32 = "float32"


def _auto_spans(store: Path, count: int, tokens: str, stats_name: str | None) -> list[tuple]:
    from rba_store import schema
    from rba_store.stats import BlockStats

    name = stats_name or f"tokens-{tokens}"
    saved = schema.read_analysis(store, schema.analysis_path(schema.STATS_GROUP, name))
    if saved is None:
        raise UsageError(
            f"--auto needs saved statistics, and {str(store)!r} has no stats/{name}; run "
            f"'rba-store stats {store} --tokens {tokens}' first (or pass --stats NAME)"
        )
    candidates = BlockStats.from_dataset(saved).candidates(top=count)
    return [tuple(c["span"]) for c in candidates]


def _format_fit(fit: Any) -> str:
    d = fit.diagnostics
    a, b = fit.span
    blocks = f"block {b}" if b - a == 1 else f"blocks {a + 1}-{b}"
    lines = [
        f"fit {fit.name}: span {a}:{b} ({blocks} replaced), {d['rows']:,} rows, "
        f"{d['channels_in']}->{d['channels_out']} channels, {d['method']}, "
        f"condition number {float(d['condition_number']):.3g}, rank {d['rank']}",
        f"  train    relative MSE {d['train']['relative_mse']:.4g}",
    ]
    held = d.get("heldout")
    if held:
        ident = held["identity"]
        lines.append(
            f"  held-out relative MSE {held['relative_mse']:.4g}  R² {held['r2']:.4f}  "
            f"cosine {held['cosine']:.4f}   ({held['rows']:,} rows)"
        )
        lines.append(
            f"  identity relative MSE {ident['relative_mse']:.4g}  R² {ident['r2']:.4f}  "
            f"cosine {ident['cosine']:.4f}   (T = I: plain block dropping)"
        )
    else:
        lines.append("  held-out: none (pass --holdout FRACTION or --eval-store STORE)")
    lines += [f"  note: {note}" for note in d["notes"]]
    lines.append(f"  saved as fits/{fit.name}")
    return "\n".join(lines)


@app.command()
def fit(
    store: StoreArg,
    span: Annotated[
        list[str] | None, typer.Option(help="a:b fits h_a -> h_b (replaces blocks a+1..b).")
    ] = None,
    auto: Annotated[
        int | None, typer.Option(help="Fit the best K candidate spans of the saved stats.")
    ] = None,
    stats_name: Annotated[
        str | None, typer.Option("--stats", help="Saved stats for --auto [tokens-<tokens>].")
    ] = None,
    tokens: Annotated[Tokens, typer.Option(help="Rows: every token vector, or cls only.")] = (
        Tokens.all
    ),
    limit: LimitOpt = None,
    sample: SampleOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample and --holdout.")] = 0,
    holdout: Annotated[
        float | None, typer.Option(help="Hold out this fraction of samples for diagnostics.")
    ] = None,
    eval_store: Annotated[
        Path | None, typer.Option(help="A second store (same model) for held-out diagnostics.")
    ] = None,
    bias: Annotated[bool, typer.Option(help="Fit an affine map (with a bias).")] = False,
    ridge: Annotated[float, typer.Option(help="Ridge λ, scaled by trace(XᵀX)/D.")] = 0.0,
    backend: Annotated[Backend, typer.Option(help="auto: CuPy when a GPU is visible.")] = (
        Backend.auto
    ),
    gemm: Annotated[
        Gemm, typer.Option(help="Precision of the per-chunk products (float64 accumulation).")
    ] = Gemm.float64,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    name: Annotated[str | None, typer.Option(help="Save as fits/NAME [default: a-b...].")] = None,
    export: Annotated[
        Path | None, typer.Option(help="Also write each fit as DIR/<name>.safetensors.")
    ] = None,
    allow_incomplete: AllowIncompleteOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Replace fits of the same name.")] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Save the partial sums to this file as the fit goes; re-run the same command "
            "to resume after a kill (deleted when the fit is saved)."
        ),
    ] = None,
    checkpoint_every: Annotated[
        float, typer.Option(help="Seconds between checkpoints (0: after every group of shards).")
    ] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Fit the linear maps T (h_a -> h_b) that replace spans of blocks, in one pass."""
    from rba_store.selection import SampleSelection
    from rba_store.solve import FitOptions, export_safetensors, fit_spans
    from rba_store.solve.fit import parse_span

    spans = [parse_span(s) for s in span or []]
    if auto is not None:
        if auto < 1:
            raise UsageError(f"--auto {auto} is invalid; pass a positive number of spans")
        spans += _auto_spans(store, auto, tokens.value, stats_name)
    options = FitOptions(
        spans=tuple(spans),
        tokens=tokens.value,
        selection=SampleSelection(limit=limit, sample=sample, seed=seed),
        holdout=holdout,
        holdout_seed=seed,
        eval_store=str(eval_store) if eval_store else None,
        bias=bias,
        ridge=ridge,
        backend=backend.value,
        gemm_dtype=gemm.value,
        allow_incomplete=allow_incomplete,
        scheduler=scheduler,
        scheduler_file=str(scheduler_file) if scheduler_file else None,
        name=name,
        overwrite=overwrite,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_every=checkpoint_every,
    )
    try:
        with _dask_progress():
            fits = fit_spans(store, options)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: the partial sums are saved in {str(checkpoint)!r}; re-run the same "
            "command to resume"
            if checkpoint
            else "interrupted: nothing was saved; re-run the command (with --checkpoint FILE a "
            "long fit can resume where it stopped)"
        ) from None
    exported = (
        [export_safetensors(store, f.name, export / f"{f.name}.safetensors") for f in fits]
        if export
        else []
    )
    if as_json:
        typer.echo(json.dumps([f.to_json() for f in fits], indent=2))
        return
    typer.echo("\n".join(_format_fit(f) for f in fits))
    for path in exported:
        typer.echo(f"exported {path}")


def _dask_progress() -> Any:
    """A Dask progress bar on stderr for the local scheduler, when stderr is a terminal."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr)


def _span_maps(store: Path, fits: list[str], identities: list[str]) -> tuple[list, list]:
    """SpanMaps (and their fit names, None for the identity) from --fit and --identity."""
    from rba_store.approx import SpanMap
    from rba_store.evaluate import fit_variant
    from rba_store.solve.fit import parse_span

    maps = list(fit_variant(store, fits).maps) if fits else []
    names: list[str | None] = list(fits)
    for text in identities:
        maps.append(SpanMap(parse_span(text)))
        names.append(None)
    return maps, names


@app.command()
def apply(
    store: Annotated[Path, typer.Argument(help="A store with fits (rba-store fit).")],
    out: Annotated[Path, typer.Option(help="Folder for the approximated model.")],
    fit_names: Annotated[
        list[str] | None, typer.Option("--fit", help="A saved fit to apply (repeatable).")
    ] = None,
    identity: Annotated[
        list[str] | None, typer.Option(help="a:b: drop these blocks (identity, repeatable).")
    ] = None,
) -> None:
    """Write the model with spans replaced by fitted maps: safetensors weights plus a recipe."""
    from rba_store.approx import count_parameters
    from rba_store.recipe import load_approximated, write_approximated

    _check_folder(out, "--out")
    maps, names = _span_maps(store, fit_names or [], identity or [])
    if not maps:
        raise UsageError(
            "nothing to apply; pass --fit NAME (see 'rba-store info') or --identity a:b"
        )
    write_approximated(store, maps, names, out)
    model = load_approximated(out)
    spans = ", ".join(f"{m.span[0]}:{m.span[1]}" for m in maps)
    typer.echo(
        f"wrote {out}/model.safetensors and {out}/recipe.json: spans {spans} replaced, "
        f"{count_parameters(model):,} parameters, {len(model.blocks)} modules in .blocks\n"
        "load it with: from rba_store.recipe import load_approximated; "
        f"model = load_approximated({str(out)!r})"
    )


@app.command()
def evaluate(
    store: StoreArg,
    fit_names: Annotated[
        list[str] | None, typer.Option("--fit", help="Evaluate this saved fit (repeatable).")
    ] = None,
    identity: Annotated[
        list[str] | None, typer.Option(help="a:b: evaluate dropping these blocks (repeatable).")
    ] = None,
    auto: Annotated[
        bool, typer.Option(help="Sweep: remove 1, 2, 3 ... blocks ranked by the statistics.")
    ] = False,
    max_blocks: Annotated[
        int | None, typer.Option(help="Most blocks --auto removes [all but one].")
    ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write the --auto plot here.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The model's weights file, if it has moved.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Test images per batch.")] = 256,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy, parameters, FLOPs and speed of the original and approximated models."""
    from rba_store.evaluate import (
        Variant,
        evaluate_variants,
        fit_variant,
        format_report,
        identity_variant,
        sweep_variants,
        write_sweep_plot,
    )
    from rba_store.solve.fit import parse_span

    _check_folder(plots, "--plots")

    variants: list[Variant] = []
    for name in fit_names or []:
        variants.append(fit_variant(store, [name]))
    for text in identity or []:
        variants.append(identity_variant([parse_span(text)]))
    if auto:
        for _, linear, ident in sweep_variants(store, max_blocks):
            variants += [linear, ident]
    if not variants:
        raise UsageError(
            f"nothing to evaluate in {str(store)!r}: pass --fit NAME, --identity a:b or --auto "
            "(fit maps first with 'rba-store fit')"
        )
    report = evaluate_variants(store, variants, checkpoint=checkpoint, batch_size=batch_size)
    plot = None
    if auto:
        plot = write_sweep_plot(report, (plots or Path("runs")) / "sweep.png", title=str(store))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(format_report(report))
    if auto:
        typer.echo("\n" + _sweep_summary(report))
    if plot:
        typer.echo(f"plot: {plot}")


def _sweep_summary(report: dict[str, Any]) -> str:
    rows = {v["name"]: v for v in report["variants"]}
    base = rows["original"]["accuracy"]

    def most(kind: str) -> int:
        ks = [int(n.split("-")[-1]) for n in rows if n.startswith(f"{kind} -")]
        ok = [k for k in sorted(ks) if rows[f"{kind} -{k}"]["accuracy"] >= base - 0.01]
        return max(ok, default=0)

    return (
        f"within 1 point of the original accuracy ({100 * base:.2f}%): "
        f"{most('linear')} blocks can be replaced by linear maps, "
        f"{most('identity')} dropped (identity)"
    )


@app.command()
def validate(
    store: StoreArg,
    as_json: JsonOpt = False,
) -> int:
    """Check the ledger against the data, the fingerprint, that shards decode, NaN/Inf."""
    from rba_store.validate import validate_store

    report = validate_store(store)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        state = "complete" if report["complete"] else "INCOMPLETE"
        typer.echo(
            f"{store}: {report['shards_complete']}/{report['n_shards']} shards complete "
            f"({state}), {report['shards_checked']} checked: "
            + ("no problem found" if report["ok"] else f"{len(report['problems'])} problem(s)")
        )
        for problem in report["problems"]:
            typer.echo(f"  - {problem}")
    return 0 if report["ok"] else EXIT_ERROR


def _check_folder(path: Path | None, flag: str) -> None:
    """Refuse an output folder that is an existing file, before any work is done."""
    if path is not None and path.exists() and not path.is_dir():
        raise UsageError(
            f"{flag} {str(path)!r} is a file; pass a folder (it is created when missing)"
        )


def _error(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"rba-store: error: {first}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises on bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("--verbose", "-v") for a in args)
    if verbose:  # accepted anywhere on the line, passed to the root callback
        args = ["--verbose", *(a for a in args if a not in ("--verbose", "-v"))]
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result: Any = app(args=args, prog_name="rba-store", standalone_mode=False)
    except TyperException as e:  # usage errors from parsing (typer's vendored click)
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # type: ignore[attr-defined]
            return EXIT_USAGE
        ctx = getattr(e, "ctx", None)
        hint = f" (see 'rba-store {ctx.info_name} --help')" if ctx and ctx.parent else ""
        message = e.format_message().replace(": Value error, ", ": ")  # typer's wording
        return _error(message + hint, EXIT_USAGE)
    except Interrupted as e:
        return _error(str(e), EXIT_INTERRUPTED)
    except (typer.Abort, KeyboardInterrupt):
        return _error(
            "interrupted; nothing stored was changed: re-run the same command", EXIT_INTERRUPTED
        )
    except (RBAStoreError, OSError) as e:
        if verbose:
            traceback.print_exc()
        return _error(describe_os_error(e) if isinstance(e, OSError) else str(e), EXIT_ERROR)
    except Exception as e:  # a bug: say so in one line, the traceback with --verbose
        if verbose:
            traceback.print_exc()
        return _error(
            f"internal error {type(e).__name__}: {e} (re-run with --verbose for the traceback "
            "and report it)",
            EXIT_ERROR,
        )
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
