"""What a new user hit on the newer commands (issue 18): each item with a test that failed
before its fix. Items 8-10 are also rows of the bad-input table (tests/test_bad_input.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import rba_store.extract as extract_module
from rba_store.approx import count_parameters
from rba_store.approx.rebuild import rebuild_model
from rba_store.approx.recipe import load_approximated
from rba_store.approx.sweep import write_sweep_plot
from rba_store.cli.threads import default_threads
from rba_store.extract.data import DigitsSource, make_preprocess
from rba_store.extract.default_model import DATA_CONFIG
from rba_store.solve import FitOptions, fit_spans
from rba_store.store import Store
from tests.conftest import tree_digest
from tests.test_approx import run_cli
from tests.test_cli import _image_folder
from tests.test_plots import sweep_report

SMALL = ["--limit", "60", "--batch-size", "20", "--chunk-samples", "10", "--shard-samples", "20"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, small_store: Path) -> Path:
    """The small store with two fits, a (3:5) and b (7:8)."""
    store = Path(shutil.copytree(small_store, tmp_path_factory.mktemp("u18") / "f.zarr"))
    fit_spans(store, FitOptions(spans=((3, 5),), name="a"))
    fit_spans(store, FitOptions(spans=((7, 8),), name="b"))
    return store


def _test_accuracy(model: torch.nn.Module) -> float:
    test = DigitsSource("test")
    x = test.load(0, len(test), make_preprocess(dict(DATA_CONFIG)))
    with torch.inference_mode():
        return float((model(x).argmax(1).numpy() == test.labels).mean())


# 1. a --no-activations store has no h arrays, for any reader, and says so
def test_a_store_without_activations_has_no_activation_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "na.zarr"
    code, stdout, err = run_cli(
        capsys, "extract", "--out", out, "--stats", "--no-activations", *SMALL
    )
    assert code == 0, err
    assert "h0..h12:" not in stdout and "no activations stored (--no-activations)" in stdout
    group = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert not [name for name in group.array_keys() if name.startswith("h")]
    assert not [name for name in xr.open_zarr(out).data_vars if str(name).startswith("h")]
    code, stdout, _ = run_cli(capsys, "info", out)
    assert "NO activations (extracted with --no-activations" in stdout
    assert "h0..h12 (60" not in stdout
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    summary = json.loads(stdout)
    assert summary["activations"] is False and "h0" not in summary["arrays"]
    with pytest.raises(ValueError, match="holds no activations"):
        Store.open(out).point(3)
    # what such a store answers still works: a fit from the saved moments
    assert run_cli(capsys, "fit", out, "--span", "3:5")[0] == 0


# 2. Ctrl-C of extract --stats --no-activations says the truth: not resumable
def test_ctrl_c_without_activations_says_the_truth_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 asked for the truth ('not resumable'); issue 22 made the path resumable: the
    message says so, and the resumed statistics equal an uninterrupted run's."""
    real = extract_module.run_extraction

    def interrupted(plan, out, *, overwrite=False, progress=None):  # type: ignore[no-untyped-def]
        calls = {"n": 0}

        def hook(samples: int, nbytes: int) -> None:
            calls["n"] += 1
            if calls["n"] == 2:  # after the first shard (20 samples) was handed over
                raise KeyboardInterrupt

        return real(plan, out, overwrite=overwrite, progress=hook)

    monkeypatch.setattr(extract_module, "run_extraction", interrupted)
    out = tmp_path / "na.zarr"
    args = ["extract", "--out", out, "--stats", "--no-activations", *SMALL]
    code, _, err = run_cli(capsys, *args)
    assert code == 130
    assert "statistics of the shards folded so far saved" in err and "re-run the same" in err
    code, stdout, _ = run_cli(capsys, "info", out)
    assert "finish it by re-running the same 'rba-store extract' command" in stdout
    monkeypatch.setattr(extract_module, "run_extraction", real)
    assert run_cli(capsys, *args)[0] == 0  # what the messages said
    whole = tmp_path / "whole.zarr"
    assert run_cli(capsys, "extract", "--out", whole, "--stats", "--no-activations", *SMALL)[0] == 0
    resumed, reference = (Store.open(p).read_analysis("stats", "tokens-all") for p in (out, whole))
    assert resumed is not None and reference is not None
    for name in ("moment_blocks", "cka", "br"):
        np.testing.assert_allclose(resumed[name].values, reference[name].values, rtol=1e-10)


# 3. apply never replaces a model without --overwrite, nor writes into an unrelated folder
def test_apply_refuses_to_replace_without_overwrite(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    assert run_cli(capsys, "apply", fitted, "--fit", "a", "--out", model)[0] == 0
    before = tree_digest(model)
    code, _, err = run_cli(capsys, "apply", fitted, "--fit", "b", "--out", model)
    assert code == 2 and "pass --overwrite to replace it" in err
    assert tree_digest(model) == before
    code, _, err = run_cli(capsys, "apply", fitted, "--fit", "b", "--out", model, "--overwrite")
    assert code == 0, err
    assert json.loads((model / "recipe.json").read_text())["spans"][0]["fit"] == "b"
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, "apply", fitted, "--fit", "a", "--out", other, *extra)
        assert code == 2 and "not a model written by 'rba-store apply'" in err
    assert [p.name for p in other.iterdir()] == ["chapter1.tex"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


# 4. select shows its progress: step, candidate i/n, ETA
def test_select_prints_progress(
    fitted: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("RBA_STORE_PROGRESS_SECONDS", "0")
    code, _, err = run_cli(
        capsys, "select", fitted, "--max-blocks", "2", "--out", tmp_path / "s.json"
    )
    assert code == 0, err
    lines = [line for line in err.splitlines() if "select step" in line]
    assert any("select step 1: candidate " in line for line in lines), err
    assert any("select step 2: candidate " in line for line in lines), err
    assert all("ETA" in line and "/" in line.split("candidate ")[1] for line in lines)
    assert any("select: test split" in line for line in err.splitlines())


# 5. evaluate measures exactly the model apply writes: --combine, --selection
def test_evaluate_combined_and_selection_equal_the_applied_model(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = run_cli(
        capsys, "evaluate", fitted, "--fit", "a", "--fit", "b", "--identity", "10:11",
        "--combine", "--json",
    )  # fmt: skip
    assert code == 0, err
    variants = json.loads(stdout)["variants"]
    assert [v["name"] for v in variants] == ["original", "a+b+10:11"]
    combined = variants[1]
    model_dir = tmp_path / "combined"
    args = ["apply", fitted, "--fit", "a", "--fit", "b", "--identity", "10:11"]
    assert run_cli(capsys, *args, "--out", model_dir)[0] == 0
    model = load_approximated(model_dir)
    assert _test_accuracy(model) == pytest.approx(combined["accuracy"], abs=1e-12)
    assert count_parameters(model) == combined["params"]
    assert combined["spans"] == [[3, 5], [7, 8], [10, 11]]

    selection = tmp_path / "sel.json"
    code, stdout, err = run_cli(
        capsys, "select", fitted, "--max-blocks", "2", "--out", selection, "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)
    removed = report["steps"][-1]["blocks_removed"]
    claimed = {v["name"]: v for v in report["test"]["variants"]}[f"selected -{removed}"]
    code, stdout, err = run_cli(capsys, "evaluate", fitted, "--selection", selection, "--json")
    assert code == 0, err
    measured = json.loads(stdout)["variants"][1]
    assert measured["name"] == "selection sel"
    assert measured["accuracy"] == claimed["accuracy"] and measured["params"] == claimed["params"]
    assert (
        run_cli(capsys, "apply", fitted, "--selection", selection, "--out", tmp_path / "m")[0] == 0
    )
    assert _test_accuracy(load_approximated(tmp_path / "m")) == measured["accuracy"]
    code, _, err = run_cli(capsys, "evaluate", fitted, "--combine")
    assert code == 2 and "--combine joins the --fit and --identity spans" in err


# 6. evaluate --auto writes a plot only when asked, and says where in --json
def test_evaluate_auto_writes_no_plot_unless_asked(
    fitted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "evaluate", fitted, "--auto", "--max-blocks", "1")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == [] and "plot:" not in stdout
    plots = tmp_path / "plots"
    args = ["evaluate", fitted, "--auto", "--max-blocks", "1", "--plots", plots, "--json"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert json.loads(stdout)["plot"] == str(plots / "sweep.png")
    assert (plots / "sweep.png").read_bytes()[:4] == b"\x89PNG"


# 7. the CLI's thread rule applies to the test suite and to make results
def test_the_thread_rule_applies_to_tests_and_make_results(monkeypatch: pytest.MonkeyPatch) -> None:
    assert torch.get_num_threads() == default_threads()  # this process (tests/conftest.py)
    assert os.environ["OMP_NUM_THREADS"] == str(default_threads())  # and its subprocesses
    from tests.test_results_block import _make_results

    make_results = _make_results()
    seen = {}

    def measure(work: Path) -> dict:  # type: ignore[type-arg]
        seen["threads"] = torch.get_num_threads()
        return {}

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    for name in [n for n in vars(make_results) if n.startswith("measure")]:
        monkeypatch.setattr(make_results, name, measure)  # every block's measurement
    for name in [n for n in vars(make_results) if n.startswith("render")]:
        monkeypatch.setattr(make_results, name, lambda figures: "block")
    monkeypatch.setattr(make_results, "current_block", lambda text, *markers: "block")
    assert make_results.main(["--check"]) == 0
    assert seen["threads"] == 3


# 9. a file that is not a .npz is named as such; nobody is told to unpickle
def test_a_junk_npz_is_called_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_text("these are not arrays")
    code, _, err = run_cli(capsys, "extract", "--data", junk, "--out", tmp_path / "s.zarr")
    assert code == 1 and "is not a .npz file" in err and "pickle" not in err
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}, None], dtype=object))
    code, _, err = run_cli(capsys, "extract", "--data", objects, "--out", tmp_path / "s.zarr")
    assert code == 1 and "does not load" in err and "allow_pickle" not in err


# 11. the sweep plot: nothing clipped, no labels to collide, linear markers on top
def test_sweep_plot_shows_every_accuracy_unclipped(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    write_sweep_plot(sweep_report(), tmp_path / "sweep.png", fig=fig)
    ax_all, ax_near, _ = fig.axes[:3]
    low, high = ax_all.get_ylim()
    lines = {line.get_label(): line for line in ax_all.get_lines()}
    for label in ("fitted linear map T", "identity (drop blocks)"):
        y = np.asarray(lines[label].get_ydata())
        assert (low < y).all() and (y < high).all()  # 10 % and 40 % inside the axis
    assert not ax_all.texts and not ax_near.texts
    near = {line.get_label(): line for line in ax_near.get_lines()}
    assert near["fitted linear map T"].get_zorder() > near["identity (drop blocks)"].get_zorder()
    low, high = ax_near.get_ylim()
    assert 1 / (high - low) >= 0.15  # the 1-point band is readable near the original
    assert "4 points below" in ax_near.get_title()  # 90, 93, 40 and 10


# 12. dry run and info of a --no-activations store: the moments, not activations
def test_dry_run_and_info_count_the_moments_not_activations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "na.zarr"
    base = ["extract", "--out", out, "--stats", *SMALL]
    code, stdout, _ = run_cli(capsys, *base, "--no-activations", "--dry-run")
    assert code == 0
    assert "none of h0..h12" in stdout and "joint moments of 832 channels" in stdout
    pairs, p = 13 * 14 // 2, 13 * 64  # every pair of points a <= b: a small model
    assert "91 of 91 pairs of points" in stdout
    assert f"{8 * (pairs * 64 * 64 + p) / 2**20:,.1f} MiB saved in the store" in stdout
    assert "no activations; features, labels and ids" in stdout
    code, with_h, _ = run_cli(capsys, *base, "--dry-run")
    assert "no activations" not in with_h
    assert run_cli(capsys, *base, "--no-activations")[0] == 0
    code, stdout, _ = run_cli(capsys, "info", out)
    analyses = stdout.split("saved analyses ")[1].split(" MiB")[0]
    on_disk = sum(f.stat().st_size for f in (out / "stats").rglob("*") if f.is_file())
    assert analyses == f"{on_disk / 2**20:.1f}" and on_disk > 2**20


# 13. --skip-unreadable names the images it left out
def test_skip_unreadable_names_the_skipped_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _image_folder(tmp_path / "images")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    args = ["extract", "--data", folder, "--model", "test_vit", "--skip-unreadable"]
    code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "s.zarr")
    assert code == 0, err
    assert "skipped 1 unreadable image: a/broken.png" in stdout


# 14 and 15. parameters of what is evaluated; the random-weights warning comes first
def test_probe_parameters_and_early_random_weights_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBA_STORE_PROGRESS_SECONDS", "0")
    store = tmp_path / "r.zarr"
    code, _, err = run_cli(
        capsys,
        "extract",
        "--model",
        "test_vit",
        "--out",
        store,
        "--limit",
        "40",
        "--batch-size",
        "20",
    )
    assert code == 0, err
    lines = err.splitlines()
    warnings = [i for i, line in enumerate(lines) if "has random weights" in line]
    progress = [i for i, line in enumerate(lines) if "rba-store: extract" in line]
    assert len(warnings) == 2 and progress and warnings[0] < progress[0] < warnings[1]
    code, stdout, err = run_cli(capsys, "evaluate", store, "--identity", "2:3", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["classifier"].startswith("linear probe")
    code, _, err = run_cli(capsys, "apply", store, "--identity", "2:3", "--out", tmp_path / "m")
    assert code == 0, err
    model = load_approximated(tmp_path / "m")
    assert model.head.out_features == 10  # the probe, not timm's 1000-class head
    assert report["variants"][1]["params"] == count_parameters(model)
    base = rebuild_model(Store.open(store).description["model"], None, Store.open(store)).module
    with_unused_head = count_parameters(base)
    base.head = torch.nn.Linear(base.head.in_features, 10)
    assert report["variants"][0]["params"] == count_parameters(base) < with_unused_head


# 16. help: pipeline order, global options, metavars, select's description, --version
def test_help_pages(capsys: pytest.CaptureFixture[str]) -> None:
    from rba_store import __version__

    code, stdout, _ = run_cli(capsys, "--help")
    assert code == 0
    listed = [line.split()[0] for line in stdout.split("Commands:")[1].strip().splitlines()]
    pipeline = ["extract", "info", "validate", "stats", "fit", "evaluate", "select", "apply"]
    assert [c for c in listed if c in pipeline] == pipeline
    assert "--threads N" in stdout and "--verbose" in stdout and "--version" in stdout
    for command in ("extract", "stats", "apply"):
        code, stdout, _ = run_cli(capsys, command, "--help")
        assert "--threads N" in stdout and "--verbose" in stdout
    _, stdout, _ = run_cli(capsys, "apply", "--help")
    assert "{STORE}" in stdout and "{store}" not in stdout
    _, stdout, _ = run_cli(capsys, "--help")
    assert "by validation accuracy" not in stdout
    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"rba-store {__version__}"


# 17. apply's files get the same, ordinary permissions
def test_apply_writes_files_with_the_umask_permissions(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "apply", fitted, "--fit", "a", "--out", tmp_path / "m")[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == {"model.safetensors": 0o644, "recipe.json": 0o644}
