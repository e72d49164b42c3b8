"""``rba-store select``: which spans can go, chosen greedily by measured validation accuracy.

At each step every candidate span (single blocks and spans of up to ``max_span`` blocks, not
overlapping the spans chosen so far; optionally only the best ``candidates`` by the statistics)
is replaced by its map on the network with the spans chosen so far, and scored on the
validation split: top-1 accuracy (tie: agreement with the original). The best is kept, until
the best would fall more than ``max_drop`` points below the original, or ``max_blocks`` blocks
are gone. A candidate runs only the blocks after its span: each validation batch is run once
per step, its residual stream kept at every point. The test split is never used to choose; it
is measured at the end, for every step of the path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rba_store.approx.evaluate import Variant, check_time_budget, evaluate_variants
from rba_store.approx.outlook import SelectOutlook, blocks_after, overlaps
from rba_store.approx.rebuild import held_out_source, rebuild_model
from rba_store.approx.refit import changed_sources, refit_maps
from rba_store.approx.surgery import TIME_BUDGET_S, SpanMap, WorkProgress, WorkTracker
from rba_store.approx.validation import Score, validation_for
from rba_store.errors import UsageError
from rba_store.solve import Solution
from rba_store.store import FITS, Store
from rba_store.store.layout import points_text

Span = tuple[int, int]
MAP_KINDS = ("linear", "identity", "both")


@dataclass(frozen=True)
class SelectOptions:
    """Everything ``rba-store select`` can be asked for."""

    max_drop: float = 1.0  # points of validation accuracy below the original
    max_ppl_increase: float | None = None  # language models: relative validation perplexity
    max_blocks: int | None = None
    max_span: int = 2
    candidates: int | None = None  # only the best K spans by the statistics; None: all
    candidates_by: str = "statistics"  # what ranks them: the statistics or the modularity curve
    maps: str = "linear"  # what replaces a span: linear, identity, or the better of both
    refit: bool = False
    rank_by: str = "agreement"  # with the original's predictions, or "accuracy" (noisier)
    classifier: str = "auto"  # the model's head (auto: when trained for the data) or a probe
    batch_size: int = 256
    name: str = "select"
    fold: bool = False  # candidates' maps folded into block a's MLP output (fit --fold)
    time_budget: float = TIME_BUDGET_S  # seconds of timing per variant of the test table

    def check(self, n_blocks: int) -> None:
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise UsageError(
                f"--max-ppl-increase {self.max_ppl_increase} is invalid; pass a positive "
                "fraction (0.05: at most 5% above the original's perplexity)"
            )
        if not 0 <= self.max_drop <= 100:
            raise UsageError(f"--max-drop {self.max_drop} is out of range; pass 0..100 points")
        if self.max_blocks is not None and not 1 <= self.max_blocks < n_blocks:
            raise UsageError(
                f"--max-blocks {self.max_blocks} is out of range; pass 1..{n_blocks - 1}"
            )
        if not 1 <= self.max_span <= n_blocks:
            raise UsageError(f"--max-span {self.max_span} is out of range; pass 1..{n_blocks}")
        if self.candidates is not None and self.candidates < 1:
            raise UsageError(f"--candidates {self.candidates} is invalid; pass a positive number")
        if self.candidates_by not in ("statistics", "modularity"):
            raise UsageError(
                f"--candidates-by {self.candidates_by!r} is not valid; use statistics or modularity"
            )
        if self.candidates_by == "modularity" and self.candidates is None:
            raise UsageError("--candidates-by modularity ranks --candidates K; pass --candidates")
        if self.rank_by not in ("agreement", "accuracy"):
            raise UsageError(f"--rank-by {self.rank_by!r} is not valid; use agreement or accuracy")
        if self.maps not in MAP_KINDS:
            raise UsageError(f"--maps {self.maps!r} is not valid; use {', '.join(MAP_KINDS)}")
        if self.refit and self.maps == "identity":
            raise UsageError("--refit needs linear maps; drop --maps identity or --refit")
        if self.fold and (self.refit or self.maps == "identity"):
            raise UsageError("--fold scores folded linear maps: drop --refit and --maps identity")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} is invalid; pass a positive number")
        check_time_budget(self.time_budget)


@dataclass
class Step:
    """One span added to the selection, and the validation figures of the network after it."""

    span: Span
    kind: str  # "linear" or "identity"
    blocks_removed: int
    val_accuracy: float
    val_agreement: float
    candidates_tried: int
    val_perplexity: float | None = None  # language models


@dataclass
class Selection:
    """The path of a greedy selection and what it chose."""

    options: SelectOptions
    val_samples: int
    original_val_accuracy: float
    steps: list[Step] = field(default_factory=list)
    maps: list[SpanMap] = field(default_factory=list)
    fit_names: list[str | None] = field(default_factory=list)
    refitted: dict[Span, Solution] = field(default_factory=dict)
    stop_reason: str = ""
    original_val_perplexity: float | None = None  # language models


def candidate_spans(store: Store, options: SelectOptions) -> list[Span]:
    """Every span of up to ``max_span`` blocks, or the best ``candidates`` by the statistics."""
    n, stored = store.layout.n_blocks, set(store.layout.stored_blocks)
    if options.candidates is None:  # extract --points: the spans between stored points
        spans = [(a, a + k) for k in range(1, options.max_span + 1) for a in range(n - k + 1)]
        spans = [(a, b) for a, b in spans if a in stored and b in stored]
        if not spans:
            raise UsageError(
                f"no span of at most --max-span {options.max_span} blocks joins two points "
                f"{str(store)!r} keeps ({points_text(store.layout.stored_blocks)}, extracted "
                "with --points); pass a larger --max-span"
            )
        return spans
    if options.candidates_by == "modularity":  # the spans whose gain in Q is lowest
        from rba_store.readings import modularity_spans

        return modularity_spans(store, options.candidates, options.max_span)
    from rba_store.stats import default_stats

    stats = default_stats(store, options.max_span)  # saved, or with the band of --max-span
    ranked = stats.candidates(max_span=options.max_span, top=options.candidates)
    return [(int(c["span"][0]), int(c["span"][1])) for c in ranked]


def original_maps(store: Store, spans: list[Span], fold: bool = False) -> dict[Span, SpanMap]:
    """Maps fitted on the original network (``fits/a-b``, fitted in one pass where missing;
    ``fold``: the folded maps ``fits/a-b-fold``, streamed)."""
    from rba_store.solve import FitOptions, fit_spans, load_fit

    suffix = "-fold" if fold else ""
    missing = [(a, b) for a, b in spans if not store.has_analysis(FITS, f"{a}-{b}{suffix}")]
    if missing and fold:
        fit_spans(store, FitOptions(spans=tuple(missing), fold=True))
    elif missing:
        from rba_store.stats import default_stats

        # One pass (reused when saved), keeping the joint moments of the band of the longest
        # span: every missing map in it from the moments, any other streamed.
        default_stats(store, max(b - a for a, b in missing))
        fit_spans(store, FitOptions(spans=tuple(missing)))
    maps = {}
    for a, b in spans:
        ds = load_fit(store, f"{a}-{b}{suffix}")
        maps[(a, b)] = SpanMap((a, b), ds["T"].values, ds["bias"].values, fold)
    return maps


def _try_candidates(
    net: Any,
    val: Any,
    trials: list[SpanMap],
    tracker: WorkTracker | None = None,
    step: int = 1,
    leading: Callable[[Span, list[Span]], None] | None = None,
    rank_by: str = "agreement",
) -> list[Score]:
    """Validation accuracy and agreement of the network with each trial map added.

    ``tracker`` is told after each candidate on each batch, with its cost (blocks run);
    ``leading(span, untried)`` after each candidate on the last batch: the one that leads the
    step, and the spans still to try."""
    entries = [net.entry(m) for m in trials]  # where each map starts, and what it runs
    costs = [blocks_after(net, m.span[1]) for m in trials]
    outputs: list[list[Any]] = [[] for _ in trials]
    scores: list[Score] = []
    n_batches = len(val.batches)
    for j, x in enumerate(val.batches, start=1):
        points = net.all_points(net.stem(x))
        n = len(x)
        for i, (trial, (start, (_, module))) in enumerate(zip(trials, entries, strict=True)):
            with torch.inference_mode():
                h = net.run(net.step_function(module)(points[start]), trial.span[1])
            outputs[i].append(val.predict(net, h, j - 1))
            if j == n_batches:
                scores.append(val.score(outputs[i]))
                best = _best(trials[: i + 1], scores, rank_by)
                if leading is not None:
                    leading(trials[best].span, [m.span for m in trials[i + 1 :]])
            if tracker is not None:
                where = f"step {step}: candidate {i + 1}/{len(trials)}"
                where += f", batch {j}/{n_batches}" if n_batches > 1 else ""
                first = blocks_after(net, 0) * n if i == 0 else 0  # the pass to every point
                tracker.report(where, cost=costs[i] * n + first)
    return scores


def _original_score(net: Any, val: Any) -> Score:
    """The original network's score on the validation split (kept for agreement)."""
    outputs = [val.predict(net, net.run(net.stem(x), 0), j) for j, x in enumerate(val.batches)]
    return val.keep_original(outputs)


def _best(trials: list[SpanMap], scores: list[Score], rank_by: str) -> int:
    """The trial with the best validation agreement (or accuracy), then the other, then the
    longer span."""

    def key(i: int) -> tuple[float, float, int]:
        accuracy, agreement = scores[i].accuracy, scores[i].agreement
        first, second = (accuracy, agreement) if rank_by == "accuracy" else (agreement, accuracy)
        return first, second, trials[i].span[1] - trials[i].span[0]

    return max(range(len(trials)), key=key)


def select_spans(
    store: Store | str | Path,
    options: SelectOptions,
    checkpoint: str | Path | None = None,
    progress: WorkProgress | None = None,
) -> Selection:
    """Greedy selection on the validation split (see the module's docstring).

    ``progress`` receives the :class:`rba_store.approx.surgery.Work` done after each candidate
    on each batch; its total is an estimate (:class:`rba_store.approx.outlook.SelectOutlook`),
    since the number of steps, and what each tries, is not known in advance."""
    store = Store.coerce(store)
    description = store.description
    options.check(store.layout.n_blocks)
    tracker = WorkTracker(progress)
    tracker.report("loading the model")
    start = time.perf_counter()
    loaded = rebuild_model(description["model"], checkpoint, store)
    setup_s = time.perf_counter() - start  # evaluate_path rebuilds it
    language = loaded.family == "language"
    if language and options.refit:
        raise UsageError("--refit is not available for language models yet; drop it")
    if not language and options.max_ppl_increase is not None:
        raise UsageError("--max-ppl-increase is for language models; use --max-drop")
    val, net = validation_for(store, loaded, options.classifier, options.batch_size)
    spans = candidate_spans(store, options)
    if options.fold:  # spans whose map cannot fold (e.g. h0 behind a non-linear pre-norm) go
        from rba_store.approx.fold import fold_refusal_for

        spans = [s for s in spans if fold_refusal_for(loaded.module, s) is None]
    tracker.report(f"the maps of {len(spans)} candidate spans")
    fitted = original_maps(store, spans, options.fold) if options.maps != "identity" else {}
    n_val = sum(len(x) for x in val.batches)
    limit = options.max_blocks or store.layout.n_blocks - 1
    every_step = spans * (2 if options.maps == "both" else 1)  # what a step may try
    outlook = SelectOutlook(tracker, n_val, options, limit, setup_s, every_step)
    original_cost = blocks_after(net, 0) * n_val
    outlook.step(net, every_step, before=original_cost)
    tracker.report("the original on the validation split")
    original = _original_score(net, val)
    tracker.report("the original on the validation split", cost=original_cost)
    base = original.accuracy
    selection = Selection(options, n_val, base, original_val_perplexity=original.perplexity)
    removed = 0
    while True:
        open_spans = [
            s
            for s in spans
            if not overlaps(s, net.maps, options.fold) and removed + s[1] - s[0] <= limit
        ]
        if not open_spans:
            selection.stop_reason = f"no candidate span left within {limit} blocks"
            break
        linear = dict(fitted)
        refits = refit_maps(store, net, changed_sources(net, open_spans)) if options.refit else {}
        linear |= {span: m for span, (m, _) in refits.items()}
        trials = []
        if options.maps in ("linear", "both"):
            trials += [linear[s] for s in open_spans]
        if options.maps in ("identity", "both"):
            trials += [SpanMap(s) for s in open_spans]
        outlook.step(net, [m.span for m in trials])
        step = len(selection.steps) + 1
        scores = _try_candidates(net, val, trials, tracker, step, outlook.leading, options.rank_by)

        best = _best(trials, scores, options.rank_by)
        score = scores[best]
        accuracy, agreement = score.accuracy, score.agreement
        stop = _stop_reason(trials[best].span, score, original, options)
        if stop:
            selection.stop_reason = stop
            break
        chosen = trials[best]
        net = net.with_map(chosen)
        removed += chosen.span[1] - chosen.span[0]
        kind = "identity" if chosen.t is None else "folded" if chosen.folded else "linear"
        selection.steps.append(
            Step(chosen.span, kind, removed, accuracy, agreement, len(trials), score.perplexity)
        )
        selection.maps.append(chosen)
        a, b = chosen.span
        if kind == "identity":
            selection.fit_names.append(None)
        elif chosen.span in refits:
            selection.fit_names.append(f"{options.name}-{a}-{b}")
            selection.refitted[chosen.span] = refits[chosen.span][1]
        else:
            selection.fit_names.append(f"{a}-{b}{'-fold' if chosen.folded else ''}")
        if removed >= limit:
            selection.stop_reason = f"--max-blocks {limit} reached"
            break
    _save_refitted(store, selection)
    return selection


def _stop_reason(span: Span, score: Score, original: Score, options: SelectOptions) -> str:
    """Why the best next span is not taken ("" when it is)."""
    a, b = span
    base = original.accuracy
    if score.accuracy < base - options.max_drop / 100 - 1e-12:
        return (
            f"the best next span ({a}:{b}) would leave {100 * score.accuracy:.2f}% validation "
            f"accuracy, more than {options.max_drop:g} point"
            f"{'' if options.max_drop == 1 else 's'} below {100 * base:.2f}%"
        )
    limit = options.max_ppl_increase
    ppl, base_ppl = score.perplexity, original.perplexity
    if limit is not None and ppl and base_ppl and ppl > base_ppl * (1 + limit) + 1e-12:
        return (
            f"the best next span ({a}:{b}) would raise validation perplexity to {ppl:.4g}, "
            f"more than {100 * limit:g}% above {base_ppl:.4g}"
        )
    return ""


def _save_refitted(store: Store, selection: Selection) -> None:
    """Save the re-fitted maps of a selection as fits, so that ``apply`` can use them."""
    from rba_store.solve.fit import SpanFit, save_fit
    from rba_store.store import normalize_json

    for m, name in zip(selection.maps, selection.fit_names, strict=True):
        solution = selection.refitted.get(m.span)
        if name is None or solution is None:
            continue
        diagnostics = {
            "rows": solution.n_rows,
            "method": solution.method,
            "condition_number": solution.cond,
            "rank": solution.rank,
            "notes": solution.notes,
            "refit": "X from the network with the earlier spans of the selection replaced",
            "selection": selection.options.name,
            "store_fingerprint": store.fingerprint,
        }
        save_fit(store.writable(), SpanFit(name, m.span, solution, normalize_json(diagnostics)))


def evaluate_path(
    store: Store,
    selection: Selection,
    checkpoint: str | Path | None = None,
    progress: WorkProgress | None = None,
) -> dict[str, Any]:
    """Test-split figures of the original and of the network after every step of the path,
    with the same spans dropped (identity) next to it (timed within the options' budget)."""
    variants = []
    for k, step in enumerate(selection.steps, start=1):
        maps = selection.maps[:k]
        variants.append(Variant(f"selected -{step.blocks_removed}", list(maps)))
        if any(m.t is not None for m in maps):
            identity = [SpanMap(m.span) for m in maps]
            variants.append(Variant(f"identity -{step.blocks_removed}", identity))
    language = store.description["model"].get("family") == "language"
    test = None if language else held_out_source(store.description["data"], "test")
    return evaluate_variants(
        store,
        variants,
        checkpoint=checkpoint,
        batch_size=selection.options.batch_size,
        source=test,
        classifier=selection.options.classifier,
        progress=progress,
        time_budget=selection.options.time_budget,
    )


def to_json(selection: Selection) -> dict[str, Any]:
    return {
        "options": asdict(selection.options),
        "val_samples": selection.val_samples,
        "original_val_accuracy": selection.original_val_accuracy,
        "original_val_perplexity": selection.original_val_perplexity,
        "steps": [asdict(s) | {"span": list(s.span)} for s in selection.steps],
        "stop_reason": selection.stop_reason,
    }
