"""Capture the residual stream after every block, and the head's input, in one forward pass.

ViT-family models go through timm's ``forward_intermediates`` with the prefix (class, register)
tokens kept; other models through forward hooks on their blocks. Either way a pre-hook on the
first block captures ``h0`` (the stem's output, after position embedding and any pre-norm).
Outputs are token-major (``NLC``): a CNN block's ``(C, H, W)`` output becomes ``(H*W, C)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rba_store.errors import ModelError
from rba_store.extract.models import LoadedModel, find_blocks, has_class_token

TOKENS = ("all", "cls")
LANGUAGE_TOKENS = ("all", "last")


@dataclass
class Captured:
    """One batch: ``points[k]`` is ``h_k`` with shape ``(B, T, C)``; ``features`` ``(B, F)``."""

    points: list[torch.Tensor]
    features: torch.Tensor
    source_shapes: list[tuple[int, ...]]


def _to_nlc(x: Any, nhwc: bool) -> torch.Tensor:
    if isinstance(x, tuple | list):
        x = x[0]
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.flatten(1, 2) if nhwc else x.flatten(2).transpose(1, 2)
    if x.ndim == 2:
        return x[:, None, :]
    raise ModelError(f"a block output of shape {tuple(x.shape)} cannot be stored as tokens")


def _supports_prefix_intermediates(model: nn.Module) -> bool:
    method = getattr(model, "forward_intermediates", None)
    if method is None or not isinstance(getattr(model, "blocks", None), nn.Sequential):
        return False
    return "return_prefix_tokens" in inspect.signature(method).parameters


class ActivationCapture:
    """Callable that runs a model on a batch and returns every capture point.

    ``tokens="cls"`` keeps only the class token (the first prefix token) of every point.
    """

    def __init__(self, loaded: LoadedModel, tokens: str = "all") -> None:
        if tokens not in TOKENS:
            raise ModelError(f"--tokens {tokens!r} is not valid; use one of {', '.join(TOKENS)}")
        model = loaded.module
        if tokens == "cls" and not has_class_token(model):
            raise ModelError(
                f"--tokens cls needs a class token, and {loaded.name!r} has none; use --tokens all"
            )
        self.model = model
        self.tokens = tokens
        self.blocks = [b for _, b in find_blocks(model, loaded.name)]
        self.method = "forward_intermediates" if _supports_prefix_intermediates(model) else "hooks"
        self._nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> Captured:
        captured: dict[int, Any] = {}
        handles = [self.blocks[0].register_forward_pre_hook(self._pre_hook(captured))]
        if self.method == "hooks":
            for idx, block in enumerate(self.blocks, start=1):
                handles.append(block.register_forward_hook(self._hook(captured, idx)))
        try:
            if self.method == "forward_intermediates":
                final, inter = self.model.forward_intermediates(
                    x, return_prefix_tokens=True, norm=False, output_fmt="NLC"
                )
                for idx, item in enumerate(inter, start=1):
                    spatial, prefix = item if isinstance(item, tuple) else (item, None)
                    captured[idx] = spatial if prefix is None else torch.cat([prefix, spatial], 1)
            else:
                final = self.model.forward_features(x)
            features = self.model.forward_head(final, pre_logits=True)
        finally:
            for handle in handles:
                handle.remove()
        raw = [captured[k] for k in range(len(self.blocks) + 1)]
        source_shapes = [tuple((r[0] if isinstance(r, tuple | list) else r).shape[1:]) for r in raw]
        points = [_to_nlc(r, self._nhwc) for r in raw]
        if self.tokens == "cls":
            points = [p[:, :1] for p in points]
        return Captured(points=points, features=features.flatten(1), source_shapes=source_shapes)

    @staticmethod
    def _pre_hook(store: dict[int, Any]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            store[0] = args[0]

        return hook

    @staticmethod
    def _hook(store: dict[int, Any], idx: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store[idx] = output

        return hook


class DecoderCapture:
    """The residual stream of a causal language model (Hugging Face decoder), one forward pass.

    A pre-hook on the first layer takes ``h0`` (its input); a hook on every layer its output, so
    ``hL`` is the last layer's output *before* the final norm. ``features`` are what the LM head
    sees at the last position (the final norm of ``hL`` there). ``tokens="last"`` keeps only the
    last position of each window (as ShortGPT and Gromov et al. measure).
    """

    method = "hooks"

    def __init__(self, loaded: LoadedModel, tokens: str = "all") -> None:
        from rba_store.extract.language_model import decoder_parts

        if tokens not in LANGUAGE_TOKENS:
            raise ModelError(
                f"--tokens {tokens!r} is not valid for a language model; use all or last"
            )
        self.model, self.tokens = loaded.module, tokens
        _, self.layers, self.norm = decoder_parts(self.model)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> Captured:
        captured: dict[int, torch.Tensor] = {}

        def first_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured[0] = args[0] if args else kwargs["hidden_states"]

        handles = [self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        for idx, layer in enumerate(self.layers, start=1):
            handles.append(layer.register_forward_hook(self._hook(captured, idx)))
        try:
            self.model(input_ids=input_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        points = [captured[k] for k in range(len(self.layers) + 1)]
        features = self.norm(points[-1][:, -1:]).flatten(1)
        if self.tokens == "last":
            points = [p[:, -1:] for p in points]
        return Captured(points, features, [tuple(p.shape[1:]) for p in points])

    @staticmethod
    def _hook(store: dict[int, Any], idx: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store[idx] = output[0] if isinstance(output, tuple | list) else output

        return hook
