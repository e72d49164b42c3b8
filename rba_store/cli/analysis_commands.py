"""Commands that analyse a store: ``stats`` (block statistics) and ``fit`` (the maps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rba_store.cli.app import (
    AllowIncompleteOpt,
    Backend,
    CkaPairs,
    Gemm,
    HoldoutOpt,
    JsonOpt,
    LimitOpt,
    SampleOpt,
    SchedulerFileOpt,
    SchedulerOpt,
    Source,
    StoreArg,
    TokensOpt,
    app,
    check_folder,
)
from rba_store.cli.progress import dask_progress
from rba_store.errors import Interrupted, UsageError


@app.command()
def stats(
    store: StoreArg,
    tokens: TokensOpt = None,
    limit: LimitOpt = None,
    sample: SampleOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample and --holdout.")] = 0,
    holdout: Annotated[
        float | None,
        typer.Option(
            help="Keep the joint moments of this fraction of the samples apart, so that "
            "'fit --holdout' with the same --seed reports held-out error from them."
        ),
    ] = None,
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
    backend: Annotated[
        Backend, typer.Option(help="Where the co-moment product runs; auto: CuPy with a GPU.")
    ] = Backend.auto,
    max_span: Annotated[
        int,
        typer.Option(
            help="Longest span (blocks) to rank; the joint moments of spans up to it are kept "
            "(the band: what fit and select use)."
        ),
    ] = 4,
    cka_pairs: Annotated[
        CkaPairs,
        typer.Option(
            help="Pairs of points with CKA. band: those within --max-span (memory O(L·S·D²)); "
            "all: every pair, in one pass when all joint moments fit in memory, else with "
            "further passes over the store; auto: all when one partial of all joint moments is "
            "at most 1 GiB (ViT-B at 224 px and smaller), else band."
        ),
    ] = CkaPairs.auto,
    dry_run: Annotated[
        bool,
        typer.Option(help="Print what the pass will keep and take in memory; compute nothing."),
    ] = False,
    top: Annotated[int, typer.Option(help="Number of candidate spans to show.")] = 10,
) -> None:
    """Block Redundancy, relative change, cosine and CKA of every block; candidate spans."""
    from rba_store.stats import SampleSelection, prepare_stats, run_stats
    from rba_store.store import Store

    if max_span < 1 or top < 1:
        raise UsageError(f"--max-span {max_span} and --top {top} must be positive numbers")
    check_folder(plots, "--plots")
    opened = Store.open(store)
    chosen_tokens = tokens.value if tokens else opened.description["tokens"]
    selection = SampleSelection(limit=limit, sample=sample, seed=seed)
    # Reuse or plan (refusing, in one line, what does not fit in memory) before any work.
    prepared = prepare_stats(
        opened,
        name=name,
        tokens=chosen_tokens,
        selection=selection,
        allow_incomplete=allow_incomplete,
        overwrite=overwrite,
        cka=cka,
        holdout=holdout,
        holdout_seed=seed,
        max_span=max_span,
        cka_pairs=cka_pairs.value,
    )
    if dry_run:
        if prepared.plan is None:
            typer.echo(
                f"{store}: stats/{prepared.name} is saved and would be reused: nothing to do"
            )
        else:
            typer.echo(
                f"{store}: stats/{prepared.name} would be computed from {prepared.plan.describe()}"
            )
        return
    try:
        with dask_progress("stats"):
            result, reused = run_stats(
                opened,
                tokens=chosen_tokens,
                selection=selection,
                allow_incomplete=allow_incomplete,
                scheduler=scheduler,
                scheduler_file=str(scheduler_file) if scheduler_file else None,
                cka=cka,
                backend=backend.value,
                holdout=holdout,
                holdout_seed=seed,
                prepared=prepared,
            )
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted: no statistics were saved and the store is unchanged; re-run the same "
            "command"
        ) from None
    written = []
    if plots is not None:
        from rba_store.stats.plots import write_plots

        written = write_plots(result, plots, title=Path(store).name)
    if as_json:
        typer.echo(json.dumps(result.to_json(max_span, top), indent=2))
        return
    saved = "reused the saved" if reused else "saved as"
    typer.echo(
        f"{store}: "
        + (
            f"{result.n_blocks} spans between {len(result.labels)} stored points"
            if result.some_points
            else f"{result.n_blocks} blocks"
        )
        + f", {result.n_samples} samples, "
        f"{result.n_rows} token vectors (tokens={chosen_tokens}); {saved} "
        f"stats/{result.attrs.get('name')}\n"
    )
    split = result.attrs.get("holdout")
    if split and result.heldout is not None:
        typer.echo(
            f"joint moments of the held-out samples ({result.heldout.n:,} token vectors) kept "
            f"apart: 'fit --holdout {split['fraction']:g} --seed {split['seed']}' reports "
            "held-out error from them\n"
        )
    typer.echo(result.format_table(max_span, top))
    for path in written:
        typer.echo(f"plot: {path}")


def _auto_spans(store: Any, count: int, tokens: str, stats_name: str | None) -> list[tuple]:
    from rba_store.stats import BlockStats
    from rba_store.store import STATS

    name = stats_name or f"tokens-{tokens.replace(':', '')}"
    saved = store.read_analysis(STATS, name)
    if saved is None:
        raise UsageError(
            f"--auto needs saved statistics, and {str(store)!r} has no stats/{name}; run "
            f"'rba-store stats {store} --tokens {tokens}' first (or pass --stats NAME)"
        )
    candidates = BlockStats.from_dataset(saved).candidates(top=count)
    return [tuple(c["span"]) for c in candidates]


def _maybe(value: float | None, spec: str = ".4f") -> str:
    """A diagnostic's value, or — when it was not computed (None or NaN)."""
    return "—" if value is None or value != value else format(value, spec)


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
    source = d.get("source") or {}
    if source.get("kind") == "moments":
        lines.append(
            f"  solved from the joint moments saved with stats/{source['stats']} (same rows; the "
            "activations were not read)"
        )
    held = d.get("heldout")
    if held:
        ident = held["identity"]
        where = held.get("source", {})
        came = (
            f"from the moments in stats/{where['stats']}"
            if where.get("from") == "moments"
            else f"{held['rows']:,} rows"
        )
        lines.append(
            f"  held-out relative MSE {held['relative_mse']:.4g}  R² {held['r2']:.4f}  "
            f"cosine {_maybe(held['cosine'])}   ({came})"
        )
        lines.append(
            f"  identity relative MSE {_maybe(ident['relative_mse'], '.4g')}  R² "
            f"{_maybe(ident['r2'])}  cosine {_maybe(ident['cosine'])}   (T = I: plain block "
            "dropping)"
        )
        if where.get("from") == "moments":
            lines.append(
                "  (cosines are per row, not in the moments: --from activations streams them)"
            )
    else:
        lines.append("  held-out: none (pass --holdout FRACTION or --eval-store STORE)")
    lines += [f"  note: {note}" for note in d["notes"]]
    lines.append(
        f"  reused the saved fits/{fit.name} (same span, options and store; --overwrite recomputes)"
        if fit.reused
        else f"  saved as fits/{fit.name}"
    )
    return "\n".join(lines)


@app.command()
def fit(
    store: StoreArg,
    span: Annotated[
        list[str] | None,
        typer.Option(help="a:b fits h_a -> h_b (replaces blocks a+1..b).", metavar="A:B"),
    ] = None,
    auto: Annotated[
        int | None, typer.Option(help="Fit the best K candidate spans of the saved stats.")
    ] = None,
    stats_name: Annotated[
        str | None, typer.Option("--stats", help="Saved stats for --auto [tokens-<tokens>].")
    ] = None,
    tokens: TokensOpt = None,
    limit: LimitOpt = None,
    sample: SampleOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample and --holdout.")] = 0,
    holdout: HoldoutOpt = None,
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
    source: Annotated[
        Source,
        typer.Option(
            "--from",
            help="auto: solve from saved statistics' joint moments when they cover the rows, "
            "else stream the activations; moments: never read the activations; activations: "
            "always stream them.",
        ),
    ] = Source.auto,
    fold: Annotated[
        bool,
        typer.Option(
            help="Fit maps to fold into the weights: X = block a's MLP output, Y = h_b - r_a "
            "(recomputed from h(a-1)); 'apply --fold' writes the smaller standard model."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit the linear maps T (h_a -> h_b) that replace spans of blocks, in one pass."""
    from rba_store.solve import FitOptions, export_safetensors, fit_spans
    from rba_store.solve.fit import parse_span
    from rba_store.store import Store
    from rba_store.store.selection import SampleSelection

    spans = [parse_span(s) for s in span or []]
    if auto is not None and auto < 1:
        raise UsageError(f"--auto {auto} is invalid; pass a positive number of spans")
    opened = Store.open(store, "r+")
    chosen_tokens = tokens.value if tokens else opened.description["tokens"]
    if auto is not None:
        spans += _auto_spans(opened, auto, chosen_tokens, stats_name)
    options = FitOptions(
        spans=tuple(spans),
        tokens=chosen_tokens,
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
        source=source.value,
        fold=fold,
    )
    try:
        with dask_progress("fit"):
            fits = fit_spans(opened, options)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: the partial sums are saved in {str(checkpoint)!r}; re-run the same "
            "command to resume"
            if checkpoint
            else "interrupted: nothing was saved; re-run the command (with --checkpoint FILE a "
            "long fit can resume where it stopped)"
        ) from None
    exported = (
        [export_safetensors(opened, f.name, export / f"{f.name}.safetensors") for f in fits]
        if export
        else []
    )
    if as_json:
        typer.echo(json.dumps([f.to_json() for f in fits], indent=2))
        return
    if opened.layout.some_points:
        typer.echo(
            f"the store keeps {opened.layout.points_label()} (extract --points): spans between "
            "stored points only"
        )
    typer.echo("\n".join(_format_fit(f) for f in fits))
    for path in exported:
        typer.echo(f"exported {path}")
