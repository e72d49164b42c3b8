"""Extraction: stored activations equal a direct forward pass; layout, options, resume."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from rba_store import store as rs
from rba_store.errors import ConfigMismatchError, ModelError, UsageError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.extract.models import sha256_file
from tests.conftest import tree_digest


@torch.inference_mode()
def vit_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:
    """h0..hL and head features of a timm ViT, computed block by block by hand."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    points = [h]
    for block in model.blocks:
        h = block(h)
        points.append(h)
    features = model.forward_head(model.norm(h), pre_logits=True)
    return [p.numpy() for p in points], features.numpy()


@torch.inference_mode()
def resnet_reference(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    points = [h]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            h = block(h)
            points.append(h)
    return [p.flatten(2).transpose(1, 2).numpy() for p in points]


def assert_close(stored: np.ndarray, expected: np.ndarray, rtol: float = 1e-6) -> None:
    scale = np.abs(expected).max()
    np.testing.assert_allclose(stored, expected, rtol=0, atol=rtol * scale)


def read_points(store: Path) -> list[np.ndarray]:
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    layout = rs.StoreLayout.from_attrs(group.attrs["rba_store"]["layout"])
    return [group[rs.h_name(k)][:] for k in range(layout.n_blocks + 1)]


def test_default_store_equals_direct_forward(small_store: Path) -> None:
    plan = plan_extraction(ExtractOptions(limit=50))
    x = plan.source.load(0, 50, plan.preprocess)
    expected, features = vit_reference(plan.loaded.module, x)
    stored = read_points(small_store)
    assert len(stored) == 13
    for k, (s, e) in enumerate(zip(stored, expected, strict=True)):
        assert s.shape == (50, 17, 64), k
        assert_close(s, e)
    group = zarr.open_group(str(small_store), mode="r", use_consolidated=False)
    assert_close(group["features"][:], features)
    np.testing.assert_array_equal(group["label"][:], plan.source.labels)
    assert rs.Store.open(small_store).sample_ids() == plan.source.sample_ids
    # the class token really is there: token 0 is the class token, not a patch
    cls_embedding = (plan.loaded.module.cls_token + plan.loaded.module.pos_embed[:, :1]).detach()
    np.testing.assert_allclose(stored[0][:, 0], cls_embedding.numpy()[0].repeat(50, 0), atol=1e-6)


def test_store_layout_ledger_and_attributes(small_store: Path) -> None:
    group = zarr.open_group(str(small_store), mode="r", use_consolidated=False)
    h3 = group["h3"]
    assert h3.chunks == (10, 17, 64) and h3.shards == (20, 17, 64)
    assert np.asarray(group["ledger/shards"][:]).astype(bool).tolist() == [
        True,
        True,
        True,
    ]  # 20 + 20 + 10
    attrs = group.attrs["rba_store"]
    assert attrs["format_version"] == rs.FORMAT_VERSION
    assert attrs["model"]["name"] == "rba_digits_vit"
    weights = attrs["model"]["weights"]
    assert weights["source"] == "embedded" and weights["sha256"] == sha256_file(weights["path"])
    assert attrs["data"] | {} == attrs["data"] and attrs["data"]["split"] == "train"
    assert attrs["preprocessing"]["input_size"] == [1, 8, 8]
    assert attrs["tokens"] == "all" and attrs["dtype"] == "float32"
    assert set(attrs["versions"]) >= {"torch", "timm", "zarr", "numcodecs", "rba_store"}
    assert attrs["fingerprint"] == rs.fingerprint(attrs)


def test_store_opens_with_xarray_and_dask(small_store: Path) -> None:
    ds = xr.open_zarr(small_store)  # plain call, no warning (consolidated metadata is written)
    assert {f"h{k}" for k in range(13)} <= set(ds.data_vars)
    assert ds["h0"].dims == ("sample", "token", "channel")
    assert ds["features"].dims == ("sample", "channel")
    assert ds["label"].dtype == np.int64 and ds["sample_id"].dims == ("sample", "byte")
    lazy = da.from_zarr(str(small_store), component="h12")
    assert lazy.shape == (50, 17, 64)
    np.testing.assert_array_equal(lazy.compute(), ds["h12"].values)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cls_tokens_and_dtype(tmp_path: Path, small_store: Path, dtype: str) -> None:
    out = tmp_path / "cls.zarr"
    options = ExtractOptions(limit=50, batch_size=16, tokens="cls", dtype=dtype, codec="zstd")
    run_extraction(plan_extraction(options), out)
    full = read_points(small_store)
    for stored, reference in zip(read_points(out), full, strict=True):
        assert stored.shape == (50, 1, 64) and stored.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(stored, reference[:, :1].astype(dtype))


def test_checkpoint_weights_and_register_tokens(tmp_path: Path) -> None:
    """A state dict the test saves is what gets loaded; prefix (register) tokens are kept."""
    from rba_store.extract.torchvision_compat import import_timm

    timm = import_timm()
    torch.manual_seed(123)
    model = timm.create_model("test_vit2").eval()  # 1 register token, no class token
    checkpoint = tmp_path / "weights.pth"
    torch.save(model.state_dict(), checkpoint)
    options = ExtractOptions(model="test_vit2", checkpoint=checkpoint, limit=5, batch_size=2)
    plan = plan_extraction(options)
    out = tmp_path / "vit2.zarr"
    run_extraction(plan, out)
    x = plan.source.load(0, 5, plan.preprocess)
    expected, features = vit_reference(model, x)
    stored = read_points(out)
    assert stored[0].shape[1] == 1 + (160 // 16) ** 2  # the register token is kept
    for s, e in zip(stored, expected, strict=True):
        assert_close(s, e)
    group = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert_close(group["features"][:], features)
    weights = group.attrs["rba_store"]["model"]["weights"]
    assert weights == {
        "source": "checkpoint",
        "path": str(checkpoint),
        "sha256": sha256_file(checkpoint),
    }


def test_safetensors_checkpoint_is_loaded(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from rba_store.extract.models import build_model

    reference = build_model("test_vit")
    state = {k: v + 1.0 for k, v in reference.module.state_dict().items()}
    path = tmp_path / "shifted.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = build_model("test_vit", checkpoint=path)
    for key, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_hooks_path_matches_forward_intermediates() -> None:
    plan = plan_extraction(ExtractOptions(limit=4))
    x = plan.source.load(0, 4, plan.preprocess)
    assert plan.capture.method == "forward_intermediates"
    fast = plan.capture(x)
    plan.capture.method = "hooks"
    hooked = plan.capture(x)
    for a, b in zip(fast.points, hooked.points, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(fast.features, hooked.features, rtol=0, atol=0)


def test_cnn_blocks_keep_their_own_shapes(tmp_path: Path) -> None:
    plan = plan_extraction(ExtractOptions(model="test_resnet", limit=3, batch_size=2))
    assert plan.capture.method == "hooks"
    out = tmp_path / "resnet.zarr"
    run_extraction(plan, out)
    expected = resnet_reference(plan.loaded.module, plan.source.load(0, 3, plan.preprocess))
    stored = read_points(out)
    assert len(stored) == len(expected) == len(plan.loaded.block_names) + 1
    for s, e in zip(stored, expected, strict=True):
        assert_close(s, e)
    ds = xr.open_zarr(out)
    assert ds["h1"].dims == ("sample", "token_h1", "channel_h1")
    group = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert len(group["h0"].attrs["source_shape"]) == 3  # (C, H, W) of the block's own output


def test_staged_models_are_supported() -> None:
    plan = plan_extraction(ExtractOptions(model="test_convnext", limit=2))
    assert plan.loaded.block_names[0] == "stages.0.blocks.0"
    assert len(plan.layout.points) == len(plan.loaded.block_names) + 1


def test_interrupted_extraction_resumes_to_identical_store(
    tmp_path: Path, small_store: Path
) -> None:
    options = ExtractOptions(limit=50, batch_size=16, chunk_samples=10, shard_samples=20)
    plan = plan_extraction(options)
    real_load = plan.source.load
    calls = {"n": 0}

    def flaky_load(start: int, stop: int, preprocess):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:  # batches: [0,16) [16,20) [20,36) [36,40) ...: dies in shard 1
            raise KeyboardInterrupt
        return real_load(start, stop, preprocess)

    plan.source.load = flaky_load  # type: ignore[method-assign]
    out = tmp_path / "resumed.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_extraction(plan, out)
    group = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert np.asarray(group["ledger/shards"][:]).astype(bool).tolist() == [True, False, False]

    result = run_extraction(plan_extraction(options), out)
    assert result.resumed and result.shards_written == 2
    for resumed, uninterrupted in zip(read_points(out), read_points(small_store), strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)
    again = run_extraction(plan_extraction(options), out)
    assert again.shards_written == 0


def test_changed_configuration_is_refused_and_store_kept(tmp_path: Path, small_store: Path) -> None:
    before = tree_digest(small_store)
    plan = plan_extraction(ExtractOptions(limit=50, batch_size=16, dtype="float16"))
    with pytest.raises(ConfigMismatchError, match=r"dtype: 'float32' in the store, 'float16' now"):
        run_extraction(plan, small_store)
    assert tree_digest(small_store) == before


def test_overwrite_replaces_store_but_never_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extraction(plan_extraction(ExtractOptions(limit=8)), out)
    run_extraction(plan_extraction(ExtractOptions(limit=8, tokens="cls")), out, overwrite=True)
    assert read_points(out)[0].shape == (8, 1, 64)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not an rba-store store"):
        run_extraction(plan_extraction(ExtractOptions(limit=8)), foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_cls_needs_a_class_token() -> None:
    with pytest.raises(ModelError, match=r"--tokens cls needs a class token.*test_vit2"):
        plan_extraction(ExtractOptions(model="test_vit2", tokens="cls", limit=2))


def test_layout_chunks_are_balanced_and_sized() -> None:
    point = rs.CapturePoint(197, 768, (197, 768))
    layout = rs.plan_layout(1000, [point] * 13, 768, "float16")
    chunk_bytes = layout.chunk_samples * 197 * 768 * 2
    assert 1 * 2**20 <= chunk_bytes <= 16 * 2**20
    assert layout.shard_samples % layout.chunk_samples == 0
    small = rs.plan_layout(1437, [rs.CapturePoint(17, 64, (17, 64))] * 13, 64)
    assert small.chunk_samples == 719  # two balanced chunks rather than 963 + 474
