"""Hugging Face causal language models (Llama, Qwen, Mistral, GPT-2 style decoders) from a local
directory: ``config.json``, the weights and the tokenizer, loaded offline.

A decoder's blocks are its layers (``model.model.layers`` or ``model.transformer.h``). ``h0`` is
the first layer's input (token embedding, plus position embedding where the model adds one);
``hK`` the output of layer K, taken from the layer itself and so *before* the final norm
(``output_hidden_states`` applies the final norm to its last element in several architectures).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rba_store.errors import ModelError, NotFoundError
from rba_store.extract.default_lm import (
    LM_NAME,
    ensure_default_lm,
    is_default_lm,
    is_shipped_lm_dir,
)
from rba_store.extract.models import LoadedModel, model_weights_sha256

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
FAMILY_LANGUAGE = "language"


def is_language_model_dir(name: str | Path | None) -> bool:
    """Whether ``--model`` names a local directory with a Hugging Face ``config.json``, or the
    embedded language model (``rba-stdlib-lm``: its shipped folder)."""
    return name is not None and (is_default_lm(name) or (Path(name) / "config.json").is_file())


def language_model_dir(name: str | Path) -> Path:
    """The folder ``--model`` names: the shipped one for ``rba-stdlib-lm``, else ``name``."""
    return ensure_default_lm() if is_default_lm(name) else Path(name)


def _transformers() -> Any:
    from rba_store.extract.torchvision_compat import import_torchvision

    import_torchvision()  # transformers imports torchvision's transforms when it is installed
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # no loading bars between our lines
    return transformers


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """``(decoder, layers, final_norm)`` of a causal LM: Llama/Qwen/Mistral (``model.model``,
    ``.layers``, ``.norm``) or GPT-2 (``model.transformer``, ``.h``, ``.ln_f``)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for layers_name, norm_name in (("layers", "norm"), ("h", "ln_f")):
        layers = getattr(base, layers_name, None)
        norm = getattr(base, norm_name, None)
        if isinstance(layers, nn.ModuleList) and norm is not None:
            return base, layers, norm
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}: rba-store supports decoders "
        "with model.layers + model.norm (Llama, Qwen, Mistral) or transformer.h + transformer.ln_f "
        "(GPT-2)"
    )


def context_length(config: Any) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` or ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def weights_sha256(path: Path) -> str:
    """sha256 over the weight files of a model directory (names and bytes, sorted)."""
    files = sorted({f for pattern in WEIGHT_FILES for f in path.glob(pattern)})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model directory (offline), or a one-line error."""
    transformers = _transformers()
    path = Path(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NotFoundError(
            f"--model {str(path)!r} holds no tokenizer that loads offline ({type(e).__name__}); "
            "save one there (tokenizer.save_pretrained(DIR)) next to config.json and the weights"
        ) from e


def build_language_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """A causal LM and its tokenizer from a local directory (or ``rba-stdlib-lm``, the shipped
    one, recorded as "embedded"), in eval mode, float32."""
    transformers = _transformers()
    path = language_model_dir(path)
    embedded = is_shipped_lm_dir(path)
    files = [f for pattern in WEIGHT_FILES for f in path.glob(pattern)]
    if not files:
        raise NotFoundError(
            f"--model {str(path)!r} has a config.json but no weights (*.safetensors or "
            "pytorch_model.bin); save the model there with model.save_pretrained(DIR)"
        )
    tokenizer = load_tokenizer(path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot load the causal language model in {str(path)!r} ({first}); pass a folder "
            "written by save_pretrained of a decoder (Llama, Qwen, Mistral, GPT-2 ...)"
        ) from e
    model.eval().to(device)
    _, layers, _ = decoder_parts(model)
    config = model.config
    weights = {
        "source": "embedded" if embedded else "checkpoint",
        "path": str(path.resolve()),
        "sha256": weights_sha256(path),
        "state_sha256": model_weights_sha256(model),
    }
    prefix = "model.layers" if getattr(model, "model", None) is not None else "transformer.h"
    return LoadedModel(
        module=model,
        name=LM_NAME if embedded else str(config.model_type),
        weights=weights,
        data_config={"tokenizer": type(tokenizer).__name__, "context": context_length(config)},
        block_names=[f"{prefix}.{i}" for i in range(len(layers))],
        family=FAMILY_LANGUAGE,
        tokenizer=tokenizer,
    )


def describe_language_model(loaded: LoadedModel) -> dict[str, Any]:
    """The store's ``model`` attribute for a language model."""
    config = loaded.module.config
    return {
        "name": loaded.name,
        "family": FAMILY_LANGUAGE,
        "weights": loaded.weights,
        "n_blocks": len(loaded.block_names),
        "block_names": loaded.block_names,
        "num_prefix_tokens": 0,
        "has_class_token": False,
        "num_classes": 0,
        "architecture": (config.architectures or [type(loaded.module).__name__])[0],
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "context": context_length(config),
        "config": json.loads(config.to_json_string(use_diff=False)),
    }
