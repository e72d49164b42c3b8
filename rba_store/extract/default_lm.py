"""The embedded language-model default: a 12-layer Llama-style decoder trained by rba-store on the
docstrings of Python's standard library, shipped with the package.

``--model rba-stdlib-lm`` names the shipped folder (``weights/rba_stdlib_lm``: ``config.json``,
``model.safetensors``, the tokenizer, as ``save_pretrained`` writes them), so it is loaded like
any other Hugging Face model folder; with it, ``--data`` defaults to the shipped corpus
(``weights/python_stdlib_docstrings.jsonl.gz``: one docstring, one document). The training code
that made both is :mod:`rba_store.extract.train_lm_default`.
"""

from __future__ import annotations

from pathlib import Path

LM_NAME = "rba-stdlib-lm"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_LM_DIR = WEIGHTS_DIR / "rba_stdlib_lm"
SHIPPED_LM_REPORT = SHIPPED_LM_DIR / "training.json"
SHIPPED_CORPUS = WEIGHTS_DIR / "python_stdlib_docstrings.jsonl.gz"
CORPUS_LICENSE = (
    "the docstrings of CPython's standard library, under the Python Software Foundation License "
    "Version 2 (https://docs.python.org/3/license.html)"
)


def is_default_lm(name: str | Path | None) -> bool:
    """Whether ``--model`` is the reserved name of the embedded language model."""
    return name is not None and str(name) == LM_NAME


def is_shipped_lm_dir(path: str | Path) -> bool:
    """Whether ``path`` is this install's shipped model folder."""
    try:
        return Path(path).resolve() == SHIPPED_LM_DIR.resolve()
    except OSError:
        return False


def ensure_default_lm() -> Path:
    """The shipped model folder (installed with the package), or a one-line error."""
    from rba_store.errors import ModelError

    if not (SHIPPED_LM_DIR / "config.json").is_file():
        raise ModelError(
            f"the embedded language model's folder {str(SHIPPED_LM_DIR)!r} is missing from this "
            "install; reinstall rba-store, or re-train it with 'python -m "
            "rba_store.extract.train_lm_default --out DIR' and pass --model DIR"
        )
    return SHIPPED_LM_DIR


def ensure_default_corpus() -> Path:
    """The shipped corpus (installed with the package), or a one-line error."""
    from rba_store.errors import DataSourceError

    if not SHIPPED_CORPUS.is_file():
        raise DataSourceError(
            f"the embedded corpus {str(SHIPPED_CORPUS)!r} is missing from this install; "
            "reinstall rba-store"
        )
    return SHIPPED_CORPUS
