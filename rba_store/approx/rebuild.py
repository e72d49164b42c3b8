"""Rebuilding a store's model and test data from its own attributes (no options to repeat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rba_store.errors import DataSourceError, ModelError, NotFoundError
from rba_store.extract.data import DataSource, DigitsSource, FolderSource, NpzSource
from rba_store.extract.models import LoadedModel, build_model, model_weights_sha256, sha256_file
from rba_store.store import Store


def rebuild_model(
    model: dict[str, Any], checkpoint: str | Path | None = None, store: Store | None = None
) -> LoadedModel:
    """The model a store was extracted from, with the very weights (checked by sha256).

    ``checkpoint`` points at the weights file when it has moved since the extraction; random
    weights are read back from ``store``, where the extractor kept them.
    """
    if model.get("family") == "language":  # a Hugging Face decoder in its folder
        from rba_store.approx.language_eval import rebuild_language_model

        return rebuild_language_model(model, checkpoint)
    weights = model["weights"]
    source = weights["source"]
    name = model["name"]
    if source == "random" and weights.get("stored"):
        loaded = _from_store(name, store)
        found = model_weights_sha256(loaded.module)
    elif source in ("embedded", "checkpoint"):
        path = Path(checkpoint) if checkpoint else Path(weights["path"])
        if source == "embedded" and not checkpoint and not path.is_file():
            from rba_store.extract.default_model import ensure_default_weights

            path = ensure_default_weights()  # another install of the package: its shipped file
        if checkpoint and not path.is_file():
            raise NotFoundError(
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


def build_architecture(model: dict[str, Any]) -> nn.Module:
    """The architecture of a store's model (timm name and number of classes), weights unset."""
    from rba_store.extract import default_model  # registers the embedded default with timm

    timm = default_model.timm
    return timm.create_model(model["name"], num_classes=int(model["num_classes"])).eval()


def _from_store(name: str, store: Store | None) -> LoadedModel:
    """A model with the random weights its store keeps (``Store.write_weights``)."""
    from safetensors.torch import load

    payload = store.read_weights() if store is not None else None
    if payload is None:
        raise ModelError(
            f"the random weights of model {name!r} are kept in its store, and none was given "
            "or it holds none; pass the store the model was extracted into"
        )
    loaded = build_model(name)
    loaded.module.load_state_dict(load(payload), strict=True)
    return loaded


def held_out_source(data: dict[str, Any], split: str) -> DataSource:
    """One named split (``val`` or ``test``) of a store's data source, never its own split."""
    kind = data["source"]
    if split != data.get("split"):
        if kind == "digits":
            return DigitsSource(split)
        if kind == "folder" and (Path(data["path"]) / split).is_dir():
            return FolderSource(Path(data["path"]), split)
        if kind == "npz":
            try:
                return NpzSource(Path(data["path"]), split)
            except DataSourceError:
                pass
    raise DataSourceError(
        f"the data of this store ({kind} {data.get('path', '')!r}) has no {split!r} split apart "
        f"from the one extracted (digits, a {split}/ folder, or x_{split}/y_{split} arrays); "
        "selection needs both a val and a test split"
    )


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
