"""Approximated models on disk: weights as safetensors plus a small JSON recipe, and loading back.

``MODEL_PATH/recipe.json`` names the base model (as recorded in the store: timm name, weights
source, path and sha256) and the spans with the fits that replace them; ``MODEL_PATH/
model.safetensors`` holds the approximated model's whole state dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from rba_store.approx.decoder import replace_decoder_spans
from rba_store.approx.evaluate import Classifier
from rba_store.approx.rebuild import build_architecture, rebuild_model
from rba_store.approx.surgery import SpanMap, replace_spans
from rba_store.errors import StoreError, UsageError
from rba_store.store import Store, normalize

RECIPE_VERSION = 1


def write_approximated(
    store: Store | str | Path,
    maps: list[SpanMap],
    fit_names: list[str | None],
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    classifier: Classifier | None = None,
    fold: bool = False,
) -> Path:
    """Build the approximated model of a store's model and write it to the folder ``out``.

    With a linear-probe ``classifier`` the probe becomes the model's head, so that the saved
    model predicts what ``evaluate`` measured. With ``fold`` the maps are folded into the
    weights (:mod:`rba_store.approx.fold`): the folder holds the model's own architecture with
    fewer blocks, ``config.json`` and ``model.safetensors``, loadable without rba-store.
    """
    from safetensors.torch import save_file, save_model

    from rba_store.approx.fold import fold_model, recording_vit_kwargs, vit_config

    store = Store.coerce(store)
    description = store.description
    with recording_vit_kwargs() as vit_kwargs:
        loaded = rebuild_model(description["model"], checkpoint, store)
    language = loaded.family == "language"
    build = fold_model if fold else replace_decoder_spans if language else replace_spans
    model = build(loaded.module, maps)
    probe = classifier is not None and classifier.kind == "probe"
    if probe:
        assert classifier is not None
        model.head = classifier.as_head()
    out = Path(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    recipe: dict[str, Any] = {
        "format_version": RECIPE_VERSION,
        "base_model": description["model"],
        "data_config": loaded.data_config,
        "store": str(store.path.resolve()),
        "store_fingerprint": description["fingerprint"],
        "classifier": {"kind": "probe", "num_classes": int(classifier.weight.shape[1])}  # type: ignore[union-attr]
        if probe
        else {"kind": "head"},
        "spans": [
            {"span": list(m.span), "fit": name, "kind": _kind(m)}
            for m, name in zip(maps, fit_names, strict=True)
        ],
    }
    if fold:
        recipe["folded"] = True
    with _staged_folder(out) as staging:
        if fold and language:  # config.json, model.safetensors: from_pretrained loads it
            model.save_pretrained(str(staging))
            loaded.tokenizer.save_pretrained(str(staging))
        elif fold:
            config = vit_config(model, vit_kwargs[0], description["model"]["name"])
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            save_file(state, str(staging / "model.safetensors"))
        elif language:  # tied embeddings share memory: save_model keeps one copy
            save_model(model, str(staging / "model.safetensors"))
            loaded.tokenizer.save_pretrained(str(staging))  # AutoTokenizer.from_pretrained(out)
        else:
            save_file(state, str(staging / "model.safetensors"))
        (staging / "recipe.json").write_text(json.dumps(normalize(recipe), indent=2))
    return out


def _kind(m: SpanMap) -> str:
    return "identity" if m.t is None else "folded" if m.folded else "linear"


def check_model_out(out: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, to write a model where something is: an earlier model of
    ``apply`` is replaced only with ``overwrite``; any other non-empty folder never."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "recipe.json").is_file():
        raise UsageError(
            f"--out {str(out)!r} is a folder that holds other files, not a model written by "
            "'rba-store apply'; choose a new or empty folder (it is left untouched)"
        )
    if not overwrite:
        raise UsageError(
            f"--out {str(out)!r} already holds a model written by 'rba-store apply'; pass "
            "--overwrite to replace it, or choose another folder"
        )


@contextlib.contextmanager
def _staged_folder(out: Path) -> Iterator[Path]:
    """A folder beside ``out`` to write into, moved to ``out`` (replacing an earlier model) only
    when everything is written: a failure leaves ``out`` as it was. Files get the permissions the
    umask gives new files (safetensors writes through a private temporary file, mode 0600)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        mode = 0o666 & ~_umask()
        for file in staging.iterdir():
            file.chmod(mode)
        replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        if out.exists():
            os.replace(out, replaced)
        os.replace(staging, out)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (no race with other
    threads creating files), else by setting it and back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_recipe(path: str | Path) -> dict[str, Any]:
    recipe_path = Path(path) / "recipe.json"
    if not recipe_path.is_file():
        raise StoreError(
            f"{str(path)!r} holds no recipe.json; pass a folder written by 'rba-store apply'"
        )
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("format_version", 0) > RECIPE_VERSION:
        raise StoreError(f"{str(path)!r} was written by a newer rba-store; upgrade rba-store")
    return recipe


def load_approximated(path: str | Path) -> nn.Module:
    """The approximated model written by :func:`write_approximated`, ready to run (eval mode).

    ``model.safetensors`` holds every weight: only the base model's architecture is built, so
    neither the original weights file nor the store is needed.
    """
    from safetensors.torch import load_file

    recipe = read_recipe(path)
    base = dict(recipe["base_model"])
    if recipe.get("folded"):  # the standard architecture: loads without rba-store
        if base.get("family") == "language":
            from rba_store.extract.language_model import _transformers

            auto = _transformers().AutoModelForCausalLM
            return auto.from_pretrained(str(path), local_files_only=True).eval()
        from rba_store.approx.fold import load_folded_vit

        return load_folded_vit(path)
    if base.get("family") == "language":
        return _load_decoder(path, base, recipe["spans"])
    head = recipe.get("classifier", {"kind": "head"})
    if head["kind"] == "probe":  # the probe is the head: its own number of classes
        base["num_classes"] = head["num_classes"]
    module = build_architecture(base)
    width = int(module.embed_dim)
    maps = [
        SpanMap(tuple(s["span"]))  # type: ignore[arg-type]
        if s["kind"] == "identity"
        else SpanMap(tuple(s["span"]), np.zeros((width, width)), np.zeros(width))  # type: ignore[arg-type]
        for s in recipe["spans"]
    ]
    model = replace_spans(module, maps)
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
    return model.eval()


def _load_decoder(path: str | Path, base: dict[str, Any], spans: list[dict[str, Any]]) -> nn.Module:
    """A Hugging Face decoder with its spans replaced, from its config and ``model.safetensors``
    (``generate()`` works; the tokenizer is in the same folder)."""
    from safetensors.torch import load_model

    from rba_store.extract.language_model import _transformers

    transformers = _transformers()
    settings = dict(base["config"])
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    module = transformers.AutoModelForCausalLM.from_config(config)
    width = int(config.hidden_size)
    maps = [
        SpanMap(tuple(s["span"]))  # type: ignore[arg-type]
        if s["kind"] == "identity"
        else SpanMap(tuple(s["span"]), np.zeros((width, width)), np.zeros(width))  # type: ignore[arg-type]
        for s in spans
    ]
    model = replace_decoder_spans(module, maps)
    load_model(model, str(Path(path) / "model.safetensors"), strict=True)
    return model.eval()
