"""Models: the embedded default's accuracy, block discovery, the torchvision workaround."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from rba_store.errors import ModelError
from rba_store.extract import torchvision_compat as _torchvision_compat
from rba_store.extract.models import build_model, find_blocks


def test_embedded_default_reaches_95_percent_on_the_digits_test_split(
    default_weights: Path,
) -> None:
    from rba_store.extract.data import DigitsSource, make_preprocess

    loaded = build_model()
    assert loaded.name == "rba_digits_vit" and len(loaded.block_names) == 12
    assert loaded.weights["source"] == "embedded" and loaded.weights["path"] == str(default_weights)
    test = DigitsSource("test")
    x = test.load(0, len(test), make_preprocess(loaded.data_config))
    with torch.inference_mode():
        predicted = loaded.module(x).argmax(1).numpy()
    accuracy = float((predicted == test.labels).mean())
    assert accuracy >= 0.95


def test_find_blocks_names_and_errors() -> None:
    vit = build_model("test_vit").module
    assert [name for name, _ in find_blocks(vit)][:2] == ["blocks.0", "blocks.1"]
    resnet = build_model("test_resnet").module
    assert find_blocks(resnet)[0][0] == "layer1.0"
    with pytest.raises(ModelError, match="cannot find the blocks of 'mlp'"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mlp")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(
        ModelError,
        match=r"unknown model 'vit_smal_patch16_224'; did you mean 'vit_small_patch16_224'",
    ):
        build_model("vit_smal_patch16_224")


def test_checkpoint_that_does_not_fit_the_model(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(build_model("test_resnet").module.state_dict(), path)
    with pytest.raises(ModelError, match=r"does not fit model 'test_vit'.*pass the --model"):
        build_model("test_vit", checkpoint=path)


def test_torchvision_workaround_is_a_no_op_when_torchvision_imports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    healthy = types.ModuleType("torchvision")
    monkeypatch.setitem(sys.modules, "torchvision", healthy)
    monkeypatch.setattr(_torchvision_compat, "_library", None)
    monkeypatch.setattr(_torchvision_compat, "patched", False)
    assert _torchvision_compat.import_torchvision() is healthy
    assert _torchvision_compat._library is None and not _torchvision_compat.patched


def test_torchvision_workaround_reraises_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    def failing_import(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "torchvision":
            raise RuntimeError("some other failure")
        return real_import(name, *args, **kwargs)

    import builtins

    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(RuntimeError, match="some other failure"):
        _torchvision_compat.import_torchvision()


def test_importing_the_package_touches_neither_torch_nor_cupy() -> None:
    import subprocess

    code = "import sys, rba_store; print('torch' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
