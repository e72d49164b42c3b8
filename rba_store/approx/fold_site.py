"""Where a folded map acts: the MLP output of the last kept block, or the linear embedding.

A pre-norm residual block a computes ``r_a = h_{a-1} + attention(...)`` (the residual after the
attention) and ``h_a = r_a + m_a`` with ``m_a`` its MLP output (after its LayerScale, if any). A
folded map of span (a, b] is fitted so that ``h_b ≈ r_a + m_a T + c``; applied inside block a
(:func:`mapped_block`), it stands for blocks a+1..b, and it can be multiplied into the MLP's last
linear layer (:mod:`rba_store.approx.fold`). A span that starts at ``h0`` maps the embedding's
output, which folds into the embedding where that is linear.

This module knows the two block types that fold (timm's ``Block``, Llama-style decoder layers),
runs block a on stored ``h_{a-1}`` to get ``(r_a, m_a)`` (:class:`MlpOutputs`), and refuses a
span that cannot fold in one line naming it and the alternative.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rba_store.approx.surgery import SpanMap
from rba_store.errors import UsageError

Span = tuple[int, int]
# Decoders whose h0 is the token embedding alone (no position embedding, no scaling).
LINEAR_EMBEDDING_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class FoldSite:
    """The submodules of a block that folding uses (attribute paths inside the block)."""

    residual: str  # the module whose input is r_a (the MLP's pre-norm)
    output: str  # the module whose output is m_a
    linear: str  # the MLP's last linear layer, where T is folded
    scale: str | None  # a LayerScale between them (timm ``ls2``), folded too


VIT_SITE = FoldSite("norm2", "ls2", "mlp.fc2", "ls2")
DECODER_SITE = FoldSite("post_attention_layernorm", "mlp", "mlp.down_proj", None)


def refusal(span: Span, reason: str) -> UsageError:
    a, b = span
    return UsageError(
        f"span {a}:{b} cannot be folded: {reason}; fit it without --fold (the inserted map "
        "replaces the span instead)"
    )


def model_blocks(model: nn.Module) -> tuple[str, Sequence[nn.Module]]:
    """``("vit", model.blocks)`` or ``("decoder", layers)``."""
    if isinstance(getattr(model, "blocks", None), nn.Sequential):
        return "vit", model.blocks
    from rba_store.extract.language_model import decoder_parts

    return "decoder", decoder_parts(model)[1]


def fold_site(model: nn.Module, span: Span, bias: bool = False) -> FoldSite | None:
    """The site of span (a, b]'s folded map (None: the embedding, a = 0); refuses what cannot
    fold: another block type, a non-linear embedding, a bias where the layer has none."""
    kind, blocks = model_blocks(model)
    a, _ = span
    if a == 0:
        _check_embedding(model, kind, span)
        return None
    block = blocks[a - 1]
    if kind == "vit":
        from timm.models.vision_transformer import Block, LayerScale

        if type(block) is not Block or not isinstance(block.ls2, LayerScale | nn.Identity):
            raise refusal(span, f"block {a} is a {type(block).__name__}, not timm's Block")
        if not isinstance(getattr(block.mlp, "fc2", None), nn.Linear):
            raise refusal(span, f"block {a}'s MLP has no final nn.Linear fc2")
        return VIT_SITE
    mlp = getattr(block, "mlp", None)
    if not isinstance(getattr(mlp, "down_proj", None), nn.Linear) or not hasattr(
        block, "post_attention_layernorm"
    ):
        raise refusal(span, f"layer {a} is not a Llama-style layer (mlp.down_proj)")
    if hasattr(block, "post_feedforward_layernorm"):
        raise refusal(span, f"layer {a} normalises its MLP output (non-linear)")
    if bias and mlp.down_proj.bias is None:
        raise refusal(span, f"layer {a}'s down_proj has no bias to take the fit's; drop --bias")
    return DECODER_SITE


def _check_embedding(model: nn.Module, kind: str, span: Span) -> None:
    if kind == "vit":
        from timm.models.vision_transformer import PatchEmbed

        stem = model.patch_embed
        if not isinstance(model.norm_pre, nn.Identity):
            raise refusal(span, "h0 comes after the ViT's non-linear pre-norm (norm_pre)")
        if type(stem) is not PatchEmbed or not isinstance(stem.norm, nn.Identity):
            raise refusal(span, "the patch embedding is not a plain linear projection")
        if model.pos_embed is None and stem.proj.bias is None:
            raise refusal(span, "the embedding has no position embedding or bias for the offset")
        return
    config = model.config
    if config.model_type not in LINEAR_EMBEDDING_TYPES:
        raise refusal(span, f"h0 of a {config.model_type!r} decoder is not its token embedding")
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        raise refusal(span, "the token embedding is tied to the LM head (folding would untie it)")


def check_fold_maps(model: nn.Module, maps: Sequence[SpanMap]) -> None:
    """Every folded map's site exists in the model and stays (no other span removes block a)."""
    for m in maps:
        if not m.folded or m.t is None:
            continue
        fold_site(model, m.span, bias=bool(m.bias is not None and m.bias.any()))
        a = m.span[0]
        for other in maps:
            if other is not m and a >= 1 and other.span[0] < a <= other.span[1]:
                raise refusal(
                    m.span,
                    f"span {other.span[0]}:{other.span[1]} removes block {a}, whose MLP "
                    "would hold the map",
                )


class MappedOutput(nn.Module):
    """A module's output followed by the map ``y @ T + bias``: the unfolded computation (T kept
    in float64, applied in the dtype the model runs in)."""

    def __init__(self, inner: nn.Module, t: Any, bias: Any) -> None:
        super().__init__()
        self.inner = inner
        t = torch.as_tensor(np.asarray(t, dtype=np.float64))
        b = torch.zeros(t.shape[1], dtype=torch.float64) if bias is None else bias
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("bias", torch.as_tensor(np.asarray(b, np.float64)), persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.inner(*args, **kwargs)
        return y @ self.t.to(y.dtype) + self.bias.to(y.dtype)


def mapped_block(block: nn.Module, site: FoldSite, t: Any, bias: Any) -> nn.Module:
    """Block a with the map applied to its MLP output (weights shared, nothing copied)."""
    new = copy.copy(block)
    new._modules = dict(block._modules)  # a shallow copy of the block's own submodule table
    setattr(new, site.output, MappedOutput(getattr(block, site.output), t, bias))
    return new


class _Tap(nn.Module):
    """Records a module's input (``before``) or output into ``found[key]``."""

    def __init__(self, inner: nn.Module, found: dict[str, Any], key: str, before: bool) -> None:
        super().__init__()
        self.inner, self.found, self.key, self.before = inner, found, key, before

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.found[self.key] = args[0] if self.before else out
        return out


class MlpOutputs:
    """Runs block a (timm 0-based ``a - 1``) on ``h_{a-1}``: ``(r_a, m_a)`` as float32 tensors.

    Safe in threads: each call runs a shallow copy of the block whose two submodules record
    what they see (no hooks on shared modules). A decoder layer's other arguments (positions,
    rotary embeddings, causal mask) are recorded once, for windows of ``n_tokens``, from a
    forward pass of the model on zeros: they do not depend on the tokens of an unpadded window.
    """

    def __init__(self, model: nn.Module, a: int, n_tokens: int) -> None:
        self.kind, blocks = model_blocks(model)
        self.block = blocks[a - 1]
        self.site = VIT_SITE if self.kind == "vit" else DECODER_SITE
        self.call: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        if self.kind == "decoder":
            seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

            def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                seen.append((args[1:], kwargs))

            handle = self.block.register_forward_pre_hook(record, with_kwargs=True)
            try:
                with torch.inference_mode():
                    model(input_ids=torch.zeros(1, n_tokens, dtype=torch.long), use_cache=False)
            finally:
                handle.remove()
            self.call = seen[0]

    @torch.inference_mode()
    def __call__(self, h_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        block = copy.copy(self.block)
        block._modules = dict(self.block._modules)
        residual, output = self.site.residual, self.site.output
        setattr(block, residual, _Tap(getattr(self.block, residual), found, "r", before=True))
        setattr(block, output, _Tap(getattr(self.block, output), found, "m", before=False))
        args, kwargs = self.call
        block(h_prev, *args, **kwargs)
        return found["r"], found["m"]
