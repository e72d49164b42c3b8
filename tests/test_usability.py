"""What a new user hit (issue 13): each item with a test that failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_store.approx.recipe import load_approximated
from rba_store.cli.threads import pop_threads
from rba_store.errors import UsageError
from rba_store.extract.data import DigitsSource, make_preprocess
from rba_store.extract.models import build_model
from rba_store.solve import FitOptions, fit_spans
from rba_store.stats import run_stats
from rba_store.store import Store
from tests.test_approx import run_cli
from tests.test_cli import _image_folder


@pytest.fixture
def analysed(tmp_path: Path, small_store: Path) -> Path:
    store = Path(shutil.copytree(small_store, tmp_path / "analysed.zarr"))
    run_stats(store)
    fit_spans(store, FitOptions(spans=((4, 6),), name="f46"))
    return store


# 4. info lists the saved statistics and fits
def test_info_lists_saved_stats_and_fits(
    analysed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "info", analysed)
    assert code == 0 and "stats      tokens-all" in out and "fits       f46" in out
    assert "split=None" not in out
    code, out, _ = run_cli(capsys, "info", analysed, "--json")
    assert json.loads(out)["analyses"] == {
        "stats": ["tokens-all"],
        "fits": ["f46"],
        "modularity": [],
        "probe": [],
    }


# 5 and 14. apply --checkpoint; a probe used by evaluate is written with the model
@pytest.fixture(scope="module")
def probe_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

    root = tmp_path_factory.mktemp("probe")
    weights = root / "w.pth"
    torch.save(build_model("test_vit").module.state_dict(), weights)
    store = root / "s.zarr"
    options = ExtractOptions(model="test_vit", checkpoint=weights, limit=40, batch_size=20)
    run_extraction(plan_extraction(options), store)
    return store, weights


def test_apply_takes_checkpoint_and_writes_the_probe_evaluate_used(
    probe_store: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, weights = probe_store
    moved = tmp_path / "moved.pth"
    shutil.copy(weights, moved)
    weights.rename(tmp_path / "gone.pth")
    try:
        code, _, err = run_cli(capsys, "apply", store, "--identity", "2:3", "--out", tmp_path / "m")
        assert code == 1 and "--checkpoint PATH" in err
        code, out, err = run_cli(
            capsys,
            "evaluate",
            store,
            "--identity",
            "2:3",
            "--checkpoint",
            moved,
            "--json",
            "--limit",
            "60",
        )
        assert code == 0, err
        report = json.loads(out)
        assert report["classifier"].startswith("linear probe") and report["test_samples"] == 60
        claimed = report["variants"][1]["accuracy"]
        code, _, err = run_cli(
            capsys,
            "apply",
            store,
            "--identity",
            "2:3",
            "--out",
            tmp_path / "m",
            "--checkpoint",
            moved,
        )
        assert code == 0, err
    finally:
        (tmp_path / "gone.pth").rename(weights)
    model = load_approximated(tmp_path / "m")
    test = DigitsSource("test")  # what evaluate used: the digits test split
    x = test.load(0, 60, make_preprocess(Store.open(store).description["preprocessing"]))
    with torch.inference_mode():
        predicted = model(x).argmax(1).numpy()
    assert float((predicted == test.labels[:60]).mean()) == pytest.approx(claimed, abs=1e-12)


def test_evaluate_classifier_head_device_and_stats_options(
    analysed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys,
        "evaluate",
        analysed,
        "--identity",
        "2:3",
        "--classifier",
        "probe",
        "--json",
        "--limit",
        "30",
    )
    assert code == 0, err
    assert json.loads(out)["classifier"].startswith("linear probe")
    code, _, err = run_cli(capsys, "evaluate", analysed, "--identity", "2:3", "--device", "cuda:0")
    if not torch.cuda.is_available():
        assert code == 2 and "no CUDA GPU is visible" in err
    code, _, err = run_cli(capsys, "evaluate", analysed, "--auto", "--stats", "nope")
    assert code == 2 and "has no stats/nope" in err


# 6. defaults follow what the store holds
def test_a_cls_store_needs_no_tokens_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "cls.zarr"
    code, _, err = run_cli(capsys, "extract", "--out", store, "--limit", "40", "--tokens", "cls")
    assert code == 0, err
    code, out, err = run_cli(capsys, "stats", store)
    assert code == 0, err
    assert "tokens=cls" in out and "stats/tokens-cls" in out
    code, out, err = run_cli(capsys, "fit", store, "--auto", "1", "--ridge", "1e-3")
    assert code == 0, err


# 8. Ctrl-C during evaluate --auto says what was kept and how to go on
def test_ctrl_c_in_evaluate_says_what_is_kept(
    analysed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("rba_store.approx.evaluate.evaluate_variants", interrupted)
    code, _, err = run_cli(capsys, "evaluate", analysed, "--auto", "--max-blocks", "1")
    assert code == 130
    assert err.count("\n") == 1 and "kept as fits/a-b and reused" in err


# 9. progress lines without a terminal
def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    env = os.environ | {"RBA_STORE_PROGRESS_SECONDS": "0", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rba_store.cli import run; run()",
            "extract",
            "--out",
            str(tmp_path / "p.zarr"),
            "--limit",
            "60",
            "--batch-size",
            "20",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    lines = [line for line in process.stderr.splitlines() if "rba-store: extract" in line]
    assert len(lines) == 3, process.stderr  # one per batch at interval 0
    assert "60/60 samples (100%)" in lines[-1] and "samples/s" in lines[-1]
    assert "ETA" in lines[0]


# 10. options that only apply to --auto are refused without it
@pytest.mark.parametrize("option", [["--plots", "plots"], ["--max-blocks", "2"]])
def test_auto_only_options_are_refused_without_auto(
    analysed: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    code, _, err = run_cli(capsys, "evaluate", analysed, "--fit", "f46", *option)
    assert code == 2 and f"{option[0]} applies to the --auto sweep only" in err


# 11. unreadable images: named before anything is written, or left out and recorded
def test_skip_unreadable_leaves_them_out_and_records_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _image_folder(tmp_path / "images")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    (folder / "b" / "bad.jpg").write_bytes(b"nor a jpeg")
    out = tmp_path / "s.zarr"
    code, _, err = run_cli(capsys, "extract", "--data", folder, "--out", out, "--model", "test_vit")
    assert code == 1 and "2 images" in err and "a/broken.png, b/bad.jpg" in err
    assert not out.exists()
    code, _, err = run_cli(
        capsys,
        "extract",
        "--data",
        folder,
        "--out",
        out,
        "--model",
        "test_vit",
        "--skip-unreadable",
    )
    assert code == 0, err
    store = Store.open(out)
    assert store.description["data"]["skipped_unreadable"] == ["a/broken.png", "b/bad.jpg"]
    assert store.layout.n_samples == 4


# 12. --threads: torch and BLAS threads for the command, anywhere on the line
def test_threads_option(
    analysed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pop_threads(["info", "S", "--threads", "3"]) == (["info", "S"], 3)
    assert pop_threads(["--threads=2", "info"]) == (["info"], 2)
    with pytest.raises(UsageError, match="--threads '0' is invalid"):
        pop_threads(["--threads", "0"])
    seen = {}

    def spy(*args: object, **kwargs: object) -> dict:
        seen["torch"] = torch.get_num_threads()
        raise UsageError("stop here")

    monkeypatch.setattr("rba_store.approx.evaluate.evaluate_variants", spy)
    before = torch.get_num_threads()
    code, _, err = run_cli(capsys, "--threads", "1", "evaluate", analysed, "--fit", "f46")
    assert code == 2 and "stop here" in err and seen["torch"] == 1
    assert torch.get_num_threads() == before  # restored after the command


def test_images_per_second_warms_up_and_repeats() -> None:
    from rba_store.approx.surgery import images_per_second

    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return x * 2

    assert images_per_second(Counting(), torch.ones(8, 3), repeats=3) > 0
    assert len(calls) >= 2 + 1 + 3  # two warm-ups, a calibration pass, three timed repeats


# 13. small ones
def test_small_ones(analysed: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "info", analysed / "zarr.json")
    assert code == 2 and "is a file, not a store" in err
    code, out, _ = run_cli(capsys, "stats", analysed, "--no-cka", "--name", "light")
    assert code == 0 and "nan" not in out and "CKA" not in out.splitlines()[2]
    code, out, _ = run_cli(capsys, "evaluate", "--help")
    assert "<list[str]>" not in out and "--fit NAME" in out and "STORE" in out
    from rba_store.cli.model_commands import _sweep_summary

    rows = [
        {"name": "original", "accuracy": 0.9},
        {"name": "linear -1", "accuracy": 0.9},
        {"name": "identity -1", "accuracy": 0.5},
    ]
    assert "1 block can be replaced" in _sweep_summary({"variants": rows})
    np.testing.assert_equal(len(Store.open(analysed).list_analyses("fits")), 1)


# 3. the README's claim about the chunks of ds["h5"].data
def test_readme_chunks_claim(small_store: Path) -> None:
    import xarray as xr

    layout = Store.open(small_store).layout  # 10 samples per chunk, 20 per shard
    ds = xr.open_zarr(small_store)
    assert ds["h5"].data.chunks[0] == (10, 10, 10, 10, 10) == (layout.chunk_samples,) * 5
    shard = ds.attrs["rba_store"]["layout"]["shard_samples"]
    h5 = xr.open_zarr(small_store, chunks={"sample": shard})["h5"].data
    assert h5.chunks[0] == (20, 20, 10)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert 'chunks={"sample": shard})["h5"].data  # shard-aligned' in readme


# 13. a re-run of fit --auto reuses its fits, as evaluate --auto does
def test_fit_auto_rerun_reuses_like_evaluate(
    analysed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "fit", analysed, "--auto", "2")
    assert code == 0 and out.count("saved as fits/") == 2, err
    code, out, err = run_cli(capsys, "fit", analysed, "--auto", "2")
    assert code == 0 and out.count("reused the saved fits/") == 2, err
    code, _, err = run_cli(capsys, "fit", analysed, "--auto", "2", "--ridge", "0.1", "--name", "r")
    assert code == 0, err
