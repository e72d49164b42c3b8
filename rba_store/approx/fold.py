"""Folded maps multiplied into the weights: the standard architecture with fewer blocks.

For span (a, b] with a >= 1 the map acts on block a's MLP output ``m = (z W^T + w) * g`` (timm:
``ls2(fc2(z))`` with LayerScale ``g``; Llama: ``down_proj(z)``, g = 1). ``m T + c`` is again one
linear layer, ``W' = T^T diag(g) W`` and ``w' = (w * g) T + c``; the LayerScale becomes ones.
Blocks a+1..b are deleted. A span from h0 folds into the embedding: the patch projection, class
(and register) tokens and position embedding of a ViT, the token embedding of a decoder. What
comes out is the model's own class with fewer blocks: a timm ``VisionTransformer`` rebuilt from
its keyword arguments (``depth = L - k``), or a Hugging Face decoder that ``from_pretrained``
loads (layers re-indexed, ``num_hidden_layers`` and ``layer_types`` following the removal, as
:func:`rba_store.approx.decoder.replace_decoder_spans` does for inserted maps).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rba_store.approx.decoder import kept_layers, replace_decoder_spans
from rba_store.approx.fold_site import check_fold_maps, fold_site, model_blocks, refusal
from rba_store.approx.surgery import SpanMap
from rba_store.errors import ModelError, UsageError

VIT_CLASS = "timm.models.vision_transformer.VisionTransformer"


def _check_maps(maps: Sequence[SpanMap]) -> None:
    for m in maps:
        if m.t is not None and not m.folded:
            a, b = m.span
            raise UsageError(
                f"the map of span {a}:{b} was fitted without --fold (it maps h{a} to h{b}); "
                f"fit it with 'rba-store fit --span {a}:{b} --fold', or apply without --fold"
            )


def _as64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def _pair64(t: Any, c: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(t, np.float64)), torch.as_tensor(np.asarray(c, np.float64))


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _fold_linear(block: nn.Module, scale: str | None, linear: str, t: Any, c: Any) -> None:
    """``layer(z) * g`` followed by ``@ T + c`` as one layer (in float64, stored as the model's
    dtype); a LayerScale ``g`` becomes ones."""
    t64, c64 = (
        torch.as_tensor(np.asarray(t, np.float64)),
        torch.as_tensor(np.asarray(c, np.float64)),
    )
    layer = block.get_submodule(linear)
    gamma = getattr(block.get_submodule(scale), "gamma", None) if scale else None
    g = _as64(gamma) if gamma is not None else torch.ones(t64.shape[0], dtype=torch.float64)
    _set(layer.weight, t64.T @ (g[:, None] * _as64(layer.weight)))
    w = _as64(layer.bias) * g if layer.bias is not None else torch.zeros_like(g)
    if layer.bias is not None:
        _set(layer.bias, w @ t64 + c64)
    elif c64.abs().max() > 0:
        raise ModelError(f"{linear} has no bias to take the map's offset")
    if gamma is not None:
        _set(gamma, torch.ones_like(g))


def _fold_vit_embedding(model: nn.Module, t: Any, c: Any) -> None:
    """h0 = [prefix tokens; patch projection] + position embedding, each part linear."""
    t64, c64 = (
        torch.as_tensor(np.asarray(t, np.float64)),
        torch.as_tensor(np.asarray(c, np.float64)),
    )
    proj = model.patch_embed.proj
    _set(proj.weight, torch.einsum("dchw,de->echw", _as64(proj.weight), t64))
    covers_all = model.pos_embed is not None and not model.no_embed_class
    if proj.bias is not None:
        offset = c64 if model.pos_embed is None else torch.zeros_like(c64)
        _set(proj.bias, _as64(proj.bias) @ t64 + offset)
    if model.pos_embed is not None:
        _set(model.pos_embed, _as64(model.pos_embed) @ t64 + c64)
    for name in ("cls_token", "reg_token"):
        token = getattr(model, name, None)
        if token is not None:
            _set(token, _as64(token) @ t64 + (0 if covers_all else c64))


def _fold_token_embedding(model: nn.Module, t: Any, c: Any) -> None:
    weight = model.get_input_embeddings().weight
    t64, c64 = (
        torch.as_tensor(np.asarray(t, np.float64)),
        torch.as_tensor(np.asarray(c, np.float64)),
    )
    _set(weight, _as64(weight) @ t64 + c64)


def fold_model(model: nn.Module, maps: Sequence[SpanMap]) -> nn.Module:
    """A copy of ``model`` with every folded map multiplied into its weights and each span's
    blocks deleted (identity maps: the blocks are just deleted); the model's own class."""
    _check_maps(maps)
    kind, blocks = model_blocks(model)
    check_fold_maps(model, maps)
    if kind == "decoder":  # copies, deletes and re-indexes the layers, updates the config
        new = replace_decoder_spans(model, [SpanMap(m.span) for m in maps])
        _, new_blocks = model_blocks(new)
        position = {i: p for p, i in enumerate(kept_layers(len(blocks), maps))}
    else:
        new = copy.deepcopy(model)
        new_blocks, position = new.blocks, {i: i for i in range(len(blocks))}
    for m in maps:
        if m.t is None:
            continue
        a = m.span[0]
        bias = m.bias if m.bias is not None else np.zeros(m.t.shape[1])
        site = fold_site(model, m.span, bool(np.any(bias)))
        if site is None:
            (_fold_vit_embedding if kind == "vit" else _fold_token_embedding)(new, m.t, bias)
        else:
            _fold_linear(new_blocks[position[a - 1]], site.scale, site.linear, m.t, bias)
    if kind == "vit":
        removed = {i for m in maps for i in range(*m.span)}
        new.blocks = nn.Sequential(*(b for i, b in enumerate(new.blocks) if i not in removed))
    return new.eval()


@contextlib.contextmanager
def recording_vit_kwargs() -> Iterator[list[dict[str, Any]]]:
    """The keyword arguments of the first ``VisionTransformer`` built inside the block."""
    from timm.models.vision_transformer import VisionTransformer

    seen: list[dict[str, Any]] = []
    original = VisionTransformer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if not seen:
            seen.append({"args": args, **kwargs})
        original(self, *args, **kwargs)

    VisionTransformer.__init__ = init  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        VisionTransformer.__init__ = original  # type: ignore[method-assign]


def vit_config(model: nn.Module, kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """``config.json`` of a folded ViT: ``VisionTransformer(**kwargs)`` rebuilds it."""
    kwargs = dict(kwargs)
    if kwargs.pop("args", ()):
        raise ModelError(f"{name!r} was built with positional arguments; cannot record them")
    kwargs["depth"] = len(model.blocks)
    head = model.head
    kwargs["num_classes"] = head.out_features if isinstance(head, nn.Linear) else 0
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ModelError(
            f"the VisionTransformer arguments of {name!r} are not JSON ({e}); apply without "
            "--fold writes the model with its recipe instead"
        ) from e
    return {"architecture": VIT_CLASS, "base_model": name, "kwargs": kwargs}


def load_folded_vit(path: str | Path) -> nn.Module:
    """A folded ViT from its folder: ``VisionTransformer(**kwargs)`` plus ``load_state_dict``
    (what a user without rba-store does)."""
    from safetensors.torch import load_file

    from rba_store.extract.torchvision_compat import import_timm

    import_timm()
    from timm.models.vision_transformer import VisionTransformer

    config = json.loads((Path(path) / "config.json").read_text())
    model = VisionTransformer(**config["kwargs"])
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
    return model.eval()


def fold_refusal_for(model: nn.Module, span: tuple[int, int]) -> str | None:
    """Why span (a, b] cannot fold in ``model`` (None: it can)."""
    try:
        fold_site(model, span)
    except UsageError as e:
        return str(e)
    return None


__all__ = ["fold_model", "fold_refusal_for", "load_folded_vit", "recording_vit_kwargs", "refusal"]
