"""Folded fits streamed from the store: block a recomputed from the stored ``h_{a-1}``.

For span (a, b] with a >= 1, X = m_a (block a's MLP output) and Y = h_b - r_a (r_a: the residual
stream after block a's attention, h_a = r_a + m_a). Neither is stored: one Dask task per shard
reads ``h_{a-1}`` and every ``h_b``, runs block a on a chunk of samples at a time (float32, as
the model runs; :class:`rba_store.approx.fold_site.MlpOutputs`) and accumulates the same float64
normal equations as :mod:`rba_store.solve.passes`, merged the same way; a second pass gives the
held-out diagnostics. Blocks see whole samples (attention mixes tokens); ``tokens=cls`` keeps the
class token's rows afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import dask
import numpy as np
import torch

from rba_store.dask_compute import compute_with, dask_client, shared_constant, tree_reduce
from rba_store.errors import UsageError
from rba_store.solve._backend import get_xp
from rba_store.solve.heldout import HoldoutSums
from rba_store.solve.normal_eq import NormalEquations
from rba_store.solve.spans import FitOptions, Span
from rba_store.store import Store
from rba_store.store.reading import on_shard, shard_ranges

SAMPLES_PER_CHUNK = 64  # samples run through block a at once (bounds the task's memory)
Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def fold_runners(
    store: Store, spans: list[Span], options: FitOptions, recomputed: list[Span]
) -> dict[int, Runner]:
    """The store's model, checked for every span (one-line refusals), and a runner of block a
    for each span of ``recomputed`` (folded spans after h0 whose MLP output is not read off
    saved moments)."""
    from rba_store.approx.fold_site import MlpOutputs, fold_site
    from rba_store.approx.rebuild import build_architecture, rebuild_model

    if options.checkpoint is not None:
        raise UsageError("--checkpoint does not apply to --fold; drop one of them")
    stored = store.description.get("tokens", "all")
    if stored != "all" and recomputed:
        a, b = recomputed[0]
        raise UsageError(
            f"--fold recomputes block {a} from every token of h{a - 1}, but {str(store)!r} "
            f"holds tokens {stored!r} (span {a}:{b}); extract with --tokens all, or with "
            "--mlp-outputs and run stats (the folded fit is then read off the moments)"
        )
    if options.source == "moments" and recomputed:
        raise UsageError(
            "--from moments: the saved moments do not cover MLP outputs, which --fold "
            "recomputes from the activations; extract with --mlp-outputs and run stats, or use "
            "--from auto"
        )
    description = store.description["model"]
    if recomputed or description.get("family") == "language":
        module = rebuild_model(description, None, store).module
    else:  # the checks read the structure only: no weights, no memory (meta device)
        with torch.device("meta"):
            module = build_architecture(description)
    for span in spans:
        fold_site(module, span, options.bias)
    n_tokens = store.layout.points[0].n_tokens
    return {a: MlpOutputs(module, a, n_tokens) for a in sorted({a for a, _ in recomputed})}


def _chunks(
    local: np.ndarray, cls_only: bool, runner: Runner, h_prev: np.ndarray, targets: list[Any]
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """``(X, [Y per target])`` rows of the selected samples, a chunk of samples at a time."""
    for start in range(0, len(local), SAMPLES_PER_CHUNK):
        rows = local[start : start + SAMPLES_PER_CHUNK]
        r, m = runner(torch.from_numpy(np.ascontiguousarray(h_prev[rows], dtype=np.float32)))
        r, m = r.numpy(), m.numpy()
        ys = [h[rows].astype(np.float32) - r for h in targets]
        if cls_only:
            m, ys = m[:, :1], [y[:, :1] for y in ys]
        yield m.reshape(-1, m.shape[-1]), [y.reshape(-1, y.shape[-1]) for y in ys]


def _accumulate(
    local: np.ndarray,
    cls_only: bool,
    runners: dict[int, Runner],
    plan: list[tuple[int, list[int]]],
    points: list[int],
    backend: str,
    gemm_dtype: str,
    *chunks: np.ndarray,
) -> dict[Span, NormalEquations]:
    xp = get_xp(backend)
    position = {k: i for i, k in enumerate(points)}
    out: dict[Span, NormalEquations] = {}
    for a, targets in plan:
        h_prev, ys = chunks[position[a - 1]], [chunks[position[b]] for b in targets]
        for x, y_list in _chunks(local, cls_only, runners[a], h_prev, ys):
            x_dev = xp.asarray(x)
            for b, y in zip(targets, y_list, strict=True):
                ne = NormalEquations.from_chunk(x_dev, xp.asarray(y), xp, gemm_dtype)
                out[(a, b)] = out[(a, b)].merge(ne) if (a, b) in out else ne
    return out


def _merge(
    left: dict[Span, NormalEquations], right: dict[Span, NormalEquations]
) -> dict[Span, NormalEquations]:
    return {s: left[s].merge(right[s]) for s in left}


def _points_and_plan(spans: list[Span]) -> tuple[list[int], list[tuple[int, list[int]]]]:
    sources: dict[int, list[int]] = {}
    for a, b in spans:
        sources.setdefault(a, []).append(b)
    points = sorted({a - 1 for a in sources} | {b for _, b in spans})
    return points, sorted(sources.items())


def folded_equations(
    store: Store,
    rows: np.ndarray,
    spans: list[Span],
    runners: dict[int, Runner],
    cls_only: bool,
    options: FitOptions,
) -> dict[Span, NormalEquations]:
    """The folded normal equations (X = m_a, Y = h_b - r_a) of every span over ``rows``."""
    points, plan = _points_and_plan(spans)
    task = dask.delayed(on_shard, pure=False)  # the runners hold a model: not hashed
    settings = (plan, points, options.backend, options.gemm_dtype)
    with dask_client(options.scheduler, options.scheduler_file) as client:
        shared = shared_constant(client, runners)  # the model's blocks: once in the graph
        parts = [
            task(_accumulate, store, points, start, stop, local, cls_only, shared, *settings)
            for local, start, stop in shard_ranges(store.layout, rows)
        ]
        merged = compute_with(client, tree_reduce(parts, _merge), len(parts))
    return {s: ne.to_numpy() for s, ne in merged.items()}


def _holdout(
    local: np.ndarray,
    cls_only: bool,
    runners: dict[int, Runner],
    maps: list[tuple[int, int, np.ndarray, np.ndarray]],
    points: list[int],
    *chunks: np.ndarray,
) -> list[HoldoutSums]:
    position = {k: i for i, k in enumerate(points)}
    out: list[HoldoutSums | None] = [None] * len(maps)
    for i, (a, b, t, bias) in enumerate(maps):
        h_prev, h_b = chunks[position[a - 1]], chunks[position[b]]
        for x, (y,) in _chunks(local, cls_only, runners[a], h_prev, [h_b]):
            sums = HoldoutSums.from_chunk(x, y, t, bias)
            out[i] = sums if out[i] is None else out[i].merge(sums)  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


def _merge_holdout(left: list[HoldoutSums], right: list[HoldoutSums]) -> list[HoldoutSums]:
    return [p.merge(q) for p, q in zip(left, right, strict=True)]


def folded_holdout_sums(
    store: Store,
    indices: np.ndarray,
    cls_only: bool,
    runners: dict[int, Runner],
    maps: list[tuple[int, int, Any, Any]],
    options: FitOptions,
) -> list[HoldoutSums]:
    """Held-out error of folded maps (X = m_a, Y = h_b - r_a) on the samples ``indices``."""
    points, _ = _points_and_plan([(a, b) for a, b, *_ in maps])
    task = dask.delayed(on_shard, pure=False)
    with dask_client(options.scheduler, options.scheduler_file) as client:
        shared_runners, shared_maps = (shared_constant(client, x) for x in (runners, maps))
        settings = (cls_only, shared_runners, shared_maps, points)
        parts = [
            task(_holdout, store, points, start, stop, local, *settings)
            for local, start, stop in shard_ranges(store.layout, indices)
        ]
        return compute_with(client, tree_reduce(parts, _merge_holdout), len(parts))
