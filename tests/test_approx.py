"""Surgery, apply/load round trip, and evaluation of approximated models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_store.approx import LinearReplacement, SpanMap, count_parameters, replace_spans
from rba_store.approx.recipe import load_approximated
from rba_store.cli import main
from rba_store.errors import ModelError, UsageError
from rba_store.extract.capture import ActivationCapture
from rba_store.extract.models import build_model
from rba_store.solve import NormalEquations, solve
from tests.conftest import tree_digest


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fitted_map_of_a_linear_block_reproduces_the_model() -> None:
    """Make block 4 exactly linear; the map fitted from activations replaces it exactly."""
    loaded = build_model("test_vit")
    model = loaded.module
    rng = np.random.default_rng(0)
    d = model.embed_dim
    w, c = np.eye(d) + 0.1 * rng.normal(size=(d, d)), rng.normal(size=d)
    model.blocks[3] = LinearReplacement(w, c)  # a linear toy block: h4 = h3 @ w + c
    x = torch.randn(6, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    captured = ActivationCapture(loaded)(x)
    h3 = captured.points[3].reshape(-1, d).double().numpy()
    h4 = captured.points[4].reshape(-1, d).double().numpy()
    solution = solve(NormalEquations.from_chunk(h3, h4), bias=True)
    np.testing.assert_allclose(solution.t, w, atol=1e-4)
    approx = replace_spans(model, [SpanMap((3, 4), solution.t, solution.bias)])
    with torch.inference_mode():
        torch.testing.assert_close(approx(x), model(x), rtol=1e-4, atol=1e-4)


def test_parameter_counts_match_hand_counts() -> None:
    model = build_model("vit_tiny_patch16_224").module
    d = model.embed_dim
    block = 12 * d * d + 13 * d  # qkv 3D²+3D, proj D²+D, fc1 4D²+4D, fc2 4D²+D, two norms 4D
    assert count_parameters(model.blocks[0]) == block
    t = np.eye(d)
    two = replace_spans(model, [SpanMap((2, 4), t, np.zeros(d)), SpanMap((8, 9), t, np.zeros(d))])
    assert count_parameters(two) == count_parameters(model) - 3 * block + 2 * (d * d + d)
    dropped = replace_spans(model, [SpanMap((2, 4)), SpanMap((8, 9))])
    assert count_parameters(dropped) == count_parameters(model) - 3 * block
    assert len(two.blocks) == 12 - 3 + 2 and len(model.blocks) == 12  # the original is untouched


def test_identity_equals_running_without_the_blocks() -> None:
    model = build_model("test_vit").module
    x = torch.randn(2, 3, 160, 160)
    dropped = replace_spans(model, [SpanMap((1, 3))])
    with torch.inference_mode():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for i, block in enumerate(model.blocks):
            if i not in (1, 2):
                h = block(h)
        expected = model.forward_head(model.norm(h))
        torch.testing.assert_close(dropped(x), expected)


@pytest.mark.parametrize(
    ("maps", "message"),
    [
        ([SpanMap((1, 3)), SpanMap((2, 4))], "overlap"),
        ([SpanMap((2, 3), np.eye(32), np.zeros(32))], "is 32x32, but the model's blocks are 64"),
        ([SpanMap((4, 9))], "out of range for a model of 6 blocks"),
    ],
)
def test_bad_span_maps(maps: list[SpanMap], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        replace_spans(build_model("test_vit").module, maps)


@pytest.fixture()
def fitted_store(tmp_path: Path, small_store: Path) -> Path:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    assert main(["fit", str(store), "--span", "5:6", "--span", "8:10", "--bias"]) == 0
    return store


def test_apply_round_trip(
    fitted_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    code, stdout, err = run_cli(
        capsys,
        "apply",
        fitted_store,
        "--fit",
        "5-6-bias",
        "--fit",
        "8-10-bias",
        "--identity",
        "1:2",
        "--out",
        out,
    )
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and "load_approximated" in stdout
    recipe = json.loads((out / "recipe.json").read_text())
    assert [s["span"] for s in recipe["spans"]] == [[5, 6], [8, 10], [1, 2]]
    loaded = load_approximated(out)
    from rba_store.approx.evaluate import fit_variant

    maps = [*fit_variant(fitted_store, ["5-6-bias", "8-10-bias"]).maps, SpanMap((1, 2))]
    in_memory = replace_spans(build_model().module, maps)
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), in_memory(x), rtol=0, atol=0)
    assert len(loaded.blocks) == 12 - 1 - 2 - 1 + 3


def test_evaluate_json(fitted_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "evaluate", fitted_store, "--fit", "5-6-bias", "--identity", "5:6", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["classifier"] == "model head"
    original, fitted, dropped = report["variants"]
    assert original["name"] == "original" and original["spans"] == [] and original["agreement"] == 1
    assert fitted["spans"] == [[5, 6]] and dropped["name"].startswith("identity")
    assert original["accuracy"] >= 0.95
    assert fitted["params"] < original["params"] and dropped["params"] < fitted["params"]
    assert fitted["flops"] < original["flops"] and original["images_per_s"] > 0
    assert {"name", "spans", "accuracy", "params", "flops", "images_per_s", "agreement"} <= set(
        fitted
    )


def test_evaluate_auto_sweep(
    fitted_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "evaluate", fitted_store, "--auto", "--max-blocks", "3", "--plots", tmp_path
    )
    assert code == 0, err
    assert "linear -3" in out and "identity -3" in out and "within 1 point" in out
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(capsys, "info", fitted_store, "--json")
    import zarr

    fits = zarr.open_group(str(fitted_store), mode="r", use_consolidated=False)["fits"]
    assert len(list(fits.group_keys())) >= 3  # the sweep's fits are saved like any other


def test_linear_probe_when_the_head_was_not_trained_for_the_data(tmp_path: Path) -> None:
    from rba_store.approx.evaluate import evaluate_variants, identity_variant
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

    store = tmp_path / "vit.zarr"
    run_extraction(
        plan_extraction(ExtractOptions(model="test_vit", limit=30, batch_size=10)), store
    )
    report = evaluate_variants(store, [identity_variant([(2, 3)])], batch_size=90)
    assert report["classifier"].startswith("linear probe")
    assert report["test_samples"] == 360 and 0 <= report["variants"][1]["accuracy"] <= 1


def test_bad_input(
    fitted_store: Path, small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(small_store)
    code, _, err = run_cli(capsys, "evaluate", small_store)
    assert code == 2 and "nothing to evaluate" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(
        capsys,
        "apply",
        fitted_store,
        "--identity",
        "1:3",
        "--identity",
        "2:4",
        "--out",
        tmp_path / "m",
    )
    assert code == 2 and "overlap" in err and not (tmp_path / "m").exists()
    code, _, err = run_cli(capsys, "apply", fitted_store, "--fit", "nope", "--out", tmp_path / "m")
    assert code == 2 and "no fit 'nope'" in err
    assert tree_digest(small_store) == before


def test_moved_weights_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

    weights = tmp_path / "w.pth"
    torch.save(build_model("test_vit").module.state_dict(), weights)
    store = tmp_path / "s.zarr"
    run_extraction(
        plan_extraction(ExtractOptions(model="test_vit", checkpoint=weights, limit=4)), store
    )
    moved = tmp_path / "elsewhere.pth"
    weights.rename(moved)
    code, _, err = run_cli(capsys, "evaluate", store, "--identity", "2:3")
    assert code == 1
    assert f"the weights file '{weights}'" in err and "--checkpoint PATH" in err
    with pytest.raises(ModelError, match="is missing"):
        from rba_store.approx.rebuild import rebuild_model
        from rba_store.store import Store

        rebuild_model(Store.open(store).description["model"])
    code, _, err = run_cli(capsys, "evaluate", store, "--identity", "2:3", "--checkpoint", moved)
    assert code == 0, err


def test_random_weights_are_kept_in_the_store_not_redrawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rba_store.approx.evaluate import evaluate_variants, identity_variant
    from rba_store.approx.recipe import load_approximated
    from rba_store.extract.models import model_weights_sha256
    from rba_store.store import WEIGHTS_PATH, Store

    store = tmp_path / "random.zarr"
    code, _, err = run_cli(
        capsys, "extract", "--model", "test_vit", "--limit", "20", "--out", store
    )
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 2 and "random weights" in warning[0]  # at the start and the end
    description = Store.open(store).description["model"]["weights"]
    assert description["source"] == "random" and description["stored"] == WEIGHTS_PATH
    # Another draw of the "same" random init (other seed, other thread count) must not matter.
    real_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: real_seed(seed + 1))
    reports = []
    threads_before = torch.get_num_threads()
    for threads in (1, 2, 1, 2, 1):
        torch.set_num_threads(threads)
        try:
            report = evaluate_variants(store, [identity_variant([(2, 3)])], batch_size=120)
        finally:
            torch.set_num_threads(threads_before)
        reports.append(
            [{k: v for k, v in r.items() if k != "images_per_s"} for r in report["variants"]]
        )
    assert all(r == reports[0] for r in reports)
    code, _, err = run_cli(capsys, "apply", store, "--identity", "2:3", "--out", tmp_path / "m")
    assert code == 0, err
    model = load_approximated(tmp_path / "m")
    kept = build_model("test_vit").module
    from safetensors.torch import load

    kept.load_state_dict(load(Store.open(store).read_weights()))
    assert model_weights_sha256(kept) == description["sha256"]
    torch.testing.assert_close(model.patch_embed.proj.weight, kept.patch_embed.proj.weight)
