"""The embedded language-model default (issue 19, item 5): the shipped files are what their
report says, ``--model rba-stdlib-lm`` finds them (and the shipped corpus), the store records
them as embedded and the residual stream, the fits and rebuilding hold on it as on any decoder."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_store.approx.language_eval import rebuild_language_model, text_split
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.extract.default_lm import (
    LM_NAME,
    SHIPPED_CORPUS,
    SHIPPED_LM_DIR,
    SHIPPED_LM_REPORT,
    WEIGHTS_DIR,
)
from rba_store.extract.language_model import build_language_model, decoder_parts, weights_sha256
from rba_store.extract.text import read_documents
from rba_store.solve import FitOptions, fit_spans, load_fit
from rba_store.store import INPUT_IDS, Store
from tests.test_approx import run_cli

ROOT = Path(__file__).resolve().parents[1]
SEQ, LIMIT = 32, 6


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_files_are_what_their_report_says() -> None:
    report = json.loads(SHIPPED_LM_REPORT.read_text())
    assert weights_sha256(SHIPPED_LM_DIR) == report["sha256"]
    assert _sha256(SHIPPED_LM_DIR / "tokenizer.json") == report["tokenizer_sha256"]
    assert _sha256(SHIPPED_CORPUS) == report["corpus_sha256"]
    assert "Python Software Foundation License" in report["corpus_license"]
    config = json.loads((SHIPPED_LM_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert 8 <= config["num_hidden_layers"] <= 12 and 128 <= config["hidden_size"] <= 256
    assert len(read_documents(SHIPPED_CORPUS)) == 3411  # one docstring, one document


def test_the_repository_stays_small() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", str(WEIGHTS_DIR)],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / f for f in listed.stdout.decode().split("\0") if f]
    assert sum(f.stat().st_size for f in files if f.is_file()) < 8_500_000  # 7.8 MB


@pytest.fixture(scope="module")
def default_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm-default") / "s.zarr"
    options = ExtractOptions(model=LM_NAME, seq_len=SEQ, limit=LIMIT, batch_size=LIMIT)
    run_extraction(plan_extraction(options), out)
    return out


def test_the_reserved_name_reads_the_shipped_folder_and_corpus(default_store: Path) -> None:
    description = Store.open(default_store).description
    model, data = description["model"], description["data"]
    assert model["name"] == LM_NAME and model["weights"]["source"] == "embedded"
    assert Path(model["weights"]["path"]) == SHIPPED_LM_DIR.resolve()
    assert Path(data["path"]) == SHIPPED_CORPUS.resolve() and data["split"] == "train"


def test_the_embedded_default_stores_its_layers_outputs_and_fits_lstsq(
    default_store: Path,
) -> None:
    store = Store.open(default_store)
    ids = torch.from_numpy(np.asarray(store.array(INPUT_IDS)[:], dtype=np.int64))
    loaded = build_language_model(SHIPPED_LM_DIR)
    with torch.inference_mode():
        hidden = loaded.module(input_ids=ids, output_hidden_states=True).hidden_states
    _, layers, norm = decoder_parts(loaded.module)
    n = len(layers)
    stored = [torch.from_numpy(np.asarray(store.point(k)[:])) for k in range(n + 1)]
    for k in range(n):
        torch.testing.assert_close(stored[k], hidden[k], atol=1e-5, rtol=0)
    with torch.inference_mode():  # h_L is before the final norm
        torch.testing.assert_close(norm(stored[n]), hidden[n], atol=1e-5, rtol=0)
    assert (stored[n] - hidden[n]).abs().max() > 1e-2
    fit_spans(default_store, FitOptions(spans=((5, 7),), name="d57", backend="numpy"))
    t = load_fit(default_store, "d57")["T"].values
    width = stored[0].shape[-1]
    x = stored[5].double().reshape(-1, width).numpy()
    y = stored[7].double().reshape(-1, width).numpy()
    np.testing.assert_allclose(t, np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-8, rtol=0)


def test_a_store_of_the_default_rebuilds_from_this_install_when_its_paths_moved(
    default_store: Path,
) -> None:
    description = Store.open(default_store).description
    model = json.loads(json.dumps(description["model"]))
    model["weights"]["path"] = "/elsewhere/rba_stdlib_lm"
    loaded = rebuild_language_model(model, None)
    assert loaded.weights["sha256"] == model["weights"]["sha256"]
    data = dict(description["data"], path=f"/elsewhere/{SHIPPED_CORPUS.name}")
    assert len(text_split(data, loaded.tokenizer, "test")) > 0


def test_the_reserved_name_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lm.zarr"
    code, _, err = run_cli(
        capsys, "extract", "--model", LM_NAME, "--limit", "2", "--seq-len", "16", "--out", out
    )
    assert code == 0, err
    assert Store.open(out).layout.n_samples == 2
    code, _, err = run_cli(
        capsys, "extract", "--model", LM_NAME, "--tokens", "cls", "--out", tmp_path / "x.zarr"
    )
    assert code == 2 and "--tokens cls is for vision models" in err


def test_the_default_store_is_named_after_the_model_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its corpus is implied: not 'rba-stdlib-lm_digits.zarr' (the vision default's data)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "extract", "--model", LM_NAME, "--limit", 2, "--dry-run")
    assert code == 0, err
    assert f"-> runs/{LM_NAME}.zarr" in out.splitlines()[0]
