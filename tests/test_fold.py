"""Issue 20: maps folded into the weights. The folded fit against lstsq on the block recomputed
from the stored h_{a-1}; the folded model against the unfolded computation (the map applied to
block a's MLP output) on the embedded default, a random ViT with LayerScale and a random Llama;
loading in a process that never imports rba_store; parameters; refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_store.approx import SpanMap, count_parameters
from rba_store.approx import rebuild as rebuild_mod
from rba_store.approx.decoder import DecoderNetwork
from rba_store.approx.evaluate import fit_variant
from rba_store.approx.fold import fold_model
from rba_store.approx.fold_site import fold_site
from rba_store.approx.network import SplitNetwork
from rba_store.approx.rebuild import rebuild_model
from rba_store.approx.recipe import write_approximated
from rba_store.errors import UsageError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.extract.data import make_preprocess
from rba_store.solve import FitOptions, fit_spans
from rba_store.store import Store
from tests.test_approx import run_cli
from tests.test_language import SEQ, _extract, lm  # noqa: F401 (the fixture)

# python -S reads no .pth file (this environment's torchvision hook is one, and imports
# rba_store._torchvision_hook): site-packages goes on sys.path by hand, and where torchvision's
# extension is broken (CPU torch here) the two schemas are declared as a user would, inline.
FRESH = """import sys
sys.path.append({purelib!r})
import torch
try:
    import torchvision
except RuntimeError:
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
{body}
assert not [m for m in sys.modules if m.startswith("rba_store")], "rba_store was imported"
"""


PURELIB = sysconfig.get_paths()["purelib"]  # this environment's site-packages


def _fresh_python(body: str, cwd: Path) -> str:
    """Run ``body`` in a new interpreter that never imports rba_store; its stdout."""
    done = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            FRESH.format(body=body, purelib=sysconfig.get_paths()["purelib"]),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def digits(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the embedded default's store with folded fits 3:6 (affine) and 0:2."""
    out = tmp_path_factory.mktemp("fold") / "digits.zarr"
    shutil.copytree(small_store, out)
    fit_spans(out, FitOptions(spans=((3, 6),), fold=True, bias=True))
    fit_spans(out, FitOptions(spans=((0, 2),), fold=True))
    return out


def _removed_params(model: torch.nn.Module, blocks: list[torch.nn.Module], maps: list) -> int:
    return sum(count_parameters(blocks[i]) for m in maps for i in range(*m.span))


def test_folded_fit_equals_lstsq_on_the_block_recomputed_from_the_stored_input(
    digits: Path,
) -> None:
    store = Store.open(digits)
    fit = fit_spans(store, FitOptions(spans=((3, 6),), fold=True, bias=True))[0]
    assert fit.reused and fit.diagnostics["folded"] and fit.name == "3-6-bias-fold"
    block = rebuild_model(store.description["model"], None, store).module.blocks[2]
    xs, ys = [], []
    for shard in range(store.layout.n_shards):  # block 3 on h2, shard by shard, as float32
        start, stop = store.layout.shard_rows(shard)
        h2, h6 = (torch.from_numpy(store.point(k)[start:stop]) for k in (2, 6))
        with torch.inference_mode():
            r = h2 + block.ls1(block.attn(block.norm1(h2)))
            m = block.ls2(block.mlp(block.norm2(r)))
        xs.append(m.reshape(-1, 64).double().numpy())
        ys.append((h6 - r).reshape(-1, 64).double().numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    t, c = solution[:-1], solution[-1]
    assert np.abs(fit.solution.t - t).max() <= 1e-8 * np.abs(t).max()
    assert np.abs(fit.solution.bias - c).max() <= 1e-8 * np.abs(c).max()


def test_folded_default_equals_the_unfolded_computation_minus_exactly_the_blocks(
    digits: Path,
) -> None:
    store = Store.open(digits)
    # float64: the folding's algebra, not float32 rounding amplified by T (see the README)
    model = rebuild_model(store.description["model"], None, store).module.double()
    maps = [*fit_variant(store, ["3-6-bias-fold", "0-2-fold"]).maps, SpanMap((8, 9))]
    folded = fold_model(model, maps)
    net = SplitNetwork(model, maps)  # the map applied to m_3 inside block 3, and to h0
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    with torch.inference_mode():
        want = net.features(net.run(net.stem(x), 0), pre_logits=False)
        got = folded(x)
    assert (got - want).abs().max() < 1e-5
    assert len(folded.blocks) == 12 - 6
    removed = _removed_params(model, list(model.blocks), maps)
    assert count_parameters(folded) == count_parameters(model) - removed


def test_folded_vit_loads_without_rba_store_and_predicts_what_evaluate_reported(
    digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "folded"
    code, said, err = run_cli(capsys, "apply", digits, "--fit", "3-6-bias-fold", "--out", out)
    assert code == 2 and "add --fold" in err  # a folded fit is never inserted by mistake
    code, said, _ = run_cli(
        capsys, "apply", digits, "--fit", "3-6-bias-fold", "--fold", "--out", out
    )
    assert code == 0 and "9 blocks" in said, said
    config = json.loads((out / "config.json").read_text())
    assert config["kwargs"]["depth"] == 9
    assert json.loads((out / "recipe.json").read_text())["spans"][0]["kind"] == "folded"
    code, said, _ = run_cli(capsys, "evaluate", digits, "--fit", "3-6-bias-fold", "--json")
    reported = {v["name"]: v for v in json.loads(said)["variants"]}["3-6-bias-fold"]
    store = Store.open(digits)
    source = rebuild_mod.test_source(store.description["data"])
    loaded = rebuild_model(store.description["model"], None, store)
    np.save(tmp_path / "x.npy", source.load(0, len(source), make_preprocess(loaded.data_config)))
    body = (
        "import json, numpy, torch\n"
        "from safetensors.torch import load_file\n"
        "from timm.models.vision_transformer import VisionTransformer\n"
        "model = VisionTransformer(**json.load(open('folded/config.json'))['kwargs']).eval()\n"
        "model.load_state_dict(load_file('folded/model.safetensors'))\n"
        "with torch.inference_mode():\n"
        "    print(json.dumps(model(torch.from_numpy(numpy.load('x.npy'))).argmax(1).tolist()))"
    )
    predicted = np.array(json.loads(_fresh_python(body, tmp_path)))
    assert (predicted == source.labels).mean() == reported["accuracy"]
    removed = _removed_params(loaded.module, list(loaded.module.blocks), [SpanMap((3, 6))])
    assert reported["params"] == count_parameters(loaded.module) - removed


def test_random_vit_with_layer_scale_folds_exactly(tmp_path: Path) -> None:
    """timm's test_vit2: LayerScale, a register token and no class token."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(6, 3, 224, 224)).astype(np.float32))
    options = ExtractOptions(model="test_vit2", data=str(tmp_path / "x.npz"), batch_size=6)
    run_extraction(plan_extraction(options), tmp_path / "s.zarr")
    store = Store.open(tmp_path / "s.zarr")
    fit_spans(store, FitOptions(spans=((2, 4), (0, 1)), fold=True, bias=True, ridge=1e-6))
    model = rebuild_model(store.description["model"], None, store).module.double()
    assert (
        float(model.blocks[1].ls2.gamma.detach().abs().max()) < 1e-3
    )  # LayerScale really is there
    maps = fit_variant(store, ["2-4-bias-ridge1e-06-fold", "0-1-bias-ridge1e-06-fold"]).maps
    folded = fold_model(model, maps)
    net = SplitNetwork(model, maps)
    x = torch.from_numpy(rng.normal(size=(2, 3, 224, 224)))
    with torch.inference_mode():
        want = net.features(net.run(net.stem(x), 0), pre_logits=False)
        got = folded(x)
    assert (got - want).abs().max() < 1e-5
    assert bool((folded.blocks[0].ls2.gamma == 1).all())  # block 2 of 8, now the first
    removed = _removed_params(model, list(model.blocks), maps)
    assert count_parameters(folded) == count_parameters(model) - removed
    write_approximated(store, maps, ["a", "b"], tmp_path / "m", fold=True)
    from rba_store.approx.fold import load_folded_vit  # VisionTransformer(**kwargs)

    reloaded = load_folded_vit(tmp_path / "m")  # float32, as written
    with torch.inference_mode():
        assert torch.equal(reloaded(x.float()), fold_model(model.float(), maps)(x.float()))


def test_random_llama_folds_exactly_and_generates_with_its_cache(
    lm: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    store = _extract(lm, "llama", tmp_path / "llama.zarr")
    fit_spans(store, FitOptions(spans=((0, 1), (2, 4)), fold=True))
    model = rebuild_model(store.description["model"], None, store).module.double()
    maps = fit_variant(store, ["0-1-fold", "2-4-fold"]).maps
    folded = fold_model(model, maps)
    assert folded.config.num_hidden_layers == 1
    ids = torch.from_numpy(np.asarray(store.array("input_ids")[:4], dtype=np.int64))
    net = DecoderNetwork(model, maps)
    with torch.inference_mode():
        want = net.logits(net.run(net.stem(ids), 0))
        got = folded(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5
    removed = _removed_params(model, list(model.model.layers), maps)
    assert count_parameters(folded) == count_parameters(model) - removed
    write_approximated(store, maps, ["0-1-fold", "2-4-fold"], tmp_path / "m", fold=True)
    np.save(tmp_path / "ids.npy", ids.numpy())
    with torch.inference_mode():
        written = fold_model(model.float(), maps)(input_ids=ids, use_cache=False).logits
    np.save(tmp_path / "logits.npy", written.numpy())
    body = (
        "import numpy, torch, transformers\n"
        "model = transformers.AutoModelForCausalLM.from_pretrained('m').eval()\n"
        "assert model.config.num_hidden_layers == 1\n"
        "ids = torch.from_numpy(numpy.load('ids.npy'))\n"
        "with torch.inference_mode():\n"
        "    logits = model(input_ids=ids, use_cache=False).logits\n"
        "    assert (logits - torch.from_numpy(numpy.load('logits.npy'))).abs().max() < 1e-5\n"
        "    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)\n"
        "    cached = model.generate(ids[:2, :8], use_cache=True, **kw)\n"
        "    plain = model.generate(ids[:2, :8], use_cache=False, **kw)\n"
        "assert torch.equal(cached, plain)\n"
        "print('ok')"
    )
    assert _fresh_python(body, tmp_path).strip() == "ok"


def test_a_span_that_cannot_fold_is_refused_in_one_line(
    lm: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import timm

    with pytest.raises(UsageError, match=r"^span 0:2 cannot be folded: h0 .*norm_pre.*--fold"):
        fold_site(timm.create_model("test_vit", pre_norm=True), (0, 2))
    _extract(lm, "gpt2", tmp_path / "gpt2.zarr")
    for span in ("0:2", "1:3"):
        code, _, err = run_cli(capsys, "fit", tmp_path / "gpt2.zarr", "--span", span, "--fold")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"span {span} cannot be folded" in err and "without --fold" in err
