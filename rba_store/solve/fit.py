"""Fit the linear maps that replace spans of blocks, from a store of any size, in one pass.

For spans (a, b], X = h_a and Y = h_b (token vectors as rows). One Dask task per shard reads
every point any span needs once, and accumulates, for each distinct source a, the normal
equations of X = h_a against all its targets side by side; partials merge in a tree. A second,
optional pass computes held-out diagnostics. Fits are saved under ``fits/<name>`` in the store.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from rba_store import schema
from rba_store.daskutil import (
    compute,
    compute_with,
    concurrency,
    dask_client,
    on_shard,
    shard_ranges,
    tree_reduce,
)
from rba_store.errors import NonFiniteError, UsageError
from rba_store.selection import SampleSelection, check_tokens, usable_samples
from rba_store.solve._backend import get_xp
from rba_store.solve.checkpoint import checkpoint_key, load_checkpoint, save_checkpoint
from rba_store.solve.evaluate import HoldoutSums
from rba_store.solve.normal_eq import GEMM_DTYPES, NormalEquations, Solution, solve, training_error

Span = tuple[int, int]
_SPAN = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_span(text: str) -> Span:
    """``"a:b"`` -> ``(a, b)``."""
    match = _SPAN.match(text)
    if not match:
        raise UsageError(f"--span {text!r} is not of the form a:b (e.g. 4:6, blocks 5 and 6)")
    return int(match.group(1)), int(match.group(2))


def check_spans(spans: list[Span], layout: schema.StoreLayout, store: str) -> None:
    n_blocks = layout.n_blocks
    if not spans:
        raise UsageError("no span to fit; pass --span a:b (or --auto K)")
    for a, b in spans:
        if not 0 <= a < b <= n_blocks:
            raise UsageError(
                f"span {a}:{b} is out of range for {store!r} ({n_blocks} blocks): pass a:b with "
                f"0 <= a < b <= {n_blocks}"
            )
        if layout.points[a].n_tokens != layout.points[b].n_tokens:
            raise UsageError(
                f"span {a}:{b} maps h{a} ({layout.points[a].n_tokens} tokens) to h{b} "
                f"({layout.points[b].n_tokens} tokens): a token-wise map needs equal token counts"
            )


@dataclass(frozen=True)
class FitOptions:
    """Everything ``rba-store fit`` can be asked for (defaults follow the reference code)."""

    spans: tuple[Span, ...] = ()
    tokens: str = "all"
    selection: SampleSelection = field(default_factory=SampleSelection)
    holdout: float | None = None
    holdout_seed: int = 0
    eval_store: str | None = None
    bias: bool = False
    ridge: float = 0.0
    backend: str = "auto"
    gemm_dtype: str = "float64"
    allow_incomplete: bool = False
    scheduler: str | None = None
    scheduler_file: str | None = None
    name: str | None = None
    overwrite: bool = False
    checkpoint: str | None = None
    checkpoint_every: float = 60.0

    def describe(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "selection": self.selection.describe(),
            "holdout": self.holdout,
            "holdout_seed": self.holdout_seed,
            "eval_store": self.eval_store,
            "bias": self.bias,
            "ridge": self.ridge,
            "backend": self.backend,
            "gemm_dtype": self.gemm_dtype,
            "allow_incomplete": self.allow_incomplete,
        }


@dataclass
class SpanFit:
    """A fitted span: the map, its diagnostics, and where it is saved."""

    name: str
    span: Span
    solution: Solution
    diagnostics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "span": list(self.span)} | self.diagnostics


def fit_name(span: Span, options: FitOptions, n_spans: int) -> str:
    """``a-b`` plus what differs from the defaults; ``NAME`` (one span) or ``NAME-a-b``."""
    a, b = span
    if options.name:
        return options.name if n_spans == 1 else f"{options.name}-{a}-{b}"
    suffix = "".join(
        [
            f"-{options.tokens}" if options.tokens != "all" else "",
            "-bias" if options.bias else "",
            f"-ridge{options.ridge:g}" if options.ridge else "",
            "-gemm32" if options.gemm_dtype == "float32" else "",
        ]
    )
    return f"{a}-{b}{suffix}"


# -- tasks (run on workers) -------------------------------------------------------------------


def _rows(chunk: np.ndarray, local: np.ndarray, cls_only: bool) -> np.ndarray:
    whole = len(local) == len(chunk) and local[0] == 0 and local[-1] == len(chunk) - 1
    points = chunk if whole else chunk[local]  # no copy when the whole shard is selected
    if cls_only:
        points = points[:, :1]
    return points.reshape(-1, points.shape[-1])


def _check_finite(
    chunks: tuple[np.ndarray, ...], points: list[int], local: np.ndarray, start: int
) -> None:
    for k, chunk in zip(points, chunks, strict=True):
        bad = ~np.isfinite(chunk[local]).all(axis=tuple(range(1, chunk.ndim)))
        if bad.any():
            rows = start + local[bad]
            raise NonFiniteError(
                f"h{k} holds NaN or Inf in samples {rows.min()}..{rows.max()} ({bad.sum()} "
                "samples); re-extract the store, or leave them out with --limit/--sample"
            )


def _accumulate(
    local: np.ndarray,
    start: int,
    cls_only: bool,
    plan: list[tuple[int, list[int]]],
    points: list[int],
    backend: str,
    gemm_dtype: str,
    *chunks: np.ndarray,
) -> dict[int, NormalEquations]:
    xp = get_xp(backend)
    position = {k: i for i, k in enumerate(points)}
    out = {}
    for a, targets in plan:
        x = xp.asarray(_rows(chunks[position[a]], local, cls_only))
        ys = [xp.asarray(_rows(chunks[position[b]], local, cls_only)) for b in targets]
        y = ys[0] if len(ys) == 1 else xp.concatenate(ys, axis=1)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported below
            ne = NormalEquations.from_chunk(x, y, xp, gemm_dtype)
        finite = xp.isfinite(xp.diagonal(ne.sxx)).all() and xp.isfinite(ne.syy).all()
        if not bool(finite):
            _check_finite(chunks, points, local, start)
        out[a] = ne
    return out


def _merge_equations(
    left: dict[int, NormalEquations], right: dict[int, NormalEquations]
) -> dict[int, NormalEquations]:
    return {a: left[a].merge(right[a]) for a in left}


def _holdout(
    local: np.ndarray,
    cls_only: bool,
    maps: list[tuple[int, int, np.ndarray, np.ndarray]],
    points: list[int],
    *chunks: np.ndarray,
) -> list[HoldoutSums]:
    position = {k: i for i, k in enumerate(points)}
    return [
        HoldoutSums.from_chunk(
            _rows(chunks[position[a]], local, cls_only),
            _rows(chunks[position[b]], local, cls_only),
            t,
            bias,
        )
        for a, b, t, bias in maps
    ]


def _merge_holdout(left: list[HoldoutSums], right: list[HoldoutSums]) -> list[HoldoutSums]:
    return [a.merge(b) for a, b in zip(left, right, strict=True)]


# -- graphs ------------------------------------------------------------------------------------


def _split_holdout(indices: np.ndarray, options: FitOptions) -> tuple[np.ndarray, np.ndarray]:
    if options.holdout is None:
        return indices, indices[:0]
    if not 0 < options.holdout < 1:
        raise UsageError(
            f"--holdout {options.holdout} is out of range; pass a fraction between 0 and 1"
        )
    n_held = max(1, round(options.holdout * len(indices)))
    if n_held >= len(indices):
        raise UsageError(
            f"--holdout {options.holdout} leaves no sample to fit ({len(indices)} samples); "
            "pass a smaller fraction"
        )
    rng = np.random.default_rng(options.holdout_seed)
    held = np.sort(rng.choice(indices, size=n_held, replace=False))
    return np.setdiff1d(indices, held), held


def _holdout_sums(
    store: str,
    indices: np.ndarray,
    cls_only: bool,
    maps: list[tuple[int, int, Any, Any]],
    options: FitOptions,
) -> list[HoldoutSums]:
    points = sorted({a for a, *_ in maps} | {b for _, b, *_ in maps})
    layout = schema.read_layout(schema.open_store(store))
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(_holdout, store, points, start, stop, local, cls_only, maps, points)
        for local, start, stop in shard_ranges(layout, indices)
    ]
    merged = tree_reduce(parts, _merge_holdout)
    return compute(merged, options.scheduler, options.scheduler_file, len(parts))


def _eval_indices(
    options: FitOptions, description: dict[str, Any], spans: list[Span]
) -> np.ndarray | None:
    """All samples of ``--eval-store``, after checking it comes from the same model."""
    if options.eval_store is None:
        return None
    group = schema.open_store(options.eval_store)
    layout = schema.read_layout(group)
    eval_description = schema.read_description(group)
    check_spans(spans, layout, options.eval_store)
    check_tokens(eval_description, options.tokens, options.eval_store)
    if eval_description["model"]["weights"] != description["model"]["weights"]:
        raise UsageError(
            f"--eval-store {options.eval_store!r} was extracted from other model weights than "
            "the fit store; pass a store of the same model"
        )
    return usable_samples(group, layout, options.eval_store, False)


def _check_rows(
    n_rows: int, spans: list[Span], layout: schema.StoreLayout, options: FitOptions
) -> None:
    """Refuse an underdetermined system (fewer rows than unknowns) unless ridge is asked for."""
    for a, _ in spans:
        d_in = layout.points[a].n_channels
        needed = d_in + 1 if options.bias else d_in
        if n_rows < needed and not options.ridge:
            raise UsageError(
                f"only {n_rows} rows to fit h{a} with {d_in} channels: the system is "
                "underdetermined; pass --ridge (e.g. 1e-3) or use more samples"
            )


def _equations(
    store: str,
    layout: schema.StoreLayout,
    rows: np.ndarray,
    plan: list[tuple[int, list[int]]],
    points: list[int],
    cls_only: bool,
    options: FitOptions,
    description: dict[str, Any],
) -> dict[int, NormalEquations]:
    """The normal equations of every source over ``rows``: one task per shard, merged."""
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(
            _accumulate,
            store,
            points,
            start,
            stop,
            local,
            start,
            cls_only,
            plan,
            points,
            options.backend,
            options.gemm_dtype,
        )
        for local, start, stop in shard_ranges(layout, rows)
    ]
    if options.checkpoint is None:
        graph = tree_reduce(parts, _merge_equations)
        return compute(graph, options.scheduler, options.scheduler_file, len(parts))
    key = checkpoint_key(
        {
            "store": description["fingerprint"],
            "plan": plan,
            "tokens": options.tokens,
            "gemm_dtype": options.gemm_dtype,
        },
        rows,
    )
    return _resumable_equations(parts, Path(options.checkpoint), key, options)


def _shards_per_group(client: Any) -> int:
    """Shards computed between two folds: several per core, so that few barriers stall them."""
    return 4 * concurrency(client)


def _resumable_equations(
    parts: list[Any], path: Path, key: str, options: FitOptions
) -> dict[int, NormalEquations]:
    """Shards in groups (several per core), folded in store order; checkpointed.

    The fold order is fixed (shard 0, 1, 2, ...), so a run resumed from any checkpoint gives
    bit for bit the accumulators, and T, of an uninterrupted one. ``state`` (shards folded,
    accumulators) changes in one assignment, so a Ctrl-C never saves a half-folded group.
    """
    state = load_checkpoint(path, key) or (0, {})
    last_saved = time.monotonic()
    with dask_client(options.scheduler, options.scheduler_file) as client:
        group = _shards_per_group(client)
        try:
            while state[0] < len(parts):
                done, total = state
                batch = parts[done : done + group]
                for partial in compute_with(client, dask.delayed(list)(batch), len(parts)):
                    host = {a: ne.to_numpy() for a, ne in partial.items()}
                    total = _merge_equations(total, host) if total else host
                state = (done + len(batch), total)
                due = time.monotonic() - last_saved >= options.checkpoint_every
                if due and state[0] < len(parts):
                    save_checkpoint(path, key, *state)
                    last_saved = time.monotonic()
        except KeyboardInterrupt:
            if state[1]:  # Ctrl-C: keep what is folded so far
                save_checkpoint(path, key, *state)
            raise
    return state[1]


def fit_spans(store: str | Path, options: FitOptions) -> list[SpanFit]:
    """Fit every span of ``options`` from ``store`` in one pass; save each under ``fits/``."""
    store = str(store)
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
    group = schema.open_store(store)
    description = schema.read_description(group)
    layout = schema.read_layout(group)
    spans = list(dict.fromkeys(options.spans))
    check_spans(spans, layout, store)
    check_tokens(description, options.tokens, store)
    names = [fit_name(span, options, len(spans)) for span in spans]
    paths = [schema.analysis_path(schema.FITS_GROUP, name) for name in names]
    if not options.overwrite:
        for name, path in zip(names, paths, strict=True):
            if schema.has_analysis(store, path):
                raise UsageError(
                    f"fit {name!r} already exists in {store!r}; pass --overwrite to replace it, "
                    "or --name for another name"
                )
    eval_indices = _eval_indices(options, description, spans)

    available = usable_samples(group, layout, store, options.allow_incomplete)
    fit_idx, held_idx = _split_holdout(options.selection.indices(available, store), options)
    cls_only = options.tokens == "cls"
    _check_rows(
        len(fit_idx) * (1 if cls_only else layout.points[0].n_tokens), spans, layout, options
    )

    sources: dict[int, list[int]] = {}
    for a, b in spans:
        sources.setdefault(a, []).append(b)
    plan = sorted(sources.items())
    points = sorted({a for a, _ in spans} | {b for _, b in spans})
    equations = _equations(store, layout, fit_idx, plan, points, cls_only, options, description)

    solutions: dict[Span, tuple[Solution, float]] = {}
    for a, targets in plan:
        ne = equations[a].to_numpy()
        offset = 0
        for b in targets:
            width = layout.points[b].n_channels
            sub = ne.select_outputs(offset, offset + width)
            solution = solve(sub, bias=options.bias, ridge=options.ridge)
            solutions[(a, b)] = (solution, training_error(sub, solution))
            offset += width

    maps = [(a, b, solutions[(a, b)][0].t, solutions[(a, b)][0].bias) for a, b in spans]
    held: list[HoldoutSums] | None = None
    held_source = None
    if len(held_idx):
        held = _holdout_sums(store, held_idx, cls_only, maps, options)
        held_source = {"kind": "holdout", "fraction": options.holdout, "samples": len(held_idx)}
    elif eval_indices is not None:
        assert options.eval_store is not None
        held = _holdout_sums(options.eval_store, eval_indices, cls_only, maps, options)
        held_source = {
            "kind": "eval_store",
            "store": options.eval_store,
            "samples": len(eval_indices),
        }

    fits = []
    for i, (span, name, path) in enumerate(zip(spans, names, paths, strict=True)):
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
            "heldout": None if held is None else held[i].report() | {"source": held_source},
            "options": options.describe(),
            "store_fingerprint": description["fingerprint"],
        }
        fit = SpanFit(name, span, solution, schema.normalize_json(diagnostics))
        _save(store, path, fit)
        fits.append(fit)
    if options.checkpoint is not None:
        Path(options.checkpoint).unlink(missing_ok=True)  # the fits are saved: no longer needed
    return fits


def _save(store: str, path: str, fit: SpanFit) -> None:
    ds = xr.Dataset(
        {
            "T": (("channel_in", "channel_out"), fit.solution.t),
            "bias": (("channel_out",), fit.solution.bias),
        },
        attrs={"kind": "fit", "name": fit.name, "span": list(fit.span)} | fit.diagnostics,
    )
    schema.write_analysis(store, path, ds)


def load_fit(store: str | Path, name: str) -> xr.Dataset:
    """A saved fit: ``T`` (channel_in, channel_out), ``bias`` and the diagnostics as attrs."""
    ds = schema.read_analysis(store, schema.analysis_path(schema.FITS_GROUP, name))
    if ds is None:
        raise UsageError(f"no fit {name!r} in {str(store)!r}; list them with 'rba-store info'")
    return ds


def export_safetensors(store: str | Path, name: str, path: str | Path) -> Path:
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
