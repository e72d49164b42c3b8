"""Portability: timm and torchvision import in the package's environment; any Zarr v3 reader
(TensorStore's ``zarr3`` driver) reads every array of a store, sample ids included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image

from rba_store import _torchvision_hook
from rba_store.errors import ConfigMismatchError, DataSourceError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.store import SAMPLE_ID, Store
from rba_store.store.layout import decode_sample_ids, encode_sample_ids, sample_id_width

DATA = Path(__file__).parent / "data"
# Core data types of the Zarr v3 specification (no extension types such as zarr-python's string).
CORE_DTYPES = {"bool", "float16", "float32", "float64", "complex64", "complex128"} | {
    f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)
}


# -- timm and torchvision in the environment the package is installed in -----------------------


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_users_can_import_timm_and_torchvision() -> None:
    """The command the unknown-model message suggests works in this venv (made by make setup)."""
    out = _run_python("import timm, torchvision; print(timm.list_models('vit*')[:2])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("['vit")


def test_the_hook_is_installed_and_imports_nothing_at_start_up() -> None:
    code = (
        "import sys; print(any(type(f).__name__ == 'TorchvisionFinder' for f in sys.meta_path), "
        "'torch' in sys.modules, 'torchvision' in sys.modules)"
    )
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False"]


@pytest.fixture
def fake_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in ``torchvision`` package first on sys.path; the real modules come back after."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torchvision"}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(_torchvision_hook, "_library", None)
    (tmp_path / "torchvision").mkdir()
    yield tmp_path / "torchvision"
    for name in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_hook_is_a_no_op_when_torchvision_imports_cleanly(
    fake_torchvision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_torchvision / "__init__.py").write_text("healthy = True\n")
    declared: list[bool] = []
    monkeypatch.setattr(_torchvision_hook, "declare_missing_operators", lambda: declared.append(1))
    _torchvision_hook.install()
    import torchvision

    assert torchvision.healthy and torchvision.__file__.startswith(str(fake_torchvision))
    assert declared == [] and _torchvision_hook._library is None
    assert not any(isinstance(f, _torchvision_hook.TorchvisionFinder) for f in sys.meta_path)
    import importlib.util

    assert importlib.util.find_spec("torchvision.nothing") is None  # finder is gone: no wrapping


def test_hook_declares_the_operators_and_imports_again_after_that_error(
    fake_torchvision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like the real wheel: a submodule is imported, then the operator registration fails.
    (fake_torchvision / "extension.py").write_text("loaded = True\n")
    (fake_torchvision / "__init__.py").write_text(
        "import sys\nfrom torchvision import extension\nleftover = True\n"
        "if not getattr(sys, '_rba_ops_declared', False):\n"
        "    raise RuntimeError('operator torchvision::nms does not exist')\n"
        "del leftover\nhealthy = True\n"
    )
    declared: list[int] = []

    def declare() -> None:
        declared.append(1)
        monkeypatch.setattr(sys, "_rba_ops_declared", True, raising=False)

    monkeypatch.setattr(_torchvision_hook, "declare_missing_operators", declare)
    _torchvision_hook.install()
    import torchvision

    assert torchvision.healthy and torchvision.extension.loaded and declared == [1]
    assert not hasattr(torchvision, "leftover")  # the failed run's names were cleared
    assert sys.modules["torchvision"] is torchvision


def test_a_look_up_before_the_import_keeps_the_hook(
    fake_torchvision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers looks torchvision up (``find_spec``) before importing it: the hook must
    still wrap the import that follows (it stepped aside at the look-up before)."""
    import importlib.util

    (fake_torchvision / "__init__.py").write_text(
        "import sys\nif not getattr(sys, '_rba_ops_declared', False):\n"
        "    raise RuntimeError('operator torchvision::nms does not exist')\nhealthy = True\n"
    )
    monkeypatch.setattr(
        _torchvision_hook,
        "declare_missing_operators",
        lambda: monkeypatch.setattr(sys, "_rba_ops_declared", True, raising=False),
    )
    _torchvision_hook.install()
    assert importlib.util.find_spec("torchvision") is not None
    import torchvision

    assert torchvision.healthy
    assert not any(isinstance(f, _torchvision_hook.TorchvisionFinder) for f in sys.meta_path)


def test_users_can_import_transformers_models() -> None:
    out = _run_python("from transformers import LlamaConfig; print(LlamaConfig().model_type)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "llama"


def test_hook_reraises_other_errors(fake_torchvision: Path) -> None:
    (fake_torchvision / "__init__.py").write_text("raise RuntimeError('some other failure')\n")
    _torchvision_hook.install()
    with pytest.raises(RuntimeError, match="some other failure"):
        import torchvision  # noqa: F401
    assert "torchvision" not in sys.modules


# -- sample ids in core Zarr v3 types ---------------------------------------------------------


def test_sample_ids_encode_and_decode() -> None:
    ids = ["digits/7", "chat/été.png", ""]
    width = sample_id_width(ids)
    assert width == len("chat/été.png".encode())
    stored = encode_sample_ids(ids, width)
    assert stored.dtype == np.uint8 and stored.shape == (3, width)
    assert decode_sample_ids(stored) == ids
    with pytest.raises(DataSourceError, match=r"'chat/été.png' is 14 bytes long.*at most 8"):
        encode_sample_ids(ids, 8)


@pytest.fixture(scope="module")
def unicode_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A random-weights ViT on an image folder with non-ASCII names: every kind of array."""
    root = tmp_path_factory.mktemp("portable")
    rng = np.random.default_rng(0)
    names = {"chat": ["a.png", "été-1.png", "b.png"], "hund": ["ünïcode-long-name-2.png", "c.png"]}
    for label, files in names.items():
        (root / "images" / label).mkdir(parents=True)
        for name in files:
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / name)
    options = ExtractOptions(
        model="test_vit",
        data=str(root / "images"),
        batch_size=2,
        chunk_samples=2,
        shard_samples=2,
        codec="blosc-zstd",
    )
    plan = plan_extraction(options)
    run_extraction(plan, root / "store.zarr")
    return root / "store.zarr", list(plan.source.sample_ids)


def _arrays(path: Path) -> dict[str, zarr.Array]:
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {name: a for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def test_every_array_reads_the_same_with_tensorstore(unicode_store: tuple[Path, list[str]]) -> None:
    tensorstore = pytest.importorskip("tensorstore")
    path, ids = unicode_store
    arrays = _arrays(path)
    assert {"h0", "features", "label", SAMPLE_ID, "ledger/shards"} <= set(arrays)
    assert "model/weights_safetensors" in arrays  # random weights are kept in the store
    for name, array in arrays.items():
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
        opened = tensorstore.open(spec, read=True).result()
        values = opened.read().result()
        expected = np.asarray(array[...])
        assert values.dtype == expected.dtype and values.shape == expected.shape, name
        assert values.tobytes() == expected.tobytes(), name
        meta = json.loads((path / name / "zarr.json").read_text())
        assert meta["data_type"] in CORE_DTYPES, name
        if name == SAMPLE_ID:
            assert values.shape[1] == Store.open(path).layout.sample_id_bytes
            assert decode_sample_ids(values) == ids


def test_store_returns_sample_ids_as_str(unicode_store: tuple[Path, list[str]]) -> None:
    path, ids = unicode_store
    store = Store.open(path)
    assert store.sample_ids() == ids and store.sample_ids(1, 3) == ids[1:3]
    assert store.array(SAMPLE_ID).attrs["width"] == store.layout.sample_id_bytes
    ds = xr.open_zarr(path)
    values = ds["sample_id"].values  # the one-liner docs/STORE.md gives xarray users
    decoded = np.char.decode(values.view(f"S{values.shape[1]}")[:, 0], "utf-8")
    assert decoded.tolist() == ids and ds["sample_id"].dims == ("sample", "byte")


def test_sample_ids_of_a_store_with_the_old_string_dtype(tmp_path: Path) -> None:
    old = Path(shutil.copytree(DATA / "format-v1-store", tmp_path / "old.zarr"))
    store = Store.open(old)
    assert store.layout.sample_id_bytes is None and store.array(SAMPLE_ID).ndim == 1
    assert store.sample_ids() == [f"s{i}" for i in range(12)]
    assert store.sample_ids(4, 6) == ["s4", "s5"]


def test_a_store_with_string_ids_is_not_resumed_by_the_new_writer(tmp_path: Path) -> None:
    """The id width is part of the layout, so the fingerprint tells the two encodings apart."""
    old = Store.open(Path(shutil.copytree(DATA / "format-v1-store", tmp_path / "old.zarr")))
    now = dict(old.description) | {"layout": old.description["layout"] | {"sample_id_bytes": 3}}
    with pytest.raises(ConfigMismatchError, match=r"layout\.sample_id_bytes: None in the store"):
        old.check_compatible(now)
