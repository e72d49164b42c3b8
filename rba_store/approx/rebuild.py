"""Rebuilding a store's model and test data from its own attributes (no options to repeat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rba_store.errors import DataSourceError, ModelError
from rba_store.extract.data import DataSource, DigitsSource, FolderSource, NpzSource
from rba_store.extract.models import LoadedModel, build_model, model_weights_sha256, sha256_file


def rebuild_model(model: dict[str, Any], checkpoint: str | Path | None = None) -> LoadedModel:
    """The model a store was extracted from, with the very weights (checked by sha256).

    ``checkpoint`` points at the weights file when it has moved since the extraction.
    """
    weights = model["weights"]
    source = weights["source"]
    name = model["name"]
    if source in ("embedded", "checkpoint"):
        path = Path(checkpoint) if checkpoint else Path(weights["path"])
        if checkpoint and not path.is_file():
            raise ModelError(
                f"--checkpoint {str(path)!r} does not exist; pass the weights file of {name!r} "
                f"(sha256 {weights['sha256'][:12]}…)"
            )
        if not path.is_file():
            raise ModelError(
                f"the weights file {weights['path']!r} (sha256 {weights['sha256'][:12]}…) of "
                f"model {name!r} is missing; pass --checkpoint PATH to point at it"
            )
        loaded = build_model(None if source == "embedded" else name, checkpoint=path)
        found = sha256_file(path)
    else:
        loaded = build_model(name, pretrained=source == "pretrained")
        found = model_weights_sha256(loaded.module)
    if found != weights["sha256"]:
        raise ModelError(
            f"the weights of {name!r} have sha256 {found[:12]}…, not {weights['sha256'][:12]}… as "
            "when the store was extracted; pass --checkpoint with the original file"
        )
    return loaded


def test_source(data: dict[str, Any]) -> DataSource:
    """The test split of a store's data source: digits/test, a val/ or test/ folder, x_test."""
    kind = data["source"]
    if kind == "digits":
        return DigitsSource("test")
    if kind == "folder":
        root = Path(data["path"])
        for split in ("val", "test"):
            if (root / split).is_dir() and split != data.get("split"):
                return FolderSource(root, split)
    if kind == "npz":
        try:
            return NpzSource(Path(data["path"]), "test")
        except DataSourceError:
            pass
    raise DataSourceError(
        f"the data of this store ({kind} {data.get('path', '')!r}) has no test split to evaluate "
        "on (digits, a val/ or test/ folder, or x_test/y_test arrays); extract from such data"
    )
