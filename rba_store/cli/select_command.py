"""``rba-store select``: which spans can go, chosen greedily on the validation split."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from rba_store.cli.app import (
    CheckpointOpt,
    Classifier,
    ClassifierOpt,
    JsonOpt,
    StoreArg,
    TimeBudgetOpt,
    app,
    check_folder,
    check_output_file,
)
from rba_store.cli.progress import WorkProgress, dask_progress
from rba_store.errors import Interrupted


class Maps(str, Enum):
    linear = "linear"
    identity = "identity"
    both = "both"


class CandidatesBy(str, Enum):
    statistics = "statistics"
    modularity = "modularity"


class RankBy(str, Enum):
    agreement = "agreement"
    accuracy = "accuracy"


@app.command()
def select(
    store: StoreArg,
    max_drop: Annotated[
        float, typer.Option(help="Stop before validation accuracy falls more points than this.")
    ] = 1.0,
    max_ppl_increase: Annotated[
        float | None,
        typer.Option(
            help="Language models: also stop before validation perplexity rises more than this "
            "fraction above the original's (0.05: 5%).",
            show_default=False,
        ),
    ] = None,
    max_blocks: Annotated[int | None, typer.Option(help="Remove at most this many blocks.")] = None,
    max_span: Annotated[int, typer.Option(help="Longest span (blocks) one map replaces.")] = 2,
    candidates: Annotated[
        int | None, typer.Option(help="Try only the best K spans by the statistics [all].")
    ] = None,
    candidates_by: Annotated[
        CandidatesBy,
        typer.Option(help="Rank --candidates by the statistics or by the modularity curve."),
    ] = CandidatesBy.statistics,
    maps: Annotated[Maps, typer.Option(help="What replaces a span.")] = Maps.linear,
    rank_by: Annotated[
        RankBy,
        typer.Option(help="Keep the candidate with the best validation agreement or accuracy."),
    ] = RankBy.agreement,
    refit: Annotated[
        bool, typer.Option(help="Fit each next map on the network with earlier spans replaced.")
    ] = False,
    name: Annotated[str, typer.Option(help="Name of the selection (and of re-fitted maps).")] = (
        "select"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Selection file for 'apply --selection' [STORE.NAME.json].")
    ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write select.png into this folder.")] = None,
    checkpoint: CheckpointOpt = None,
    classifier: ClassifierOpt = Classifier.auto,
    batch_size: Annotated[int, typer.Option(help="Validation images per batch.")] = 256,
    fold: Annotated[
        bool,
        typer.Option(
            help="Score candidates with folded maps (fits/a-b-fold, fitted where missing); "
            "'apply --selection FILE --fold' writes the smaller standard model."
        ),
    ] = False,
    time_budget: TimeBudgetOpt = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Greedy span selection on the validation split; test accuracy, size and speed of the path."""
    from rba_store.approx.select import SelectOptions, evaluate_path, select_spans, to_json
    from rba_store.approx.selection_io import write_selection, write_selection_plot
    from rba_store.store import Store, analysis_path

    check_folder(plots, "--plots")
    check_output_file(out, "--out")
    analysis_path("fits", name)  # a valid name, before any work
    opened = Store.open(store)
    options = SelectOptions(
        max_drop=max_drop,
        max_ppl_increase=max_ppl_increase,
        max_blocks=max_blocks,
        max_span=max_span,
        candidates=candidates,
        candidates_by=candidates_by.value,
        maps=maps.value,
        refit=refit,
        rank_by=rank_by.value,
        classifier=classifier.value,
        batch_size=batch_size,
        name=name,
        fold=fold,
        time_budget=time_budget,
    )
    try:
        with dask_progress("select: statistics and fits"), WorkProgress("select") as progress:
            selection = select_spans(opened, options, checkpoint, progress)
        with WorkProgress("select: test split:") as progress:
            report = evaluate_path(opened, selection, checkpoint, progress)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted: no selection was written (maps fitted so far are kept as fits/a-b "
            "and reused); re-run the same command"
        ) from None
    out = out or Path(store).with_name(f"{Path(store).stem}.{name}.json")
    written = write_selection(opened, selection, report, out)
    plot = None
    if plots is not None:
        plot = write_selection_plot(selection, report, plots / "select.png", title=str(store))
    if as_json:
        typer.echo(
            json.dumps(to_json(selection) | {"test": report, "file": str(written)}, indent=2)
        )
        return
    typer.echo(_format(selection, report))
    fold_flag = " --fold" if fold else ""
    typer.echo(
        f"saved {written} (apply it with: rba-store apply {store} --selection {written}"
        f"{fold_flag} --out MODEL_DIR)"
    )
    if plot:
        typer.echo(f"plot: {plot}")


def _format(selection: Any, report: dict[str, Any]) -> str:
    from rba_store.approx.evaluate import format_rate

    if report.get("task") == "language":
        return _format_language(selection, report)
    rows = {v["name"]: v for v in report["variants"]}
    original = rows["original"]
    lines = [
        f"greedy selection on {selection.val_samples} validation images "
        f"(original {100 * selection.original_val_accuracy:.2f}%); "
        f"test: {report['test_samples']} images, {report['classifier']}",
        f"{'step':>4} {'span':>6} {'map':<9} {'removed':>7} {'val acc':>8} {'val agree':>9} "
        f"{'test acc':>8} {'identity':>8} {'params':>9} {'MFLOPs':>7} {'img/s':>7}",
        f"{0:>4} {'-':>6} {'-':<9} {0:>7} {100 * selection.original_val_accuracy:>7.2f}% "
        f"{100.0:>8.1f}% {100 * original['accuracy']:>7.2f}% {'':>8} {original['params']:>9,} "
        f"{original['flops'] / 1e6:>7.2f} {format_rate(original['images_per_s']):>7}",
    ]
    for i, step in enumerate(selection.steps, start=1):
        row = rows[f"selected -{step.blocks_removed}"]
        ident = rows.get(f"identity -{step.blocks_removed}")
        ident_acc = f"{100 * ident['accuracy']:>7.2f}%" if ident else f"{'-':>8}"
        lines.append(
            f"{i:>4} {f'{step.span[0]}:{step.span[1]}':>6} {step.kind:<9} {step.blocks_removed:>7} "
            f"{100 * step.val_accuracy:>7.2f}% {100 * step.val_agreement:>8.1f}% "
            f"{100 * row['accuracy']:>7.2f}% {ident_acc} {row['params']:>9,} "
            f"{row['flops'] / 1e6:>7.2f} {format_rate(row['images_per_s']):>7}"
        )
    lines.append(f"stopped: {selection.stop_reason}")
    lines.append(f"img/s: {report['timing']['how']}")
    return "\n".join(lines)


def _format_language(selection: Any, report: dict[str, Any]) -> str:
    from rba_store.approx.evaluate import format_rate

    rows = {v["name"]: v for v in report["variants"]}
    original = rows["original"]
    lines = [
        f"greedy selection on {selection.val_samples} validation windows (original next-token "
        f"accuracy {100 * selection.original_val_accuracy:.2f}%, perplexity "
        f"{selection.original_val_perplexity:.4g}); test: {report['test_windows']} windows",
        f"{'step':>4} {'span':>6} {'map':<9} {'removed':>7} {'val acc':>8} {'val ppl':>9} "
        f"{'test acc':>8} {'test ppl':>9} {'ident ppl':>9} {'params':>11} {'tok/s':>9}",
        f"{0:>4} {'-':>6} {'-':<9} {0:>7} {100 * selection.original_val_accuracy:>7.2f}% "
        f"{selection.original_val_perplexity:>9.4g} {100 * original['accuracy']:>7.2f}% "
        f"{original['perplexity']:>9.4g} {'':>9} {original['params']:>11,} "
        f"{format_rate(original['tokens_per_s']):>9}",
    ]
    for i, step in enumerate(selection.steps, start=1):
        row = rows[f"selected -{step.blocks_removed}"]
        ident = rows.get(f"identity -{step.blocks_removed}")
        ident_ppl = f"{ident['perplexity']:>9.4g}" if ident else f"{'-':>9}"
        lines.append(
            f"{i:>4} {f'{step.span[0]}:{step.span[1]}':>6} {step.kind:<9} {step.blocks_removed:>7} "
            f"{100 * step.val_accuracy:>7.2f}% {step.val_perplexity:>9.4g} "
            f"{100 * row['accuracy']:>7.2f}% {row['perplexity']:>9.4g} {ident_ppl} "
            f"{row['params']:>11,} {format_rate(row['tokens_per_s']):>9}"
        )
    lines.append(f"stopped: {selection.stop_reason}")
    lines.append(f"tok/s: {report['timing']['how']}")
    return "\n".join(lines)
