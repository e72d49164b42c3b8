"""Commands that make and measure the smaller model: ``apply`` and ``evaluate``."""

from __future__ import annotations

import json
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
)
from rba_store.cli.progress import WorkProgress, dask_progress
from rba_store.errors import Interrupted, UsageError


def _span_maps(store: Any, fits: list[str], identities: list[str]) -> tuple[list, list]:
    """SpanMaps (and their fit names, None for the identity) from --fit and --identity."""
    from rba_store.approx import SpanMap
    from rba_store.approx.evaluate import fit_variant
    from rba_store.solve.fit import parse_span

    maps = list(fit_variant(store, fits).maps) if fits else []
    names: list[str | None] = list(fits)
    for text in identities:
        maps.append(SpanMap(parse_span(text)))
        names.append(None)
    return maps, names


def _selection_maps(store: Any, path: Path) -> list:
    """The maps of a saved selection, exactly as ``apply --selection`` builds them."""
    from rba_store.approx.selection_io import read_selection

    return _span_maps(store, *read_selection(path, store))[0]


@app.command()
def apply(
    store: Annotated[
        Path, typer.Argument(help="A store with fits (rba-store fit).", metavar="STORE")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the approximated model.")],
    fit_names: Annotated[
        list[str] | None,
        typer.Option("--fit", help="A saved fit to apply (repeatable).", metavar="NAME"),
    ] = None,
    identity: Annotated[
        list[str] | None,
        typer.Option(help="a:b: drop these blocks (identity, repeatable).", metavar="A:B"),
    ] = None,
    selection: Annotated[
        Path | None, typer.Option(help="The spans a 'rba-store select' chose (its JSON file).")
    ] = None,
    checkpoint: CheckpointOpt = None,
    classifier: ClassifierOpt = Classifier.auto,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a model written before by 'rba-store apply' in --out.")
    ] = False,
    fold: Annotated[
        bool,
        typer.Option(
            help="Fold the maps (fits made with 'fit --fold') into the weights: the model's own "
            "architecture with fewer blocks, config.json + model.safetensors, loadable without "
            "rba-store."
        ),
    ] = False,
) -> None:
    """Write the model with spans replaced by fitted maps: safetensors weights plus a recipe."""
    from rba_store.approx import count_parameters
    from rba_store.approx.evaluate import choose_classifier
    from rba_store.approx.recipe import check_model_out, load_approximated, write_approximated
    from rba_store.store import Store

    check_folder(out, "--out")
    check_model_out(out, overwrite)
    opened = Store.open(store)
    fit_names, identity = list(fit_names or []), list(identity or [])
    if selection is not None:
        from rba_store.approx.selection_io import read_selection

        chosen_fits, chosen_identities = read_selection(selection, opened)
        fit_names += chosen_fits
        identity += chosen_identities
    maps, names = _span_maps(opened, fit_names, identity)  # what evaluate --combine measures
    if not maps:
        raise UsageError(
            "nothing to apply; pass --fit NAME (see 'rba-store info'), --identity a:b or "
            "--selection FILE"
        )
    folded = [n for m, n in zip(maps, names, strict=True) if m.folded]
    if folded and not fold:
        raise UsageError(
            f"fit {folded[0]!r} was made with --fold (it maps block "
            f"{maps[names.index(folded[0])].span[0]}'s MLP output): add --fold"
        )
    language = opened.description["model"].get("family") == "language"
    head = None if language else choose_classifier(opened, classifier.value)
    write_approximated(opened, maps, names, out, checkpoint=checkpoint, classifier=head, fold=fold)
    model = load_approximated(out)
    spans = ", ".join(f"{m.span[0]}:{m.span[1]}" for m in maps)
    kept = (
        f"{model.config.num_hidden_layers} decoder layers (tokenizer saved beside)"
        if language
        else f"{len(model.blocks)} modules in .blocks"
    )
    if fold:
        load = (
            f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
            if language
            else "timm.models.vision_transformer.VisionTransformer(**json.load(open("
            f"{str(out / 'config.json')!r}))['kwargs']) then load_state_dict("
            f"safetensors.torch.load_file({str(out / 'model.safetensors')!r}))"
        )
        typer.echo(
            f"wrote {out}/model.safetensors, {out}/config.json and {out}/recipe.json: spans "
            f"{spans} folded, {count_parameters(model):,} parameters, "
            f"{len(model.blocks) if not language else model.config.num_hidden_layers} blocks\n"
            f"load it without rba-store: {load}"
        )
        return
    typer.echo(
        f"wrote {out}/model.safetensors and {out}/recipe.json: spans {spans} replaced, "
        f"{count_parameters(model):,} parameters, {kept}\n"
        "load it with: from rba_store.approx.recipe import load_approximated; "
        f"model = load_approximated({str(out)!r})"
    )


@app.command()
def evaluate(
    store: StoreArg,
    fit_names: Annotated[
        list[str] | None,
        typer.Option("--fit", help="Evaluate this saved fit (repeatable).", metavar="NAME"),
    ] = None,
    identity: Annotated[
        list[str] | None,
        typer.Option(help="a:b: evaluate dropping these blocks (repeatable).", metavar="A:B"),
    ] = None,
    combine: Annotated[
        bool,
        typer.Option(
            help="Evaluate all --fit and --identity spans together, as one model (the one "
            "'apply' writes from the same options), instead of one variant each."
        ),
    ] = False,
    selection: Annotated[
        Path | None,
        typer.Option(
            help="Evaluate the spans a 'rba-store select' chose (its JSON file), as one model: "
            "the one 'apply --selection' writes."
        ),
    ] = None,
    auto: Annotated[
        bool, typer.Option(help="Sweep: remove 1, 2, 3 ... blocks ranked by the statistics.")
    ] = False,
    max_blocks: Annotated[
        int | None, typer.Option(help="Most blocks --auto removes [all but one].")
    ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write the --auto plot here.")] = None,
    stats_name: Annotated[
        str | None,
        typer.Option("--stats", help="Saved statistics that rank --auto [the default ones]."),
    ] = None,
    checkpoint: CheckpointOpt = None,
    classifier: ClassifierOpt = Classifier.auto,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 ...")] = "cpu",
    limit: Annotated[int | None, typer.Option(help="Use the first N test images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Test images per batch.")] = 256,
    time_budget: TimeBudgetOpt = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy, parameters, FLOPs and speed of the original and approximated models."""
    from rba_store.approx.evaluate import (
        LaterVariants,
        Variant,
        check_time_budget,
        evaluate_variants,
        fit_variant,
        format_report,
        identity_variant,
    )
    from rba_store.approx.sweep import sweep_spans, sweep_variants, write_sweep_plot
    from rba_store.solve.fit import parse_span
    from rba_store.store import Store

    check_folder(plots, "--plots")
    check_time_budget(time_budget)
    if not auto:
        for flag, value in (
            ("--plots", plots),
            ("--max-blocks", max_blocks),
            ("--stats", stats_name),
        ):
            if value is not None:
                raise UsageError(f"{flag} applies to the --auto sweep only; add --auto or drop it")
    if combine and not (fit_names or identity):
        raise UsageError("--combine joins the --fit and --identity spans: pass some, or drop it")
    opened = Store.open(store)

    variants: list[Variant] = []
    if combine:
        maps, names = _span_maps(opened, list(fit_names or []), list(identity or []))
        label = "+".join(n or f"{m.span[0]}:{m.span[1]}" for m, n in zip(maps, names, strict=True))
        variants.append(Variant(label, maps))
    else:
        for name in fit_names or []:
            variants.append(fit_variant(opened, [name]))
        for text in identity or []:
            variants.append(identity_variant([parse_span(text)]))
    if selection is not None:
        variants.append(Variant(f"selection {selection.stem}", _selection_maps(opened, selection)))
    if not variants and not auto:
        raise UsageError(
            f"nothing to evaluate in {str(store)!r}: pass --fit NAME, --identity a:b, "
            "--selection FILE or --auto (fit maps first with 'rba-store fit')"
        )

    def sweep() -> list[Variant]:  # once the model is loaded and timed: an ETA from the start
        with dask_progress("evaluate: fits"):
            made = sweep_variants(opened, max_blocks, stats_name)
        return [v for _, linear, ident in made for v in (linear, ident)]

    try:
        with WorkProgress("evaluate:") as progress:
            later = None
            if auto:
                with dask_progress("evaluate: statistics"):
                    steps = sweep_spans(opened, max_blocks, stats_name)
                later = LaterVariants([k for k, _ in steps for _ in range(2)], sweep)
            report = evaluate_variants(
                opened,
                variants,
                later=later,
                checkpoint=checkpoint,
                batch_size=batch_size,
                classifier=classifier.value,
                device=device,
                limit=limit,
                progress=progress,
                time_budget=time_budget,
            )
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted: nothing was evaluated to the end; the maps fitted so far are kept as "
            "fits/a-b and reused, so re-running the same command goes on from there"
        ) from None
    plot = None
    if plots is not None:  # only when asked, where asked
        plot = write_sweep_plot(report, plots / "sweep.png", title=str(store))
    if as_json:
        typer.echo(json.dumps(report | ({"plot": str(plot)} if plot else {}), indent=2))
        return
    typer.echo(format_report(report))
    if auto:
        typer.echo("\n" + _sweep_summary(report))
    if plot:
        typer.echo(f"plot: {plot}")


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _sweep_summary(report: dict[str, Any]) -> str:
    rows = {v["name"]: v for v in report["variants"]}
    base = rows["original"]["accuracy"]

    def most(kind: str) -> int:
        ks = [int(n.split("-")[-1]) for n in rows if n.startswith(f"{kind} -")]
        ok = [k for k in sorted(ks) if rows[f"{kind} -{k}"]["accuracy"] >= base - 0.01]
        return max(ok, default=0)

    linear, identity = most("linear"), most("identity")
    return (
        f"within 1 point of the original accuracy ({100 * base:.2f}%) on the test split: "
        f"{_blocks(linear)} can be replaced by linear maps, {identity} dropped (identity) "
        "(a choice that looks at the test split: 'rba-store select' decides on validation)"
    )
