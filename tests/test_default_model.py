"""The embedded default: shipped weights, reproducibility across thread counts, FLOP counts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from sklearn.datasets import load_digits

from rba_store.approx.surgery import SpanMap, count_flops, replace_spans
from rba_store.extract import default_model  # registers rba_digits_vit with timm
from rba_store.extract.data import DigitsSource, make_preprocess
from rba_store.extract.torchvision_compat import import_timm

timm = import_timm()

DEFAULT_FLOPS = 14_266_624
ARRAYS = {f"h{k}" for k in range(13)} | {"features", "label", "sample_id"}
# a probe on stderr: proves the thread count really reached torch in the subprocess
CLI = (
    "import sys, torch; sys.stderr.write(f'torch threads {torch.get_num_threads()}\\n'); "
    "from rba_store.cli import run; run()"
)


@pytest.fixture(scope="module")
def shipped_test_accuracy() -> float:
    """Top-1 accuracy of the shipped weights with the model's head on the digits test split."""
    model = timm.create_model("rba_digits_vit", pretrained=True).eval()
    source = DigitsSource("test")
    x = source.load(0, len(source), make_preprocess(default_model.DATA_CONFIG))
    # the preprocessing is what the data config says: 0..16 -> 8-bit -> [0, 1] -> normalized
    raw = load_digits().images[[int(i.removeprefix("digits/")) for i in source.sample_ids]]
    by_hand = (np.rint(raw * (255 / 16)) / 255 - 0.305) / 0.376
    np.testing.assert_allclose(x[:, 0].numpy(), by_hand, rtol=0, atol=1e-6)
    with torch.inference_mode():
        predicted = model(x).argmax(1).numpy()
    assert predicted.shape == (360,)
    return float((predicted == source.labels).mean())


def test_shipped_weights_are_accurate_and_recorded(shipped_test_accuracy: float) -> None:
    assert shipped_test_accuracy >= 0.95
    weights = default_model.SHIPPED_WEIGHTS
    report = json.loads(default_model.SHIPPED_REPORT.read_text())
    if "sha256" in report:
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == report["sha256"]
    if "test_accuracy" in report:  # the training report's figure is what the weights give
        assert shipped_test_accuracy == pytest.approx(report["test_accuracy"], abs=0.5 / 360)


def _run_cli(commands: list[tuple[list[str], int]], cwd: Path) -> list[str]:
    """Run CLI commands one after the other, each with its own OMP/MKL thread count; stdouts.

    Sequential, and with OpenMP's passive wait policy (no effect on the results): on a busy
    2-core machine, spinning OpenMP threads make a 2-thread run several times slower.
    """
    outputs = []
    for args, threads in commands:
        env = os.environ | {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1",
        }
        done = subprocess.run(
            [sys.executable, "-c", CLI, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert f"torch threads {threads}\n" in done.stderr, done.stderr
        outputs.append(done.stdout)
    return outputs


def _without_speed(report: dict[str, Any]) -> dict[str, Any]:
    """The report without timings (the timed batch is sized from the measured speed)."""
    for variant in report["variants"]:
        assert variant.pop("images_per_s") > 0
    assert report.pop("timing")["budget_s"] == 1.0
    return report


def test_extraction_and_evaluation_do_not_depend_on_thread_count(
    tmp_path: Path, shipped_test_accuracy: float
) -> None:
    threads = {1: tmp_path / "one_thread.zarr", 2: tmp_path / "two_threads.zarr"}
    stores = list(threads.values())
    _run_cli(
        [(["extract", "--out", str(s), "--limit", "200"], n) for n, s in threads.items()],
        tmp_path,
    )
    one, two = (zarr.open_group(str(s), mode="r", use_consolidated=False) for s in stores)
    assert set(one.array_keys()) == set(two.array_keys()) == ARRAYS
    for name in sorted(ARRAYS):
        a, b = one[name][:], two[name][:]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), f"{name} differs between 1 and 2 threads"
    assert one["h12"].shape == (200, 17, 64) and np.abs(one["h12"][:]).max() > 0
    np.testing.assert_array_equal(one["label"][:], DigitsSource("train").labels[:200])
    described = [dict(g.attrs["rba_store"]) for g in (one, two)]
    runs = [d.pop("run") for d in described]
    assert described[0] == described[1]
    assert {k: v for k, v in runs[0].items() if k != "created"} == {
        k: v for k, v in runs[1].items() if k != "created"
    }

    outputs = _run_cli(
        [(["evaluate", str(s), "--identity", "5:6", "--json"], n) for n, s in threads.items()],
        tmp_path,
    )
    reports = [_without_speed(json.loads(out)) for out in outputs]
    assert reports[0] == reports[1]
    original, dropped = reports[0]["variants"]
    assert (original["name"], dropped["name"]) == ("original", "identity 5:6")
    assert reports[0]["test_samples"] == 360
    assert original["accuracy"] == pytest.approx(shipped_test_accuracy, abs=1e-12)
    assert (original["blocks"], dropped["blocks"], dropped["spans"]) == (12, 11, [[5, 6]])
    assert original["flops"] == DEFAULT_FLOPS
    assert dropped["flops"] == DEFAULT_FLOPS - block_flops(17, 64, 128)


def analytic_vit_flops(
    *,
    img_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_hidden: int,
    num_classes: int,
    prefix_tokens: int = 1,
) -> int:
    """2 FLOPs per multiply-add of every matrix product of a class-token ViT (timm layout).

    Patch-embedding convolution, per block qkv, Q·Kᵀ and A·V of every head, attention
    projection, fc1 and fc2; the head on the pooled class token. Norms, softmax, GELU and bias
    additions are not counted (the torch counter's convention).
    """
    patches = (img_size // patch_size) ** 2
    n, d, head_dim = patches + prefix_tokens, embed_dim, embed_dim // num_heads
    patch_embed = 2 * patches * (in_chans * patch_size * patch_size) * d
    qkv = 2 * n * d * 3 * d
    scores = num_heads * 2 * n * n * head_dim  # Q·Kᵀ, per head (n x head_dim) @ (head_dim x n)
    mix = num_heads * 2 * n * n * head_dim  # A·V, per head (n x n) @ (n x head_dim)
    proj = 2 * n * d * d
    mlp = 2 * n * d * mlp_hidden + 2 * n * mlp_hidden * d
    head = 2 * d * num_classes
    return patch_embed + depth * (qkv + scores + mix + proj + mlp) + head


def block_flops(tokens: int, d: int, mlp_hidden: int) -> int:
    return (
        2 * tokens * d * 3 * d
        + 2 * 2 * tokens * tokens * d
        + 2 * tokens * d * d
        + (4 * tokens * d * mlp_hidden)
    )


DEFAULT_CONFIG = dict(
    img_size=8,
    patch_size=2,
    in_chans=1,
    embed_dim=64,
    depth=12,
    num_heads=4,
    mlp_hidden=128,
    num_classes=10,
)


def test_default_flops_match_an_analytic_count() -> None:
    arch = default_model.ARCHITECTURE
    assert {k: arch[k] for k in DEFAULT_CONFIG if k != "mlp_hidden"} == {
        k: v for k, v in DEFAULT_CONFIG.items() if k != "mlp_hidden"
    }
    assert int(arch["embed_dim"] * arch["mlp_ratio"]) == DEFAULT_CONFIG["mlp_hidden"]
    expected = analytic_vit_flops(**DEFAULT_CONFIG)
    assert expected == DEFAULT_FLOPS
    model = timm.create_model("rba_digits_vit").eval()  # FLOPs do not depend on the weights
    assert count_flops(model, (1, 8, 8)) == pytest.approx(expected, rel=0.01)
    # the fused CPU attention kernel and timm's explicit matmul path count the same
    for block in model.blocks:
        block.attn.fused_attn = False
    assert count_flops(model, (1, 8, 8)) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    ("spans", "linear"),
    [((3, 5), True), ((7, 8), False)],
)
def test_flops_of_replaced_spans(spans: tuple[int, int], linear: bool) -> None:
    model = timm.create_model("rba_digits_vit").eval()
    n, d = 17, 64
    rng = np.random.default_rng(0)
    t, bias = rng.normal(size=(d, d)), rng.normal(size=d)
    span_map = SpanMap(spans, t, bias) if linear else SpanMap(spans)
    variant = replace_spans(model, [span_map])
    removed = spans[1] - spans[0]
    expected = DEFAULT_FLOPS - removed * block_flops(n, d, 128) + (2 * n * d * d if linear else 0)
    assert count_flops(variant, (1, 8, 8)) == pytest.approx(expected, rel=0.01)


def test_flops_with_two_spans_replaced() -> None:
    model = timm.create_model("rba_digits_vit").eval()
    n, d = 17, 64
    rng = np.random.default_rng(1)
    maps = [SpanMap((3, 5), rng.normal(size=(d, d)), rng.normal(size=d)), SpanMap((7, 8))]
    variant = replace_spans(model, maps)
    assert len(variant.blocks) == 12 - 3 + 2
    expected = DEFAULT_FLOPS - 3 * block_flops(n, d, 128) + 2 * n * d * d
    assert expected == analytic_vit_flops(**(DEFAULT_CONFIG | {"depth": 9})) + 2 * n * d * d
    assert count_flops(variant, (1, 8, 8)) == pytest.approx(expected, rel=0.01)
    assert count_flops(model, (1, 8, 8)) == pytest.approx(DEFAULT_FLOPS, rel=0.01)  # untouched


def test_flops_of_another_vit_match_the_analytic_count() -> None:
    """timm's small test_vit (random weights): 160x160 RGB, 16x16 patches, width 64, 6 blocks."""
    model = timm.create_model("test_vit").eval()
    config = dict(
        img_size=160,
        patch_size=16,
        in_chans=3,
        embed_dim=64,
        depth=6,
        num_heads=2,
        mlp_hidden=192,
        num_classes=1000,
    )
    assert (model.embed_dim, len(model.blocks), model.num_classes) == (64, 6, 1000)
    assert model.blocks[0].mlp.fc1.out_features == 192 and model.blocks[0].attn.num_heads == 2
    assert model.patch_embed.proj.kernel_size == (16, 16) and model.patch_embed.num_patches == 100
    expected = analytic_vit_flops(**config)
    assert count_flops(model, (3, 160, 160)) == pytest.approx(expected, rel=0.01)
