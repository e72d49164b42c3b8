"""How the embedded language model and its corpus were made, and a command that re-trains it.

**Corpus** (made once, shipped frozen: ``weights/python_stdlib_docstrings.jsonl.gz``): every
docstring of CPython 3.11's standard library, read from the source files with :mod:`ast` (no
module imported) — modules, classes and functions, in sorted file order; tests, ``idlelib``,
``tkinter``, ``lib2to3``, ``distutils``, ``ensurepip`` and ``site-packages`` left out; at least
80 characters, each distinct text once. One docstring is one document, so rba-store's text
sources split it by document (80 / 10 / 10 %, seed 0: :mod:`rba_store.extract.text`). Licence:
the Python Software Foundation License Version 2.

**Tokenizer**: a byte-level BPE of 2,048 tokens (``<|endoftext|>`` is the end-of-text token)
trained with ``tokenizers`` on the training documents only.

**Model**: ``LlamaForCausalLM``, 12 layers, width 128, 4 heads (all key/value heads kept), MLP
width 384 (SwiGLU), RMSNorm, rotary positions, a context of 256 tokens, input and output
embeddings tied. **Recipe**: the training documents, each followed by ``<|endoftext|>``, joined
and cut into windows of 256 tokens (each epoch from a seeded random offset, in a seeded random
order), batch 16 windows, AdamW (betas 0.9/0.95, weight decay 0.1 except on norms), peak
learning rate 2e-3 after 40 steps of linear warm-up, cosine to 1e-4, gradient clipping at 1,
6 epochs, seed 0, float32; the weights are written in float16 (the perplexities are measured on
them, loaded back as float32). Training is not bit-reproducible across thread counts (torch's
CPU backward sums in thread-dependent order), which is why the weights are shipped.

    python -m rba_store.extract.train_lm_default --out DIR [--threads 2]

re-trains into ``DIR`` (a Hugging Face model folder) and compares it with the shipped one
(sha256 of the weights and tokenizer, validation and test perplexity and next-token accuracy).
``--write-corpus FILE`` re-extracts the corpus from the running Python's standard library (a
different Python gives different bytes: the shipped file is the reference).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rba_store.extract.default_lm import (
    CORPUS_LICENSE,
    LM_NAME,
    SHIPPED_CORPUS,
    SHIPPED_LM_DIR,
    SHIPPED_LM_REPORT,
)

EOS = "<|endoftext|>"
MIN_CHARS = 80
SKIP_DIRS = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils")
SKIP_DIRS += ("ensurepip", "site-packages", "pydoc_data", "__phello__")
ARCHITECTURE: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
RECIPE: dict[str, Any] = dict(
    seed=0,
    vocab_size=2048,
    seq_len=256,
    batch_size=16,
    epochs=6,
    lr=2e-3,
    min_lr=1e-4,
    warmup_steps=40,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    clip_grad_norm=1.0,
    schedule="per-step linear warm-up, then cosine to min_lr",
    no_weight_decay="RMSNorm weights",
    windows="each epoch: the token stream from a seeded random offset, windows in random order",
)
EVAL_SEQ_LEN = 256


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    """The standard library's docstrings (see the module's docstring), in a stable order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0].startswith("config-") or any(
            p in SKIP_DIRS or p.startswith("test") for p in parts
        ):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, kinds) else None
            if doc and len(doc) >= MIN_CHARS and doc not in seen:
                seen.add(doc)
                documents.append(doc)
    return documents


def write_corpus(path: Path) -> str:
    """Write the corpus as gzip-compressed JSON lines (no timestamp: same text, same bytes)."""
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in stdlib_docstrings())
    data = gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256_bytes(data)


def corpus_splits(corpus: Path = SHIPPED_CORPUS) -> dict[str, list[str]]:
    """The corpus's documents per split, as every rba-store text source splits them."""
    from rba_store.extract.text import read_documents, split_documents

    documents = read_documents(corpus)
    return {s: [documents[i] for i in idx] for s, idx in split_documents(len(documents)).items()}


def train_tokenizer(documents: list[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on ``documents``, as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rba_store.extract.language_model import _transformers

    transformers = _transformers()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
    )


def token_stream(documents: list[str], tokenizer: Any) -> np.ndarray:
    """The documents' token ids, each followed by the end-of-text token, joined."""
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [eos]
    return np.asarray(ids, dtype=np.int64)


def build_model(tokenizer: Any) -> nn.Module:
    from rba_store.extract.language_model import _transformers

    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=int(tokenizer.eos_token_id),
        pad_token_id=None,
        **ARCHITECTURE,
    )
    return transformers.LlamaForCausalLM(config)


def train_lm(recipe: dict[str, Any] = RECIPE) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Train the tokenizer and the model from scratch; returns them and a report."""
    r = recipe
    start = time.perf_counter()
    train_docs = corpus_splits()["train"]
    tokenizer = train_tokenizer(train_docs, r["vocab_size"])
    stream = torch.from_numpy(token_stream(train_docs, tokenizer))
    torch.manual_seed(r["seed"])
    model = build_model(tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    plain = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": r["weight_decay"]},
            {"params": plain, "weight_decay": 0},
        ],
        lr=r["lr"],
        betas=tuple(r["betas"]),
    )
    seq, batch = r["seq_len"], r["batch_size"]
    per_epoch = math.ceil((len(stream) - seq) // seq / batch)
    total, warm = r["epochs"] * per_epoch, r["warmup_steps"]

    def lr_at(step: int) -> float:
        if step < warm:
            return r["lr"] * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return r["min_lr"] + 0.5 * (r["lr"] - r["min_lr"]) * (1 + math.cos(math.pi * t))

    generator = torch.Generator().manual_seed(r["seed"])
    step, losses = 0, []
    model.train()
    for _ in range(r["epochs"]):
        offset = int(torch.randint(0, seq, (1,), generator=generator))
        n = (len(stream) - offset) // seq
        windows = stream[offset : offset + n * seq].view(n, seq)
        order = torch.randperm(n, generator=generator)
        epoch_loss = []
        for first in range(0, n, batch):
            x = windows[order[first : first + batch]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), r["clip_grad_norm"])
            optimizer.step()
            epoch_loss.append(float(loss.detach()))
            step += 1
        losses.append(round(float(np.mean(epoch_loss)), 4))
    model.eval()
    report = {
        "name": LM_NAME,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _versions()["transformers"],
        "tokenizers": _versions()["tokenizers"],
        "recipe": r,
        "architecture": ARCHITECTURE,
        "steps": step,
        "train_tokens": len(stream),
        "train_documents": len(train_docs),
        "epoch_train_loss": losses,
    }
    return model, tokenizer, report


def _versions() -> dict[str, str]:
    import tokenizers

    from rba_store.extract.language_model import _transformers

    return {"transformers": _transformers().__version__, "tokenizers": tokenizers.__version__}


@torch.no_grad()
def split_scores(folder: Path, corpus: Path = SHIPPED_CORPUS) -> dict[str, float]:
    """Perplexity and next-token accuracy on the val and test windows (256 tokens), as
    ``rba-store evaluate`` measures them."""
    from rba_store.approx.language_eval import NextTokenScores
    from rba_store.extract.language_model import build_language_model
    from rba_store.extract.text import TextSource

    loaded = build_language_model(folder)
    out: dict[str, float] = {}
    for split in ("val", "test"):
        source = TextSource(corpus, loaded.tokenizer, EVAL_SEQ_LEN, split)
        scores = NextTokenScores()
        for first in range(0, len(source), 32):
            x = source.load(first, min(first + 32, len(source)))
            scores.add(loaded.module(input_ids=x, use_cache=False).logits, x)
        out[f"{split}_perplexity"] = round(scores.perplexity, 4)
        out[f"{split}_accuracy"] = round(scores.accuracy, 4)
        out[f"{split}_windows"] = len(source)
    return out


MODEL_CARD = """# {name}

The embedded language-model default of rba-store: a `LlamaForCausalLM` with
{num_hidden_layers} layers of width {hidden_size} ({num_attention_heads} heads, MLP width
{intermediate_size}, context {max_position_embeddings}, tied embeddings) and a byte-level BPE
tokenizer of {vocab_size} tokens, trained from scratch by
`python -m rba_store.extract.train_lm_default` on the training documents of the corpus shipped
beside this folder (`python_stdlib_docstrings.jsonl.gz`: {license}). Recipe, sha256 and
measured perplexities: `training.json`. Weights: MIT, as rba-store.
"""


def save_folder(model: nn.Module, tokenizer: Any, report: dict[str, Any], folder: Path) -> None:
    """A Hugging Face model folder: config, weights (float16), tokenizer, ``training.json``, a
    card; the perplexities are measured on the weights as written."""
    from rba_store.extract.language_model import weights_sha256

    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(folder))  # half the bytes; loaded as float32
    tokenizer.save_pretrained(str(folder))
    report |= {
        "sha256": weights_sha256(folder),
        "tokenizer_sha256": sha256_bytes((folder / "tokenizer.json").read_bytes()),
        "corpus": SHIPPED_CORPUS.name,
        "corpus_sha256": sha256_bytes(SHIPPED_CORPUS.read_bytes()),
        "corpus_license": CORPUS_LICENSE,
    } | split_scores(folder)
    (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    card = MODEL_CARD.format(
        name=LM_NAME, license=CORPUS_LICENSE, vocab_size=len(tokenizer), **ARCHITECTURE
    )
    (folder / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-train the embedded language model; compare.")
    parser.add_argument("--out", type=Path, help="the model folder to write")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--write-corpus", type=Path, default=None, help="re-extract the corpus into this file"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_corpus:
        shipped = sha256_bytes(SHIPPED_CORPUS.read_bytes()) if SHIPPED_CORPUS.is_file() else None
        sha = write_corpus(args.write_corpus)
        same = "identical to" if sha == shipped else "differs from"
        print(f"corpus written to {args.write_corpus} (sha256 {sha[:12]}…): {same} the shipped one")
        if not args.out:
            return 0
    if not args.out:
        parser.error("--out DIR is required (or --write-corpus FILE alone)")
    if args.out.exists():
        shutil.rmtree(args.out)
    model, tokenizer, report = train_lm()
    save_folder(model, tokenizer, report, args.out)
    shipped = json.loads(SHIPPED_LM_REPORT.read_text()) if SHIPPED_LM_REPORT.is_file() else {}
    ours = split_scores(SHIPPED_LM_DIR) if shipped else {}
    print(f"re-trained in {report['train_seconds']} s with {report['torch_threads']} threads")
    for key in ("val_perplexity", "test_perplexity", "val_accuracy", "test_accuracy"):
        print(f"  {key:<16} re-trained {report[key]:.4f}   shipped {ours.get(key, math.nan):.4f}")
    for key, what in (("sha256", "weights"), ("tokenizer_sha256", "tokenizer")):
        if report[key] == shipped.get(key):
            print(f"  {what}: identical to the shipped ones")
        else:
            print(
                f"  {what}: differ from the shipped ones (trained with torch "
                f"{shipped.get('torch')} and {shipped.get('torch_threads')} threads)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
