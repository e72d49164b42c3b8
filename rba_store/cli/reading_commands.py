"""Commands that read a store the other ways: ``modularity`` (class separation per block) and
``probe`` (diffused redundancy of channels)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rba_store.cli.app import (
    AllowIncompleteOpt,
    Backend,
    CheckpointOpt,
    JsonOpt,
    LimitOpt,
    SampleOpt,
    SchedulerFileOpt,
    SchedulerOpt,
    StoreArg,
    app,
    check_folder,
)
from rba_store.cli.progress import dask_progress
from rba_store.errors import Interrupted


class ReadingTokens(str, Enum):
    cls = "cls"
    mean = "mean"


TokensOpt = Annotated[
    ReadingTokens,
    typer.Option(help="One vector per sample: the class token, or the mean of all tokens."),
]
PointsOpt = Annotated[
    str | None,
    typer.Option(help="Capture points to read, e.g. 0,6,12 (negatives from the end) [all]."),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of --sample.")]
NameOpt = Annotated[str | None, typer.Option(help="Save under this name [from the options].")]
PlotsOpt = Annotated[Path | None, typer.Option(help="Write a PNG figure into this folder.")]
BackendOpt = Annotated[
    Backend, typer.Option(help="Where the products run; auto: CuPy when a GPU is visible.")
]
OverwriteOpt = Annotated[bool, typer.Option(help="Recompute and replace a saved result.")]


def _interrupted() -> Interrupted:
    return Interrupted("interrupted: nothing was saved and the store is unchanged; re-run it")


@app.command()
def modularity(
    store: StoreArg,
    k: Annotated[
        int,
        typer.Option(
            "--k",
            help="Neighbours per sample in the k-NN graph (default 10: well below a class's "
            "size, so a separated class can keep all its edges inside).",
        ),
    ] = 10,
    tokens: TokensOpt = ReadingTokens.cls,
    limit: LimitOpt = None,
    sample: SampleOpt = None,
    seed: SeedOpt = 0,
    points: PointsOpt = None,
    plateau: Annotated[
        float,
        typer.Option(help="A step gaining less than this share of Q's whole range plateaus."),
    ] = 0.02,
    name: NameOpt = None,
    as_json: JsonOpt = False,
    plots: PlotsOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    backend: BackendOpt = Backend.auto,
    allow_incomplete: AllowIncompleteOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Modularity of the class partition of a k-NN graph at every capture point."""
    from rba_store.errors import UsageError
    from rba_store.readings.modularity import run_modularity
    from rba_store.store import SampleSelection, Store

    if not 0 <= plateau < 1:
        raise UsageError(f"--plateau {plateau} is out of range; pass a share in [0, 1)")
    check_folder(plots, "--plots")
    opened = Store.open(store)
    try:
        with dask_progress("modularity"):
            curve, reused = run_modularity(
                opened,
                k=k,
                tokens=tokens.value,
                selection=SampleSelection(limit=limit, sample=sample, seed=seed),
                points=points,
                name=name,
                allow_incomplete=allow_incomplete,
                scheduler=scheduler,
                scheduler_file=str(scheduler_file) if scheduler_file else None,
                backend=backend.value,
                overwrite=overwrite,
            )
    except KeyboardInterrupt:
        raise _interrupted() from None
    curve.plateau = plateau
    written = []
    if plots is not None:
        from rba_store.readings.plots import write_modularity_plot

        written.append(write_modularity_plot(curve, plots))
    if as_json:
        typer.echo(json.dumps(curve.to_json(), indent=2))
        return
    saved = "reused the saved" if reused else "saved as"
    typer.echo(
        f"{store}: {curve.n_samples} labelled samples, {curve.k}-NN graph by cosine, "
        f"tokens={curve.attrs['tokens']}; {saved} modularity/{curve.attrs['name']}\n"
    )
    typer.echo(curve.format_table())
    for path in written:
        typer.echo(f"plot: {path}")


@app.command()
def probe(
    store: StoreArg,
    tokens: TokensOpt = ReadingTokens.cls,
    fractions: Annotated[
        str | None,
        typer.Option(
            help="Fractions of the channels, in (0, 1], e.g. 0.01,0.1,1 or 1%,10%,100% "
            "[0.01,0.02,0.05,0.1,0.2,0.5,1]."
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="Random subsets and projections per fraction (seeds 0..N-1).")
    ] = 3,
    ridge: Annotated[float, typer.Option(help="Ridge λ of the probes, scaled by trace/m.")] = 1e-3,
    delta: Annotated[
        float, typer.Option(help="Critical mass: within this many points of the full layer.")
    ] = 1.0,
    eval_store: Annotated[
        Path | None,
        typer.Option(help="Score on this store (same model) [the data's validation split]."),
    ] = None,
    limit: LimitOpt = None,
    sample: SampleOpt = None,
    seed: SeedOpt = 0,
    points: PointsOpt = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
    plots: PlotsOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    backend: BackendOpt = Backend.auto,
    checkpoint: CheckpointOpt = None,
    allow_incomplete: AllowIncompleteOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Diffused redundancy: ridge probes on random channel subsets, principal components and
    random projections, all from one pass of joint moments; critical mass per point."""
    from rba_store.readings.probe import run_probe
    from rba_store.store import SampleSelection, Store

    check_folder(plots, "--plots")
    opened = Store.open(store)
    try:
        with dask_progress("probe"):
            result, how = run_probe(
                opened,
                tokens=tokens.value,
                selection=SampleSelection(limit=limit, sample=sample, seed=seed),
                points=points,
                fractions=fractions,
                seeds=seeds,
                ridge=ridge,
                delta=delta,
                eval_store=eval_store,
                name=name,
                allow_incomplete=allow_incomplete,
                scheduler=scheduler,
                scheduler_file=str(scheduler_file) if scheduler_file else None,
                backend=backend.value,
                checkpoint=checkpoint,
                overwrite=overwrite,
            )
    except KeyboardInterrupt:
        raise _interrupted() from None
    written = []
    if plots is not None:
        from rba_store.readings.plots import write_probe_plot

        written.append(write_probe_plot(result, plots))
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    source = result.attrs["eval"]
    scored = (
        "the validation split" if source["kind"] == "val" else f"--eval-store {source['store']}"
    )
    said = {
        "computed": "saved as",
        "reused": "reused the saved",
        "moments reused": "training moments reused from (not read again), curves saved in",
    }[how]
    typer.echo(
        f"{store}: probes on {result.attrs['n_samples']} training samples' moments, scored on "
        f"{result.attrs['n_eval']} samples of {scored}; ridge {result.attrs['ridge']:g}, "
        f"tokens={result.attrs['tokens']}; {said} probe/{result.attrs['name']}\n"
    )
    typer.echo(result.format_table())
    for path in written:
        typer.echo(f"plot: {path}")
