"""Fit the linear maps that replace spans of blocks, from a store of any size, in one pass.

For spans (a, b], X = h_a and Y = h_b (token vectors as rows). One Dask task per shard reads
every point any span needs once, and accumulates, for each distinct source a, the normal
equations of X = h_a against all its targets side by side (:mod:`rba_store.solve.passes`); a
second, optional pass computes held-out diagnostics. Fits are saved under ``fits/<name>``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from rba_store.dask_compute import check_scheduler_file
from rba_store.errors import UsageError
from rba_store.solve._backend import get_xp
from rba_store.solve.fold import fold_runners, folded_equations, folded_holdout_sums
from rba_store.solve.from_moments import equations_from_moments, moments_source
from rba_store.solve.heldout import HoldoutSums
from rba_store.solve.normal_eq import (
    GEMM_DTYPES,
    NormalEquations,
    Solution,
    solve,
    training_error,
)
from rba_store.solve.passes import equations, holdout_sums
from rba_store.solve.spans import FitOptions, Span, SpanFit, check_spans, fit_name, parse_span
from rba_store.store import (
    FITS,
    SampleSelection,
    Store,
    StoreLayout,
    normalize_json,
)
from rba_store.store.selection import (
    check_tokens,
    describe_holdout,
    split_holdout,
    usable_samples,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "FitOptions",
    "SpanFit",
    "export_safetensors",
    "fit_spans",
    "load_fit",
    "parse_span",
    "save_fit",
]


def _eval_samples(
    options: FitOptions, store: Store, spans: list[Span]
) -> tuple[Store, np.ndarray] | None:
    """``--eval-store`` and all its samples, after checking it comes from the same model."""
    if options.eval_store is None:
        return None
    eval_store = Store.open(options.eval_store)
    check_spans(spans, eval_store.layout, options.eval_store)
    # a random:K store's maps are measured on every token of the evaluation store
    check_tokens(eval_store, "all" if options.tokens.startswith("random:") else options.tokens)
    if eval_store.description["model"]["weights"] != store.description["model"]["weights"]:
        raise UsageError(
            f"--eval-store {options.eval_store!r} was extracted from other model weights than "
            "the fit store; pass a store of the same model"
        )
    return eval_store, usable_samples(eval_store, False)


def _check_rows(n_rows: int, spans: list[Span], layout: StoreLayout, options: FitOptions) -> None:
    """Refuse an underdetermined system (fewer rows than unknowns) unless ridge is asked for."""
    for a, _ in spans:
        d_in = layout.point(a).n_channels
        needed = d_in + 1 if options.bias else d_in
        if n_rows < needed and not options.ridge:
            raise UsageError(
                f"only {n_rows} rows to fit h{a} with {d_in} channels: the system is "
                "underdetermined; pass --ridge (e.g. 1e-3) or use more samples"
            )


def fit_spans(store: Store | str | Path, options: FitOptions) -> list[SpanFit]:
    """Fit every span of ``options`` from ``store`` in one pass; save each under ``fits/``."""
    if options.gemm_dtype not in GEMM_DTYPES:
        raise UsageError(f"--gemm {options.gemm_dtype!r} is not valid; use float64 or float32")
    if options.ridge < 0 or not math.isfinite(options.ridge):
        raise UsageError(f"--ridge {options.ridge} is invalid; pass a non-negative number")
    if options.checkpoint_every < 0 or not math.isfinite(options.checkpoint_every):
        raise UsageError(
            f"--checkpoint-every {options.checkpoint_every} is invalid; pass seconds >= 0"
        )
    if options.checkpoint is not None and Path(options.checkpoint).is_dir():
        raise UsageError(
            f"--checkpoint {options.checkpoint!r} is a folder; pass a file path (e.g. fit.ckpt.npz)"
        )
    if options.holdout is not None and options.eval_store is not None:
        raise UsageError("--holdout and --eval-store exclude each other; pass only one")
    get_xp(options.backend)  # refuses cupy without a GPU before any work
    check_scheduler_file(options.scheduler_file)
    store = Store.coerce(store, "r+")
    layout = store.layout
    spans = list(dict.fromkeys(options.spans))
    check_spans(spans, layout, str(store))
    check_tokens(store, options.tokens)
    names = [fit_name(span, options, len(spans)) for span in spans]
    # Every option's value is checked before a saved fit of the same name is compared with them.
    eval_samples = _eval_samples(options, store, spans)
    available = usable_samples(store, options.allow_incomplete)
    fit_idx, held_idx = split_holdout(
        options.selection.indices(available, store), options.holdout, options.holdout_seed
    )
    reused = {} if options.overwrite else _reusable(store, spans, names, options)
    order = list(spans)
    spans = [s for s in spans if s not in reused]
    names = [n for s, n in zip(order, names, strict=True) if s not in reused]
    if not spans:
        return [reused[s] for s in order]

    cls_only = options.tokens == "cls"
    _check_rows(
        len(fit_idx) * (1 if cls_only else layout.points[0].n_tokens), spans, layout, options
    )

    split = describe_holdout(options.holdout, options.holdout_seed)
    n_samples = len(fit_idx) + len(held_idx)
    saved = moments_source(store, options, n_samples, split, "the fit", spans)
    # Spans in the band of saved joint moments are solved from them (the activations are not
    # read for them); the others are streamed from the store in one pass.
    # Folded spans after h0 are read off moments that cover the MLP outputs, or recompute block
    # a's MLP output from h_{a-1} (rba_store.solve.fold).
    after_h0 = [s for s in spans if options.fold and s[0] >= 1]
    folded_moments = [s for s in after_h0 if saved is not None and saved.covers(s, folded=True)]
    folded = [s for s in after_h0 if s not in folded_moments]
    runners = fold_runners(store, spans, options, folded) if options.fold else {}
    from_moments = [s for s in spans if saved is not None and saved.covers(s) and s not in after_h0]
    streamed = [s for s in spans if s not in from_moments and s not in after_h0]
    accumulated: dict[Span, NormalEquations] = {}
    sources: dict[Span, dict] = {}
    if from_moments:
        assert saved is not None
        fit_moments = saved.moments(from_moments, all_rows=split is None)
        accumulated |= equations_from_moments(fit_moments, from_moments)
        sources |= {s: {"kind": "moments", "stats": saved.name} for s in from_moments}
    if folded_moments:
        assert saved is not None
        views = saved.folded(folded_moments, all_rows=split is None)
        for s, view in views.items():
            accumulated[s] = equations_from_moments(view, [(0, 1)])[(0, 1)]
            sources[s] = {"kind": "moments", "stats": saved.name, "x": f"m{s[0]}"}
    if streamed:
        plan = _plan(streamed)
        points = sorted({a for a, _ in streamed} | {b for _, b in streamed})
        by_source = equations(store, fit_idx, plan, points, cls_only, options)
        accumulated |= _split_targets(by_source, plan, layout)
        sources |= {s: {"kind": "activations"} for s in streamed}
    if folded:
        accumulated |= folded_equations(store, fit_idx, folded, runners, cls_only, options)
        sources |= {s: {"kind": "activations", "x": f"m{s[0]} from h{s[0] - 1}"} for s in folded}

    solutions: dict[Span, tuple[Solution, float]] = {}
    for span in spans:
        sub = accumulated[span].to_numpy()
        solution = solve(sub, bias=options.bias, ridge=options.ridge, gemm_dtype=options.gemm_dtype)
        solutions[span] = (solution, training_error(sub, solution))

    maps = {(a, b): (a, b, solutions[(a, b)][0].t, solutions[(a, b)][0].bias) for a, b in spans}
    held: dict[Span, HoldoutSums] | None = None
    held_source: dict[Span, dict] = {}
    if len(held_idx):
        base = {"kind": "holdout", "fraction": options.holdout, "samples": len(held_idx)}
        held = {}
        if from_moments:
            assert saved is not None
            held_moments = saved.heldout(from_moments)
            for s in from_moments:
                held[s] = HoldoutSums.from_moments(held_moments, *maps[s])
                held_source[s] = base | {"from": "moments", "stats": saved.name}
        if folded_moments:
            assert saved is not None
            for s, view in saved.folded_heldout(folded_moments).items():
                held[s] = HoldoutSums.from_moments(view, 0, 1, *maps[s][2:])
                held_source[s] = base | {"from": "moments", "stats": saved.name}
        if streamed:
            sums = holdout_sums(store, held_idx, cls_only, [maps[s] for s in streamed], options)
            held |= dict(zip(streamed, sums, strict=True))
            held_source |= {s: base | {"from": "activations"} for s in streamed}
        if folded:
            maps_f = [maps[s] for s in folded]
            sums = folded_holdout_sums(store, held_idx, cls_only, runners, maps_f, options)
            held |= dict(zip(folded, sums, strict=True))
            held_source |= {s: base | {"from": "activations"} for s in folded}
    elif eval_samples is not None:
        eval_store, eval_indices = eval_samples
        base = {"kind": "eval_store", "store": options.eval_store, "samples": len(eval_indices)}
        eval_options = replace(options, selection=SampleSelection(), allow_incomplete=False)
        eval_saved = moments_source(
            eval_store, eval_options, len(eval_indices), None, "--eval-store's held-out rows", spans
        )
        held = {}
        eval_moments = [
            s
            for s in spans
            if eval_saved is not None and eval_saved.covers(s) and s not in after_h0
        ]
        eval_streamed = [s for s in spans if s not in eval_moments and s not in after_h0]
        eval_folded = [
            s for s in after_h0 if eval_saved is not None and eval_saved.covers(s, folded=True)
        ]
        if eval_folded:
            assert eval_saved is not None
            for s, view in eval_saved.folded(eval_folded, all_rows=True).items():
                held[s] = HoldoutSums.from_moments(view, 0, 1, *maps[s][2:])
                held_source[s] = base | {"from": "moments", "stats": eval_saved.name}
        recomputed = [s for s in after_h0 if s not in eval_folded]
        if recomputed:
            missing = [s for s in recomputed if s[0] not in runners]
            if missing:
                runners |= fold_runners(store, missing, replace(options, source="auto"), missing)
            maps_f = [maps[s] for s in recomputed]
            sums = folded_holdout_sums(eval_store, eval_indices, cls_only, runners, maps_f, options)
            held |= dict(zip(recomputed, sums, strict=True))
            held_source |= {s: base | {"from": "activations"} for s in recomputed}
        if eval_moments:
            assert eval_saved is not None
            all_rows = eval_saved.moments(eval_moments, all_rows=True)
            for s in eval_moments:
                held[s] = HoldoutSums.from_moments(all_rows, *maps[s])
                held_source[s] = base | {"from": "moments", "stats": eval_saved.name}
        if eval_streamed:
            sums = holdout_sums(
                eval_store, eval_indices, cls_only, [maps[s] for s in eval_streamed], options
            )
            held |= dict(zip(eval_streamed, sums, strict=True))
            held_source |= {s: base | {"from": "activations"} for s in eval_streamed}

    fits = []
    for span, name in zip(spans, names, strict=True):
        solution, train_mse = solutions[span]
        diagnostics = {
            "blocks_replaced": list(range(span[0] + 1, span[1] + 1)),
            "rows": solution.n_rows,
            "samples": len(fit_idx),
            "method": solution.method,
            "condition_number": solution.cond,
            "rank": solution.rank,
            "channels_in": int(solution.t.shape[0]),
            "channels_out": int(solution.t.shape[1]),
            "ridge_added": solution.ridge_added,
            "notes": solution.notes,
            "train": {"relative_mse": train_mse},
            "heldout": None
            if held is None
            else held[span].report() | {"source": held_source[span]},
            "options": options.describe(),
            "source": sources[span],
            "store_fingerprint": store.fingerprint,
        }
        if options.fold:  # the map acts on block a's MLP output (a >= 1) or on h0
            diagnostics["folded"] = True
        if solution.gemm_error is not None:  # float32 products: their expected cost in T
            diagnostics["gemm_expected_relative_error"] = solution.gemm_error
        fit = SpanFit(name, span, solution, normalize_json(diagnostics))
        save_fit(store, fit)
        fits.append(fit)
    if options.checkpoint is not None:
        Path(options.checkpoint).unlink(missing_ok=True)  # the fits are saved: no longer needed
    fitted = {f.span: f for f in fits}
    return [reused.get(s) or fitted[s] for s in order]


def _plan(spans: list[Span]) -> list[tuple[int, list[int]]]:
    """Each distinct source and its targets: one accumulator of X = h_a against all of them."""
    sources: dict[int, list[int]] = {}
    for a, b in spans:
        sources.setdefault(a, []).append(b)
    return sorted(sources.items())


def _split_targets(
    by_source: dict[int, NormalEquations], plan: list[tuple[int, list[int]]], layout: StoreLayout
) -> dict[Span, NormalEquations]:
    """The accumulator of every span, cut out of its source's (targets side by side)."""
    out = {}
    for a, targets in plan:
        ne = by_source[a].to_numpy()
        offset = 0
        for b in targets:
            width = layout.point(b).n_channels
            out[(a, b)] = ne.select_outputs(offset, offset + width)
            offset += width
    return out


def _reusable(
    store: Store, spans: list[Span], names: list[str], options: FitOptions
) -> dict[Span, SpanFit]:
    """Saved fits of the same span, options and store (reused, as ``stats`` does); a saved
    fit of the same name made otherwise is refused."""
    reused = {}
    for span, name in zip(spans, names, strict=True):
        saved = store.read_analysis(FITS, name)
        if saved is None:
            continue
        attrs = dict(saved.attrs)
        same = (
            list(attrs.get("span", [])) == list(span)
            and attrs.get("options") == normalize_json(options.describe())
            and attrs.get("store_fingerprint") == store.fingerprint
        )
        if not same:
            raise UsageError(
                f"fit {name!r} already exists in {str(store)!r} with other options; pass "
                "--overwrite to replace it, or --name for another name"
            )
        solution = Solution(
            t=saved["T"].values,
            bias=saved["bias"].values,
            method=str(attrs["method"]),
            cond=float(attrs["condition_number"]),
            rank=int(attrs["rank"]),
            n_rows=int(attrs["rows"]),
            ridge_added=float(attrs["ridge_added"]),
            notes=list(attrs.get("notes", [])),
        )
        diagnostics = {k: v for k, v in attrs.items() if k not in ("kind", "name", "span")}
        reused[span] = SpanFit(name, span, solution, diagnostics, reused=True)
    return reused


def save_fit(store: Store, fit: SpanFit) -> None:
    """Save a fit as ``fits/<name>`` in the store (replacing one of the same name)."""
    ds = xr.Dataset(
        {
            "T": (("channel_in", "channel_out"), fit.solution.t),
            "bias": (("channel_out",), fit.solution.bias),
        },
        attrs={"kind": "fit", "name": fit.name, "span": list(fit.span)} | fit.diagnostics,
    )
    store.write_analysis(FITS, fit.name, ds)


def load_fit(store: Store | str | Path, name: str) -> xr.Dataset:
    """A saved fit: ``T`` (channel_in, channel_out), ``bias`` and the diagnostics as attrs."""
    ds = Store.coerce(store).read_analysis(FITS, name)
    if ds is None:
        raise UsageError(f"no fit {name!r} in {str(store)!r}; list them with 'rba-store info'")
    return ds


def export_safetensors(store: Store | str | Path, name: str, path: str | Path) -> Path:
    """Write a saved fit as ``.safetensors`` (tensors T and bias; span and options as metadata)."""
    import json

    from safetensors.numpy import save_file

    ds = load_fit(store, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "name": name,
        "span": json.dumps(ds.attrs["span"]),
        "diagnostics": json.dumps(dict(ds.attrs)),
    }
    save_file(
        {
            "T": np.ascontiguousarray(ds["T"].values),
            "bias": np.ascontiguousarray(ds["bias"].values),
        },
        str(path),
        metadata=metadata,
    )
    return path
