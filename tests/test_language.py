"""Hugging Face decoders (issue 19): the stored residual stream against independent forwards,
fits against lstsq, layer removal against deleting layers by hand, generation with its cache,
perplexity against the model's own loss, and bad input."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rba_store.approx import SpanMap
from rba_store.approx.decoder import replace_decoder_spans
from rba_store.approx.recipe import load_approximated
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.extract.language_model import build_language_model, decoder_parts
from rba_store.extract.text import TextSource
from rba_store.solve import FitOptions, fit_spans, load_fit
from rba_store.store import INPUT_IDS, Store
from tests._language import make_model, train_tokenizer, write_corpus
from tests.conftest import tree_digest
from tests.test_approx import run_cli

SEQ = 16


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    documents = write_corpus(root / "corpus.jsonl")
    tokenizer = train_tokenizer(documents)
    folders = {k: make_model(k, root / k, tokenizer) for k in ("llama", "gpt2", "qwen2")}
    return {"root": root, "corpus": root / "corpus.jsonl", **folders}


def _extract(lm: dict[str, Path], kind: str, out: Path, **extra: object) -> Store:
    options = ExtractOptions(
        model=str(lm[kind]), data=str(lm["corpus"]), seq_len=SEQ, limit=48, batch_size=16,
        chunk_samples=8, shard_samples=16, **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    run_extraction(plan_extraction(options), out)
    return Store.open(out)


@pytest.fixture(scope="module")
def llama_store(lm: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm-store") / "llama.zarr"
    _extract(lm, "llama", out)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_stored_points_are_the_layers_outputs_before_the_final_norm(
    lm: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    store = _extract(lm, kind, tmp_path / "s.zarr")
    ids = torch.from_numpy(np.asarray(store.array(INPUT_IDS)[:8], dtype=np.int64))
    loaded = build_language_model(lm[kind])
    source = TextSource(lm["corpus"], loaded.tokenizer, SEQ, "train")
    assert torch.equal(ids, source.load(0, 8))  # the windows, in order
    with torch.inference_mode():
        hidden = loaded.module(input_ids=ids, output_hidden_states=True).hidden_states
    _, layers, norm = decoder_parts(loaded.module)
    n = len(layers)
    stored = [torch.from_numpy(np.asarray(store.point(k)[:8])) for k in range(n + 1)]
    for k in range(n):  # h0 (embeddings) .. h_{L-1}: exactly what the model's own output says
        torch.testing.assert_close(stored[k], hidden[k], atol=1e-5, rtol=0)
    # h_L is the last layer's output: the model's last hidden state is its final norm
    with torch.inference_mode():
        torch.testing.assert_close(norm(stored[n]), hidden[n], atol=1e-5, rtol=0)
    assert (stored[n] - hidden[n]).abs().max() > 1e-2


def test_a_fit_equals_lstsq_on_the_same_rows(llama_store: Path) -> None:
    store = Store.open(llama_store)
    fit_spans(llama_store, FitOptions(spans=((1, 3),), name="lm13", backend="numpy"))
    t = load_fit(llama_store, "lm13")["T"].values
    x = np.asarray(store.point(1)[:], dtype=np.float64).reshape(-1, 32)
    y = np.asarray(store.point(3)[:], dtype=np.float64).reshape(-1, 32)
    reference = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(t, reference, atol=1e-8, rtol=0)


def test_identity_removal_equals_deleting_the_layers_by_hand(lm: dict[str, Path]) -> None:
    model = build_language_model(lm["llama"]).module
    by_hand = copy.deepcopy(model)
    by_hand.model.layers = nn.ModuleList([by_hand.model.layers[i] for i in (0, 3)])
    by_hand.config.num_hidden_layers = 2
    ours = replace_decoder_spans(model, [SpanMap((1, 3))])
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = by_hand(input_ids=ids, use_cache=False).logits
        got = ours(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, expected)
    assert len(decoder_parts(model)[1]) == 4  # the original is untouched


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generation_of_the_applied_model_with_its_cache_is_greedy_decoding(
    lm: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    store = tmp_path / "s.zarr"
    _extract(lm, kind, store)
    fit_spans(store, FitOptions(spans=((0, 1), (1, 3)), backend="numpy"))
    out = tmp_path / "model"
    code, _, err = run_cli(
        capsys, "apply", store, "--fit", "0-1", "--identity", "3:4", "--out", out
    )
    assert code == 0, err
    model = load_approximated(out)
    assert model.config.num_hidden_layers == 2
    original = build_language_model(lm[kind]).module.config
    if kind == "qwen2":  # the per-layer config follows the removal: layers 1 and 2 are kept
        assert model.config.layer_types == [original.layer_types[1], original.layer_types[2]]
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    attention = [layer.layer.self_attn if hasattr(layer, "layer") else layer.self_attn
                 for layer in model.model.layers]  # fmt: skip
    assert [a.layer_idx for a in attention] == [0, 1]
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.inference_mode():
        cached = model.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True)
        ids = prompt
        for _ in range(32):  # greedy decoding, each step a full forward without a cache
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert cached.shape[1] == prompt.shape[1] + 32
    assert torch.equal(cached, ids)


def test_evaluate_select_apply_on_text(
    lm: dict[str, Path], llama_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Path(shutil.copytree(llama_store, tmp_path / "s.zarr"))
    code, out, err = run_cli(
        capsys, "evaluate", store, "--identity", "1:2", "--json", "--limit", "8"
    )
    assert code == 0, err
    report = json.loads(out)
    original = report["variants"][0]
    model = build_language_model(lm["llama"])
    windows = TextSource(lm["corpus"], model.tokenizer, SEQ, "test").load(0, 8)
    with torch.inference_mode():
        loss = model.module(input_ids=windows, labels=windows).loss  # mean NLL of next tokens
    assert original["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    assert report["test_tokens"] == 8 * (SEQ - 1)
    assert {"accuracy", "agreement", "params", "flops", "tokens_per_s"} <= set(original)
    assert report["variants"][1]["blocks"] == 3 and original["agreement"] == 1.0

    selection = tmp_path / "sel.json"
    args = ["select", store, "--max-blocks", "1", "--max-drop", "100", "--out", selection]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    chosen = json.loads(out)
    assert len(chosen["steps"]) == 1 and chosen["steps"][0]["val_perplexity"] > 0
    removed = {v["name"]: v for v in chosen["test"]["variants"]}["selected -1"]
    code, _, err = run_cli(
        capsys, "apply", store, "--selection", selection, "--out", tmp_path / "m"
    )
    assert code == 0, err
    applied = load_approximated(tmp_path / "m")
    test = TextSource(lm["corpus"], model.tokenizer, SEQ, "test")
    windows = test.load(0, len(test))
    with torch.inference_mode():
        logits = applied(input_ids=windows, use_cache=False).logits[:, :-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None]).double().mean()
    assert removed["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-6)
    code, out, err = run_cli(capsys, *args, "--max-ppl-increase", "1e-9", "--json")
    assert code == 0, err
    tight = json.loads(out)
    base = tight["original_val_perplexity"]
    if tight["steps"]:  # taken only if perplexity did not rise
        assert tight["steps"][0]["val_perplexity"] <= base * (1 + 1e-9)
    else:
        assert "would raise validation perplexity" in tight["stop_reason"]


def test_last_position_store_and_its_statistics(lm: dict[str, Path], tmp_path: Path) -> None:
    store = _extract(lm, "llama", tmp_path / "last.zarr", tokens="last")
    assert store.point(2).shape == (48, 1, 32)
    full = _extract(lm, "llama", tmp_path / "all.zarr")
    np.testing.assert_array_equal(store.point(2)[:], full.point(2)[:, -1:])
    fit_spans(store, FitOptions(spans=((1, 2),), backend="numpy"))  # tokens from the store


def test_bad_language_input(
    lm: dict[str, Path], llama_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_tokenizer = Path(shutil.copytree(lm["llama"], tmp_path / "no-tok"))
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    short = tmp_path / "short.txt"
    short.write_text("one\n\ntwo\n\nthree")
    out = str(tmp_path / "new.zarr")
    base = ["extract", "--out", out, "--model", str(lm["llama"]), "--data", str(lm["corpus"])]
    cases = [
        (["extract", "--out", out, "--model", str(no_tokenizer), "--data", str(lm["corpus"])],
         2, "holds no tokenizer"),
        (["extract", "--out", out, "--model", str(lm["llama"]), "--data", str(short)],
         1, "shorter than one window"),
        ([*base, "--seq-len", "65"], 2, "--seq-len 65 is above the context"),
        ([*base, "--tokens", "cls"], 2, "--tokens cls is for vision models"),
        ([*base, "--checkpoint", str(short)], 2, "--checkpoint is for vision models"),
        (["extract", "--out", out, "--model", str(lm["llama"])], 2, "a language model reads text"),
        (["extract", "--out", out, "--seq-len", "16"], 2, "--seq-len is for language models"),
        (["select", str(llama_store), "--refit"], 2, "--refit is not available for language"),
        (["select", str(llama_store), "--max-ppl-increase", "0"], 2, "--max-ppl-increase 0"),
    ]  # fmt: skip
    before = tree_digest(llama_store)
    for argv, exit_code, words in cases:
        code, _, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == exit_code and len(lines) == 1 and words in lines[0], (argv, err)
        assert not Path(out).exists()
    assert tree_digest(llama_store) == before
