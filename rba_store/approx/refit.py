"""Re-fitting maps on the network as it is: X from the network with spans already replaced.

The reference fits every map on the original network's activations, so the errors of earlier
maps compound. Here, for a span ``(a, b]`` of a network whose earlier spans are replaced, X is
that network's own ``h_a`` and Y the original ``h_b`` (what the span should reproduce). One pass
over the store: each shard's stored activations at the first replaced span's start are run
through the current network up to every source point, in float32 as the model runs, and the
normal equations accumulate in float64 as in ``fit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rba_store.approx.network import SplitNetwork
from rba_store.approx.surgery import SpanMap
from rba_store.solve import NormalEquations, Solution, solve
from rba_store.store import Store
from rba_store.store.reading import shard_ranges
from rba_store.store.selection import usable_samples

Span = tuple[int, int]


def changed_sources(net: SplitNetwork, spans: Sequence[Span]) -> list[Span]:
    """The spans whose source ``h_a`` differs from the original's (a replaced span ends before)."""
    ends = [m.span[1] for m in net.maps]
    return [(a, b) for a, b in spans if any(end <= a for end in ends)]


def refit_maps(
    store: Store, net: SplitNetwork, spans: Sequence[Span]
) -> dict[Span, tuple[SpanMap, Solution]]:
    """Least-squares maps (through the origin, like the reference) from the current network's
    ``h_a`` to the original ``h_b`` for every span, over all tokens of the usable samples."""
    if not spans or not net.maps:
        return {}
    first = net.maps[0].span[0]  # up to this point the network is the original one
    targets: dict[int, list[int]] = {}
    for a, b in spans:
        targets.setdefault(a, []).append(b)
    stop = max(targets)
    wanted = sorted({first, *(b for bs in targets.values() for b in bs)})
    totals: dict[int, NormalEquations] = {}
    for local, start, end in shard_ranges(store.layout, usable_samples(store, False)):
        stored = dict(zip(wanted, store.read_points(wanted, start, end), strict=True))
        h = torch.from_numpy(np.ascontiguousarray(stored[first][local], dtype=np.float32))
        current = {first: h}
        for module, point in net.steps(first):
            if point > stop:
                break
            with torch.inference_mode():
                h = module(h)
            current[point] = h
        for a, bs in targets.items():
            x = current[a].numpy().reshape(-1, h.shape[-1])
            y = np.concatenate([stored[b][local].reshape(-1, h.shape[-1]) for b in bs], axis=1)
            ne = NormalEquations.from_chunk(x, y)
            totals[a] = totals[a].merge(ne) if a in totals else ne
    maps = {}
    for a, bs in targets.items():
        width = store.layout.point(a).n_channels
        for i, b in enumerate(bs):
            solution = solve(totals[a].select_outputs(i * width, (i + 1) * width))
            maps[(a, b)] = (SpanMap((a, b), solution.t, solution.bias), solution)
    return maps
