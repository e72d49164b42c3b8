"""Commands that write or describe a store: ``extract``, ``info``, ``validate``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from rba_store.cli.app import (
    EXIT_ERROR,
    Codec,
    DType,
    JsonOpt,
    StoreArg,
    app,
)
from rba_store.cli.dry_run_report import dry_run_report, note_limit
from rba_store.cli.progress import ProgressBar
from rba_store.errors import Interrupted, UsageError


def _default_out(model: str | None, data: str, split: str | None) -> Path:
    from rba_store.extract.default_lm import is_default_lm
    from rba_store.extract.default_model import MODEL_NAME

    # The embedded language model reads its own corpus when --data is left at its default.
    corpus = None if is_default_lm(model) and data == "digits" else Path(data).stem
    name = Path(model).name if model else MODEL_NAME
    stem = "_".join(x for x in (name, corpus, split) if x)
    return Path("runs") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) + ".zarr")


@app.command()
def extract(
    model: Annotated[
        str | None,
        typer.Option(
            help="timm model name, or a folder with a Hugging Face causal LM (config.json, "
            "weights, tokenizer); the embedded default when omitted."
        ),
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="'digits', an image folder, or a .npz file with an array 'x'; for a language "
            "model: a .txt file, a folder of text files, or a .jsonl file with 'text'."
        ),
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
        str | None, typer.Option(help="Data split: train/val/test (digits), a sub-folder name.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N samples.")] = None,
    tokens: Annotated[
        str,
        typer.Option(
            help="Store all tokens; cls: the class token only (vision); last: the last position "
            "of each window (language); random:K: the prefix tokens plus K others drawn per "
            "sample (seeded by its index).",
            metavar="all|cls|last|random:K",
        ),
    ] = "all",
    seq_len: Annotated[
        int | None,
        typer.Option(
            help="Language models: tokens per window [min(256, the model's context)].",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Stored dtype.")] = DType.float32,
    codec: Annotated[Codec, typer.Option(help="Compression codec (lossless).")] = Codec.blosc_lz4,
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
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Also compute the statistics and joint moments during the pass (saved as "
            "'rba-store stats' would).",
        ),
    ] = False,
    no_activations: Annotated[
        bool,
        typer.Option(
            "--no-activations", help="With --stats: keep only the statistics, not the h arrays."
        ),
    ] = False,
    mlp_outputs: Annotated[
        bool,
        typer.Option(
            "--mlp-outputs",
            help="Also store each block's MLP output (m1..mL, L more arrays): 'stats' then "
            "keeps their joint moments, so 'fit --fold' solves from them (--from moments).",
        ),
    ] = False,
    points: Annotated[
        str | None,
        typer.Option(
            help="Store only these capture points, e.g. 0,4,8,12 (h0, h4, ...; -1: the last): "
            "fits and statistics then cover spans between them.",
            metavar="LIST",
            show_default=False,
        ),
    ] = None,
    holdout: Annotated[
        float | None,
        typer.Option(
            help="With --stats: keep the joint moments of this fraction of the samples apart "
            "(as 'stats --holdout'), for 'fit --holdout' to report held-out error from them."
        ),
    ] = None,
    holdout_seed: Annotated[
        int, typer.Option(help="Seed of --holdout (the --seed that fit --holdout takes).")
    ] = 0,
    checkpoint_every: Annotated[
        float,
        typer.Option(
            help="With --stats: save this worker's partial statistics in the store at least "
            "this often (seconds; also at the end and on Ctrl-C), so a killed run resumes."
        ),
    ] = 60.0,
    skip_unreadable: Annotated[
        bool,
        typer.Option(help="Leave out images that cannot be read (recorded in the store)."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Print the store's size on disk (compression measured on a few samples), the "
            "free disk and the peak memory; write nothing."
        ),
    ] = False,
    plan_samples: Annotated[
        int | None,
        typer.Option(
            help="With --dry-run: plan for N samples, however many the data holds now (e.g. "
            "the full data set before it is copied here).",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing store made with another configuration.")
    ] = False,
) -> None:
    """Run a model over a data set and store the residual stream after every block."""
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
    from rba_store.store import Store

    options = ExtractOptions(
        model=model,
        checkpoint=checkpoint,
        pretrained=pretrained,
        data=data,
        split=split,
        limit=limit,
        tokens=tokens,
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
        skip_unreadable=skip_unreadable,
        stats=stats,
        store_activations=not no_activations,
        stats_holdout=holdout,
        stats_holdout_seed=holdout_seed,
        seq_len=seq_len,
        checkpoint_every=checkpoint_every,
        mlp_outputs=mlp_outputs,
        points=points,
    )
    if plan_samples is not None and (not dry_run or plan_samples < 1):
        raise UsageError(
            f"--plan-samples {plan_samples} is invalid; pass a positive number of samples"
            if dry_run
            else "--plan-samples only plans: add --dry-run (to extract at most N samples, use "
            "--limit N)"
        )
    out = out or _default_out(model, data, split)
    check_store_out(out)
    plan = plan_extraction(options, count_only=dry_run)
    note_limit(limit, plan.layout.n_samples, dry_run)
    if plan.random_weights:  # at the start, and again at the end of a long run
        _warn_random_weights(plan)
    layout = plan.layout
    point = layout.points[0]
    shape = f"{layout.n_samples} x {point.n_tokens} tokens x {point.n_channels} channels"
    if dry_run:
        typer.echo(dry_run_report(plan, out, plan_samples))
        return
    # Progress counts this worker's share of the store (all of it with one worker).
    mine = [s for s in range(layout.n_shards) if s % num_workers == worker_index]
    total = sum(b - a for a, b in map(layout.shard_rows, mine))
    done = shards_before = 0
    if Store.exists(out) and not overwrite:
        done_mask = Store.open(out).completed_shards()
        shards_before = int(done_mask.sum())
        done = sum(
            b - a
            for i, (a, b) in ((s, layout.shard_rows(s)) for s in mine)
            if i < len(done_mask) and done_mask[i]
        )
    if options.store_activations:
        _warn_disk(layout, Path(out), total - done)
    try:
        with ProgressBar(total, done, "extract") as bar:
            result = run_extraction(plan, out, overwrite=overwrite, progress=bar)
    except KeyboardInterrupt:
        kept = int(Store.open(out).completed_shards().sum()) if Store.exists(out) else 0
        raise Interrupted(
            f"interrupted: {kept}/{layout.n_shards} shards of {str(out)!r} are complete and "
            "kept"
            + (", the statistics of the shards folded so far saved" if stats else "")
            + "; re-run the same command to resume"
        ) from None
    from rba_store.store.info import size_text, store_info

    info = store_info(out)
    rate = result.samples_written / result.seconds if result.seconds > 0 else 0.0
    complete = info["complete"]
    if result.resumed and result.shards_written == 0 and complete:
        head = f"{out} is already complete ({layout.n_shards} shards); nothing to do"
    else:
        resumed = (
            f" (resumed: {shards_before} of {layout.n_shards} shards were already complete)"
            if result.resumed and shards_before
            else ""
        )
        if not complete:
            resumed += (
                f"; {info['shards_complete']}/{layout.n_shards} shards complete so far "
                "(other workers fill the rest)"
            )
        unit = "windows" if plan.loaded.family == "language" else "img"
        head = (
            f"extracted {result.samples_written} samples in {result.seconds:.1f} s "
            f"({rate:,.0f} {unit}/s) into {out}{resumed}"
        )
    if plan.random_weights:
        _warn_random_weights(plan)
    ratio = info["compression_ratio"]
    stored = (
        layout.points_label()
        + (f" and m1..m{layout.n_blocks}" if layout.mlp_points else "")
        + f": {shape}, {layout.dtype}; stored "
        if not no_activations
        else f"no activations stored (--no-activations): statistics only, saved analyses "
        f"{size_text(info['bytes_analyses'])}; features, labels and ids: stored "
    )
    lines = [
        head,
        f"  {stored}{size_text(info['bytes_stored'])} of {size_text(info['bytes_raw'])} raw"
        + (f" (ratio {ratio:.3f})" if ratio else ""),
    ]
    skipped = plan.description["data"].get("skipped_unreadable") or []
    if skipped:
        shown = ", ".join(skipped[:_SKIPPED_SHOWN])
        more = len(skipped) - _SKIPPED_SHOWN
        lines.append(
            f"  skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}: "
            + shown
            + (
                f" and {more} more (all in 'rba-store info --json': data.skipped_unreadable)"
                if more > 0
                else ""
            )
        )
    typer.echo("\n".join(lines))


_SKIPPED_SHOWN = 20


def check_store_out(out: Path) -> None:
    """Refuse, before any work, an --out that is neither a store nor absent nor an empty folder
    (extract never deletes or writes into anything else, with or without --overwrite)."""
    from rba_store.store import Store

    if not out.exists() or Store.exists(out) or (out.is_dir() and not any(out.iterdir())):
        return
    what = "a file" if not out.is_dir() else "a folder that is not an rba-store store"
    raise UsageError(
        f"--out {str(out)!r} is {what}; choose a new path for the store (it is left "
        "untouched, with or without --overwrite)"
    )


def _warn_disk(layout: Any, out: Path, samples: int) -> None:
    """Warn, before any work, when the activations still to write exceed the free disk."""
    from rba_store.extract.dry_run import free_disk
    from rba_store.store.info import size_text

    needed = samples * layout.sample_bytes()
    free, where = free_disk(out)
    if free is not None and needed > free:
        typer.echo(
            f"rba-store: warning: the activations still to write take {size_text(needed)} "
            f"uncompressed and {size_text(free)} is free at {where}; float activations compress "
            "little ('extract --dry-run' measures it): free some space or use --dtype float16, "
            "--tokens random:K or --points (an interrupted run resumes)",
            err=True,
        )


def _warn_random_weights(plan: Any) -> None:
    typer.echo(
        f"rba-store: warning: {plan.loaded.name} has random weights (no --checkpoint or "
        "--pretrained); they are kept in the store so that evaluate and apply rebuild them",
        err=True,
    )


@app.command()
def info(
    store: StoreArg,
    as_json: JsonOpt = False,
) -> None:
    """Shapes, dtype, codec, bytes stored vs raw, completeness and provenance of a store."""
    from rba_store.store import Store
    from rba_store.store.info import format_info, store_info

    summary = store_info(Store.open(store))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@app.command()
def validate(
    store: StoreArg,
    as_json: JsonOpt = False,
) -> int:
    """Check the ledger against the data, the fingerprint, that shards decode, NaN/Inf."""
    from rba_store.store import Store
    from rba_store.store.validate import validate_store

    report = validate_store(Store.open(store))
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
