"""Text for language models: documents, split by document, tokenised and cut into windows.

Sources: a ``.txt`` file (its paragraphs, separated by blank lines, are the documents), a folder
of text files (one file, one document) or JSON lines with a ``text`` field (one line, one
document); a ``.txt`` or ``.jsonl`` file may be gzip-compressed (``.gz``). The documents are
split train / val / test (80 / 10 / 10 %, at least one document each) with a fixed seed, so that
no document lends text to two splits. Each split's documents, in their order, are tokenised with
the model's own tokenizer, each followed by its end-of-text token when it has one, joined into
one token stream and cut into windows of ``seq_len`` tokens; the remainder is dropped, so no
padding ever enters a row. A window is a sample; its token ids
are stored as ``input_ids`` and each position predicts the next token.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rba_store.errors import DataSourceError, NotFoundError, UnknownSplitError, UsageError
from rba_store.extract.data import DataSource, Preprocess

TEXT_SEED = 0
SPLITS = ("train", "val", "test")
VAL_FRACTION = TEST_FRACTION = 0.1
DEFAULT_SEQ_LEN = 256
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


def read_documents(spec: str | Path) -> list[str]:
    """The documents of a text source, in a stable order (see the module's docstring)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise NotFoundError(
            f"text source {str(spec)!r} does not exist; pass a .txt file, a folder of text files "
            "or a .jsonl file with a 'text' field"
        )
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        )
        documents = [_read(p) for p in files]
    elif _kind(path) in (".jsonl", ".json"):
        documents = []
        for number, line in enumerate(_read(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                documents.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as e:
                raise DataSourceError(
                    f"line {number} of {str(path)!r} is not a JSON object with a 'text' field "
                    f"({type(e).__name__}); write one JSON document per line"
                ) from e
    elif _kind(path) in TEXT_SUFFIXES:
        documents = [p for p in _read(path).split("\n\n")]
    else:
        raise UsageError(
            f"text source {str(spec)!r} is neither a .txt file, a folder nor a .jsonl file; "
            "pass one of those"
        )
    documents = [d.strip() for d in documents if d.strip()]
    if len(documents) < len(SPLITS):
        raise DataSourceError(
            f"{str(spec)!r} holds {len(documents)} document(s); the train/val/test split by "
            f"document needs at least {len(SPLITS)} (paragraphs of a .txt file, files of a "
            "folder, lines of a .jsonl file)"
        )
    return documents


def _kind(path: Path) -> str:
    """The suffix that says what a file holds (the one before ``.gz`` for a compressed file)."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix == ".gz" else suffix


def _read(path: Path) -> str:
    try:
        if path.suffix.lower() == ".gz":
            return gzip.decompress(path.read_bytes()).decode("utf-8")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataSourceError(f"cannot read {str(path)!r} as UTF-8 text ({e})") from e


def split_documents(n: int, seed: int = TEXT_SEED) -> dict[str, np.ndarray]:
    """Document indices of each split (sorted), drawn with ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, math.floor(TEST_FRACTION * n))
    n_val = max(1, math.floor(VAL_FRACTION * n))
    return {
        "test": np.sort(order[:n_test]),
        "val": np.sort(order[n_test : n_test + n_val]),
        "train": np.sort(order[n_test + n_val :]),
    }


def token_windows(documents: list[str], tokenizer: Any, seq_len: int) -> np.ndarray:
    """``(windows, seq_len)`` token ids of the documents joined (see the module's docstring)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(int(eos))
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


class TextSource(DataSource):
    """One split of a text source as windows of token ids (labels: none; ids ``split/i``)."""

    kind = "text"

    def __init__(self, spec: str | Path, tokenizer: Any, seq_len: int, split: str = "train"):
        if split not in SPLITS:
            raise UnknownSplitError(
                f"split {split!r} does not exist for text; use one of {', '.join(SPLITS)}"
            )
        if seq_len < 2:
            raise UsageError(f"--seq-len {seq_len} is invalid; pass at least 2 tokens")
        self.path, self.split, self.seq_len = Path(spec).expanduser(), split, seq_len
        documents = read_documents(spec)
        chosen = split_documents(len(documents))[split]
        self.windows = token_windows([documents[i] for i in chosen], tokenizer, seq_len)
        if len(self.windows) == 0:
            raise DataSourceError(
                f"the {split} split of {str(spec)!r} ({len(chosen)} documents) is shorter than one "
                f"window of {seq_len} tokens; pass a smaller --seq-len or more text"
            )
        self.n_documents = len(chosen)
        self.labels = np.full(len(self.windows), -1, np.int64)
        self.sample_ids = [f"{split}/{i}" for i in range(len(self.windows))]
        self.classes = []

    @property
    def preprocessed(self) -> bool:
        return True

    def load(self, start: int, stop: int, preprocess: Preprocess | None = None) -> torch.Tensor:
        return torch.from_numpy(self.windows[start:stop].copy())

    def describe(self) -> dict[str, Any]:
        return {
            "source": "text",
            "path": str(self.path.resolve()),
            "split": self.split,
            "n_samples": len(self),
            "classes": [],
            "seq_len": self.seq_len,
            "n_documents": self.n_documents,
            "split_rule": f"by document, seed {TEXT_SEED}: test {TEST_FRACTION:.0%}, val "
            f"{VAL_FRACTION:.0%}, train the rest (at least one document each)",
        }
