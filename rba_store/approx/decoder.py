"""Span replacement in Hugging Face decoders, keeping generation (and its cache) correct.

Replacing span ``(a, b]`` deletes layers a..b-1 (0-based). A fitted map ``h_a -> h_b`` is applied
to the output of the last layer kept before the span (or, for a span that starts at ``h0``, to
the input of the first layer kept after it), so the decoder keeps its own class, a plain list of
decoder layers and no extra module in it. The kept layers are re-indexed (their attention's
``layer_idx``, which addresses the key/value cache) and the config follows the removal
(``num_hidden_layers``; ``layer_types``, and so sliding windows, of the kept layers only), so
``generate()`` with its cache works on the smaller model.

:class:`DecoderNetwork` runs such a model from any point of its residual stream, as
:class:`rba_store.approx.network.SplitNetwork` does for ViTs: a forward pass of the original
model on a batch records each layer's call (attention mask, positions, rotary embeddings), and a
layer is then called on any residual stream with those arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rba_store.approx.fold_site import DECODER_SITE, MappedOutput, mapped_block
from rba_store.approx.network import walk
from rba_store.approx.surgery import SpanMap, check_span_maps
from rba_store.errors import UsageError
from rba_store.extract.language_model import decoder_parts


class MappedLayer(nn.Module):
    """A decoder layer with linear maps applied to its input (``pre``) and output (``post``)."""

    def __init__(self, layer: nn.Module, pre: Sequence[nn.Module], post: Sequence[nn.Module]):
        super().__init__()
        self.layer = layer
        self.pre = nn.ModuleList(pre)
        self.post = nn.ModuleList(post)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        for module in self.pre:
            hidden = module(hidden)
        out = self.layer(hidden, *rest, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        for module in self.post:
            first = module(first)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def __getattr__(self, name: str) -> Any:  # attention_type and the like: the layer's own
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)


def _layers_attribute(base: nn.Module) -> str:
    return "layers" if isinstance(getattr(base, "layers", None), nn.ModuleList) else "h"


def kept_layers(n_layers: int, maps: Sequence[SpanMap]) -> list[int]:
    removed = {i for m in maps for i in range(*m.span)}
    return [i for i in range(n_layers) if i not in removed]


def replace_decoder_spans(model: nn.Module, maps: Sequence[SpanMap]) -> nn.Module:
    """A copy of a causal LM with each span's layers removed and its map (if any) applied."""
    _, layers, _ = decoder_parts(model)
    n = len(layers)
    check_span_maps(maps, n, int(model.config.hidden_size))
    kept = kept_layers(n, maps)
    if not kept:
        raise UsageError(f"the spans remove all {n} layers; keep at least one")
    new = copy.deepcopy(model)
    base, layers, _ = decoder_parts(new)
    pre: dict[int, list[nn.Module]] = {i: [] for i in kept}
    post: dict[int, list[nn.Module]] = {i: [] for i in kept}
    for m in sorted(maps, key=lambda m: m.span):
        if m.t is None:
            continue
        a, b = m.span
        before = [i for i in kept if i < a]
        if before:
            post[before[-1]].append(m.module())
        else:
            pre[next(i for i in kept if i >= b)].append(m.module())
    new_layers = []
    for position, i in enumerate(kept):
        layer = layers[i]
        for module in layer.modules():  # the cache is addressed by these indices
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
        new_layers.append(MappedLayer(layer, pre[i], post[i]) if pre[i] or post[i] else layer)
    setattr(base, _layers_attribute(base), nn.ModuleList(new_layers))
    config = new.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    return new.eval()


@dataclass(frozen=True)
class FoldedLayer:
    """Layer ``index`` with a folded map on its MLP output (a step of :class:`DecoderNetwork`)."""

    index: int
    layer: nn.Module


class DecoderNetwork:
    """The original decoder's layers with ``maps`` in place of their spans (nothing copied).

    ``stem(input_ids)`` must be called for each batch first: it records every layer's call.
    """

    def __init__(self, model: nn.Module, maps: Sequence[SpanMap] = ()) -> None:
        self.model = model
        _, self.layers, self.norm = decoder_parts(model)
        self.n_blocks = len(self.layers)
        check_span_maps(maps, self.n_blocks, int(model.config.hidden_size))
        self.maps = sorted(maps, key=lambda m: m.span)
        self._replaced = dict(self.entry(m) for m in self.maps)
        self._calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def entry(self, span_map: SpanMap) -> tuple[int, tuple[int, Any]]:
        """``(start, (end, step))`` of a map; a folded map of (a, b] (a >= 1) is layer a with the
        map on its MLP output, run from a-1 with layer a's call arguments."""
        a, b = span_map.span
        if span_map.folded and span_map.t is not None and a >= 1:
            layer = mapped_block(self.layers[a - 1], DECODER_SITE, span_map.t, span_map.bias)
            return a - 1, (b, FoldedLayer(a - 1, layer))
        if span_map.folded and span_map.t is not None:  # on h0: T kept in float64, as folded
            return a, (b, MappedOutput(nn.Identity(), span_map.t, span_map.bias))
        return a, (b, span_map.module())

    def with_map(self, span_map: SpanMap) -> DecoderNetwork:
        network = DecoderNetwork(self.model, [*self.maps, span_map])
        network._calls = self._calls
        return network

    def steps(self, start: int) -> Iterator[tuple[Any, int]]:
        """The modules from point ``start`` on, each with the point it ends at (layer index k
        for an original layer, a map module otherwise)."""
        return walk(start, self.n_blocks, self._replaced, lambda k: k)

    @torch.inference_mode()
    def stem(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``h_0`` of a batch of windows; records each layer's call arguments."""
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls.append((hidden, args[1:], rest))  # type: ignore[arg-type]

        handles = [
            layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers
        ]
        try:
            self.model(input_ids=input_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        self._calls = [(args, kwargs) for _, args, kwargs in calls]  # type: ignore[misc]
        return calls[0][0]  # type: ignore[return-value]

    def _apply(self, step: Any, h: torch.Tensor) -> torch.Tensor:
        if isinstance(step, FoldedLayer):
            layer, step = step.layer, step.index
        elif isinstance(step, int):
            layer = self.layers[step]
        else:
            return step(h)
        args, kwargs = self._calls[step]
        out = layer(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def step_function(self, step: Any) -> Any:
        """``h -> next h`` for a step (as :meth:`entry` gives it) on the recorded batch."""
        return lambda h: self._apply(step, h)

    @torch.inference_mode()
    def run(self, h: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """From ``h_start`` to ``h_stop`` (default: the last point)."""
        for step, end in self.steps(start):
            if stop is not None and end > stop:
                break
            h = self._apply(step, h)
        return h

    @torch.inference_mode()
    def all_points(self, h0: torch.Tensor) -> dict[int, torch.Tensor]:
        out, h = {0: h0}, h0
        for step, end in self.steps(0):
            h = self._apply(step, h)
            out[end] = h
        return out

    @torch.inference_mode()
    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """The LM head's logits from ``h_L`` (final norm, then the head)."""
        return self.model.get_output_embeddings()(self.norm(h_last))
