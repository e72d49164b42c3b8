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
    """One batch: ``points[k]`` is ``h_k`` with shape ``(B, T, C)``; ``features`` ``(B, F)``.
    With MLP outputs (``extract --mlp-outputs``), ``points[L + a]`` is block a's ``m_a``."""

    points: list[torch.Tensor]
    features: torch.Tensor
    source_shapes: list[tuple[int, ...]]

    def kept(self, blocks: tuple[int, ...]) -> Captured:
        """Only the points ``h_k`` for k in ``blocks`` (``extract --points``); all when empty."""
        if not blocks:
            return self
        return Captured(
            [self.points[k] for k in blocks],
            self.features,
            [self.source_shapes[k] for k in blocks],
        )


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


def mlp_output_hooks(
    model: nn.Module, name: str, captured: dict[int, Any], offset: int
) -> list[Any]:
    """Forward hooks recording each block a's MLP output (after its LayerScale: the module a
    folded map acts on) as ``captured[offset + a]``; refuses blocks that have none."""
    from rba_store.approx.fold_site import fold_site, model_blocks
    from rba_store.errors import UsageError

    def refuse(reason: str) -> UsageError:
        return UsageError(
            f"--mlp-outputs: {name!r} has no MLP output to store ({reason}); it needs timm's "
            "ViT Block or Llama-style decoder layers: drop --mlp-outputs"
        )

    try:
        _, blocks = model_blocks(model)
    except ModelError:
        raise refuse("its blocks are neither ViT blocks nor decoder layers") from None
    handles = []
    for a, block in enumerate(blocks, start=1):
        try:
            site = fold_site(model, (a, a + 1))
        except UsageError as error:
            raise refuse(str(error).split(": ", 1)[-1].split(";")[0]) from None
        assert site is not None
        module = block.get_submodule(site.output)

        def hook(module: nn.Module, args: Any, output: Any, key: int = offset + a) -> None:
            captured[key] = output

        handles.append(module.register_forward_hook(hook))
    return handles


def _supports_prefix_intermediates(model: nn.Module) -> bool:
    method = getattr(model, "forward_intermediates", None)
    if method is None or not isinstance(getattr(model, "blocks", None), nn.Sequential):
        return False
    return "return_prefix_tokens" in inspect.signature(method).parameters


class ActivationCapture:
    """Callable that runs a model on a batch and returns every capture point.

    ``tokens="cls"`` keeps only the class token (the first prefix token) of every point.
    ``mlp_outputs``: each block's MLP output follows ``h0 .. hL`` (``m1 .. mL``).
    """

    def __init__(self, loaded: LoadedModel, tokens: str = "all", mlp_outputs: bool = False) -> None:
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
        self.name, self.mlp_outputs = loaded.name, mlp_outputs
        self.keep: tuple[int, ...] = ()  # extract --points: the h_k returned (empty: all)
        if mlp_outputs:  # refused now, before any work, where blocks have no MLP output
            for handle in mlp_output_hooks(model, loaded.name, {}, 0):
                handle.remove()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> Captured:
        captured: dict[int, Any] = {}
        handles = [self.blocks[0].register_forward_pre_hook(self._pre_hook(captured))]
        if self.method == "hooks":
            for idx, block in enumerate(self.blocks, start=1):
                handles.append(block.register_forward_hook(self._hook(captured, idx)))
        n_points = len(self.blocks) + 1
        if self.mlp_outputs:
            handles += mlp_output_hooks(self.model, self.name, captured, n_points - 1)
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
        raw = [captured[k] for k in range(n_points + (n_points - 1 if self.mlp_outputs else 0))]
        source_shapes = [tuple((r[0] if isinstance(r, tuple | list) else r).shape[1:]) for r in raw]
        points = [_to_nlc(r, self._nhwc) for r in raw]
        if self.tokens == "cls":
            points = [p[:, :1] for p in points]
        return Captured(points, features.flatten(1), source_shapes).kept(self.keep)

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
    last position of each window (as ShortGPT and Gromov et al. measure). ``mlp_outputs``: each
    layer's MLP output follows ``h0 .. hL`` (``m1 .. mL``).
    """

    method = "hooks"

    def __init__(self, loaded: LoadedModel, tokens: str = "all", mlp_outputs: bool = False) -> None:
        from rba_store.extract.language_model import decoder_parts

        if tokens not in LANGUAGE_TOKENS:
            raise ModelError(
                f"--tokens {tokens!r} is not valid for a language model; use all or last"
            )
        self.model, self.tokens = loaded.module, tokens
        _, self.layers, self.norm = decoder_parts(self.model)
        self.name, self.mlp_outputs = loaded.name, mlp_outputs
        self.keep: tuple[int, ...] = ()  # extract --points: the h_k returned (empty: all)
        if mlp_outputs:  # refused now, before any work, where layers have no MLP output
            for handle in mlp_output_hooks(self.model, loaded.name, {}, 0):
                handle.remove()

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> Captured:
        captured: dict[int, torch.Tensor] = {}

        def first_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured[0] = args[0] if args else kwargs["hidden_states"]

        handles = [self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        for idx, layer in enumerate(self.layers, start=1):
            handles.append(layer.register_forward_hook(self._hook(captured, idx)))
        n_points = len(self.layers) + 1
        if self.mlp_outputs:
            handles += mlp_output_hooks(self.model, self.name, captured, n_points - 1)
        try:
            self.model(input_ids=input_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        points = [captured[k] for k in range(n_points + (n_points - 1 if self.mlp_outputs else 0))]
        features = self.norm(points[n_points - 1][:, -1:]).flatten(1)
        if self.tokens == "last":
            points = [p[:, -1:] for p in points]
        return Captured(points, features, [tuple(p.shape[1:]) for p in points]).kept(self.keep)

    @staticmethod
    def _hook(store: dict[int, Any], idx: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store[idx] = output[0] if isinstance(output, tuple | list) else output

        return hook
