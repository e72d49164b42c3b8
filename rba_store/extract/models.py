"""Building models (timm names, local checkpoints, the embedded default); finding their blocks."""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rba_store.errors import ModelError, NotFoundError, UnknownModelError
from rba_store.extract.torchvision_compat import import_timm

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in eval mode with where its weights came from and its resolved data config."""

    module: nn.Module
    name: str
    weights: dict[str, Any]  # {"source": "embedded"|"checkpoint"|"pretrained"|"random", ...}
    data_config: dict[str, Any] = field(default_factory=dict)
    block_names: list[str] = field(default_factory=list)
    family: str = "vision"  # or "language": a Hugging Face decoder (extract/language_model.py)
    tokenizer: Any = None  # a language model's tokenizer

    def describe(self) -> dict[str, Any]:
        if self.family == "language":
            from rba_store.extract.language_model import describe_language_model

            return describe_language_model(self)
        module = self.module
        return {
            "name": self.name,
            "weights": self.weights,
            "n_blocks": len(self.block_names),
            "block_names": self.block_names,
            "num_prefix_tokens": int(getattr(module, "num_prefix_tokens", 0)),
            "has_class_token": has_class_token(module),
            "num_classes": int(getattr(module, "num_classes", 0)),
        }


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def find_blocks(model: nn.Module, model_name: str = "model") -> list[tuple[str, nn.Module]]:
    """The model's blocks in execution order, as ``(block_name, module)`` pairs.

    ViT-family models have ``.blocks``; staged models (ConvNeXt, Swin) ``.stages[i].blocks``;
    ResNets ``.layer1`` … ``.layer4``.
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList):
        found = []
        for s_idx, stage in enumerate(stages):
            inner = getattr(stage, "blocks", None)
            if isinstance(inner, nn.Sequential | nn.ModuleList):
                found += [(f"stages.{s_idx}.blocks.{i}", b) for i, b in enumerate(inner)]
        if found:
            return found
    layers = [(n, getattr(model, n, None)) for n in ("layer1", "layer2", "layer3", "layer4")]
    if all(isinstance(m, nn.Sequential) for _, m in layers):
        return [(f"{n}.{i}", b) for n, layer in layers for i, b in enumerate(layer)]
    raise ModelError(
        f"cannot find the blocks of {model_name!r}: it has no .blocks, .stages[i].blocks or "
        ".layer1-4; rba-store supports timm ViT-family, staged (ConvNeXt, Swin) and ResNet models"
    )


def _unknown_model_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"unknown model {name!r}; {hint}list timm's models with "
        "`python -c \"import timm; print(timm.list_models('vit*'))\"`, or omit --model to use "
        "the embedded default"
    )


def _state_dict_num_classes(state_dict: dict[str, Any], classifier: str | None) -> int | None:
    weight = state_dict.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def build_model(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Build a model in eval mode: the embedded default when ``name`` is None, else a timm model.

    ``checkpoint`` loads local weights (a timm/PyTorch state dict, ``.pth`` or ``.safetensors``);
    ``pretrained`` uses timm's own loading (the hub or its cache).
    """
    timm = import_timm()
    from rba_store.extract import default_model

    if checkpoint is not None and pretrained:
        raise ModelError("--checkpoint and --pretrained exclude each other; pass only one")
    if name is None:
        if pretrained:
            raise ModelError("--pretrained needs --model; the embedded default is trained locally")
        if checkpoint is None:
            checkpoint = default_model.ensure_default_weights()
            source = "embedded"
        else:
            source = "checkpoint"
        name = default_model.MODEL_NAME
    else:
        source = (
            "checkpoint" if checkpoint is not None else "pretrained" if pretrained else "random"
        )
    known = timm.list_models()
    if not timm.is_model(name):
        raise UnknownModelError(_unknown_model_message(name, known))

    state_dict = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise NotFoundError(
                f"checkpoint {str(checkpoint)!r} does not exist; pass the path of a .pth or "
                ".safetensors file"
            )
        try:
            state_dict = timm.models.load_state_dict(str(checkpoint))
        except Exception as e:  # torch/safetensors raise many types for a bad file
            raise ModelError(
                f"cannot read checkpoint {str(checkpoint)!r} ({type(e).__name__}: {e}); pass a "
                "timm/PyTorch state dict saved with torch.save or safetensors"
            ) from e
    try:
        torch.manual_seed(0)  # random initialisation is reproducible (recorded as source "random")
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as e:
        if pretrained:
            raise ModelError(
                f"cannot load timm's pretrained weights for {name!r} ({type(e).__name__}); "
                "offline, download them elsewhere and pass the file with --checkpoint PATH"
            ) from e
        raise ModelError(f"cannot build model {name!r}: {e}") from e
    if state_dict is not None:
        classifier = model.pretrained_cfg.get("classifier")
        n_classes = _state_dict_num_classes(state_dict, classifier)
        if n_classes is not None and n_classes != getattr(model, "num_classes", n_classes):
            model = timm.create_model(name, num_classes=n_classes)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ModelError(
                f"checkpoint {str(checkpoint)!r} does not fit model {name!r} ({first}); "
                "pass the --model the checkpoint was trained as"
            ) from e
    weights: dict[str, Any] = {"source": source}
    if checkpoint is not None:
        weights |= {"path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}
    else:
        weights["sha256"] = model_weights_sha256(model)
        if pretrained:
            weights["pretrained_tag"] = model.pretrained_cfg.get("tag")
            weights["hf_hub_id"] = model.pretrained_cfg.get("hf_hub_id")
        else:
            weights["seed"] = 0
    model.eval().to(device)
    data_config = timm.data.resolve_data_config(model=model)
    blocks = find_blocks(model, name)
    return LoadedModel(
        module=model,
        name=name,
        weights=weights,
        data_config=data_config,
        block_names=[n for n, _ in blocks],
    )


def model_weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict tensors (for models built without a file)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
