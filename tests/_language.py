"""Tiny Hugging Face decoders and a corpus for the language-model tests, made offline.

The corpus is the documentation of Python's own standard library (docstrings of classes and
functions, one document each), so every machine has the same bytes; the tokenizer is a byte-level
BPE trained on it; the models are randomly initialised from a config (seed 0) and saved with
``save_pretrained`` next to the tokenizer, as a user's model folder would be.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch

MODULES = ("json", "csv", "argparse", "pathlib", "textwrap", "collections", "functools")
MODULES += ("itertools", "heapq", "random", "statistics", "string", "shutil", "zipfile")


def write_corpus(path: Path) -> list[str]:
    documents = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    documents.append(doc)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return documents


def train_tokenizer(documents: list[str], vocab_size: int = 320) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rba_store.extract.language_model import _transformers

    transformers = _transformers()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def make_model(kind: str, folder: Path, tokenizer: Any, layers: int = 4) -> Path:
    """A random ``llama``, ``gpt2`` or ``qwen2`` (sliding-window layers) decoder in ``folder``."""
    from rba_store.extract.language_model import _transformers

    t = _transformers()
    common = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    common |= {"bos_token_id": None, "pad_token_id": None}
    if kind == "gpt2":
        config = t.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common)
        model_class = t.GPT2LMHeadModel
    else:
        sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers)
        sizes |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        if kind == "qwen2":
            config = t.Qwen2Config(
                **sizes, use_sliding_window=True, sliding_window=8, max_window_layers=2, **common
            )
            model_class = t.Qwen2ForCausalLM
        else:
            config = t.LlamaConfig(**sizes, **common)
            model_class = t.LlamaForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
