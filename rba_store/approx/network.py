"""A ViT with spans replaced, run from any point of its residual stream.

Point ``k`` is ``h_k``, the residual stream after ``k`` of the original blocks (``h_0``: the stem's
output, as the extractor stores it). With spans replaced, the points inside a replaced span no
longer exist; every other point does, so a candidate span ``(a, b]`` can be tried by taking
``h_a`` of the current network, applying the candidate's map and running only what comes after
``b`` — the blocks before ``a`` are not run again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from rba_store.approx.fold_site import VIT_SITE, MappedOutput, mapped_block
from rba_store.approx.surgery import SpanMap, check_span_maps


def walk(
    start: int, n_blocks: int, replaced: dict[int, tuple[int, Any]], block: Callable[[int], Any]
) -> Iterator[tuple[Any, int]]:
    """From point ``start``: each original block (``block(k)``) or the map replacing the span
    that starts there (``replaced[k] = (end, module)``), with the point it ends at."""
    k = start
    while k < n_blocks:
        if k in replaced:
            end, module = replaced[k]
            yield module, end
            k = end
        else:
            yield block(k), k + 1
            k += 1


class SplitNetwork:
    """The original model's modules with ``maps`` in place of their spans (nothing copied)."""

    def __init__(self, model: nn.Module, maps: Sequence[SpanMap] = ()) -> None:
        self.model = model
        self.n_blocks = len(model.blocks)
        width = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))
        check_span_maps(maps, self.n_blocks, width)
        self.maps = sorted(maps, key=lambda m: m.span)
        self._replaced = dict(self.entry(m) for m in self.maps)

    def entry(self, span_map: SpanMap) -> tuple[int, tuple[int, nn.Module]]:
        """``(start, (end, module))``: the point a map's module starts from, the one it ends at.
        A folded map of (a, b] (a >= 1) is block a with the map on its MLP output, from a-1."""
        a, b = span_map.span
        if span_map.folded and span_map.t is not None and a >= 1:
            block = mapped_block(self.model.blocks[a - 1], VIT_SITE, span_map.t, span_map.bias)
            return a - 1, (b, block)
        if span_map.folded and span_map.t is not None:  # on h0: T kept in float64, as folded
            return a, (b, MappedOutput(nn.Identity(), span_map.t, span_map.bias))
        return a, (b, span_map.module())

    @staticmethod
    def step_function(step: nn.Module) -> nn.Module:
        """``h -> next h`` for a step (as :meth:`entry` gives it)."""
        return step

    def with_map(self, span_map: SpanMap) -> SplitNetwork:
        return SplitNetwork(self.model, [*self.maps, span_map])

    def points(self) -> list[int]:
        """The points that exist in this network (not inside a replaced span)."""
        return [0, *(end for _, end in self.steps(0))]

    def steps(self, start: int) -> Iterator[tuple[nn.Module, int]]:
        """The modules from point ``start`` on, each with the point it ends at."""
        return walk(start, self.n_blocks, self._replaced, lambda k: self.model.blocks[k])

    @torch.inference_mode()
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``h_0`` of a batch of images (patch embedding, position embedding, pre-norm)."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    @torch.inference_mode()
    def run(self, h: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """From ``h_start`` to ``h_stop`` (default: the last point)."""
        for module, end in self.steps(start):
            if stop is not None and end > stop:
                break
            h = module(h)
        return h

    @torch.inference_mode()
    def all_points(self, h0: torch.Tensor) -> dict[int, torch.Tensor]:
        """``h_k`` at every point that exists, from ``h_0``."""
        out, h = {0: h0}, h0
        for module, end in self.steps(0):
            h = module(h)
            out[end] = h
        return out

    @torch.inference_mode()
    def features(self, h_last: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        """Final norm, pooling and head (``pre_logits``: the head's input) from ``h_L``."""
        return self.model.forward_head(self.model.norm(h_last), pre_logits=pre_logits)
