"""The CLI: summaries, --json, --dry-run, and one-line errors that leave stores intact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store.cli import main
from tests.conftest import tree_digest


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def store_copy(tmp_path: Path, small_store: Path) -> Path:
    """A private copy of the small store, so a test may try to damage it."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    return copy


def test_extract_then_info(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], default_weights: Path
) -> None:
    out = tmp_path / "cli.zarr"
    code, stdout, err = run_cli(
        capsys, "extract", "--limit", "30", "--out", out, "--batch-size", "8"
    )
    assert code == 0, err
    assert "extracted 30 samples" in stdout and "h0..h12: 30 x 17 tokens x 64 channels" in stdout
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0
    assert info["complete"] and info["n_samples"] == 30 and info["n_blocks"] == 12
    assert info["arrays"]["h0"]["dims"] == ["sample", "token", "channel"]
    assert info["bytes_stored"] > 0 and info["compression_ratio"] > 1.0
    assert info["model"]["weights"]["source"] == "embedded"
    assert zarr.open_group(out, mode="r")["h3"].metadata.codecs[0].codecs[1].cname.value == "lz4"
    code, stdout, _ = run_cli(capsys, "info", out)
    assert "complete   yes: 1/1 shards" in stdout and "ratio" in stdout
    code, stdout, _ = run_cli(capsys, "extract", "--limit", "30", "--out", out)
    assert code == 0 and "already complete" in stdout


def test_info_reports_an_incomplete_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store_copy: Path
) -> None:
    group = zarr.open_group(str(store_copy), mode="r+", use_consolidated=False)
    group["ledger/shards"][1] = 0
    code, stdout, _ = run_cli(capsys, "info", store_copy)
    assert code == 0 and "complete   NO: 2/3 shards, 30/50 samples" in stdout


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.zarr"
    code, stdout, _ = run_cli(capsys, "extract", "--dry-run", "--out", out, "--dtype", "float16")
    assert code == 0
    assert "disk" in stdout and "memory" in stdout and "nothing was written" in stdout
    raw = 1077 * 13 * 17 * 64 * 2  # the digits train split: 1,077 images
    assert f"activations {raw / 2**20:,.1f} MiB raw" in stdout
    assert not out.exists()


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    return root


BAD_INVOCATIONS = [
    (["--model", "vit_tinyy_patch16_224"], "unknown model 'vit_tinyy_patch16_224'; did you mean"),
    (["--data", "{tmp}/missing"], "data source '{tmp}/missing' does not exist"),
    (["--data", "{tmp}/empty"], "no images found in"),
    (["--tokens", "some"], "--tokens 'some' is not valid; use all, cls, last or random:K"),
    (["--data", "{tmp}/notes.txt"], "is neither a folder nor a .npz file"),
    (["--data", "{tmp}/corrupt"], "1 image in '{tmp}/corrupt' cannot be read: a/broken.png;"),
    (["--batch-size", "0"], "--batch-size 0 is invalid"),
    (["--limit", "0"], "--limit 0 is invalid"),
    (["--checkpoint", "{tmp}/nope.pth"], "checkpoint '{tmp}/nope.pth' does not exist"),
    (["--model", "test_vit", "--checkpoint", "{tmp}/garbage.pth"], "cannot read checkpoint"),
    (["--split", "validation"], "split 'validation' does not exist for digits"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
    (["--model", "test_vit2", "--tokens", "cls"], "--tokens cls needs a class token"),
    (["--dtype", "float64"], "Invalid value for '--dtype'"),
    (["--shard-samples", "15", "--chunk-samples", "10"], "is not a multiple of the chunk size"),
    (["--dtype", "float16"], "the store was made with a different configuration (dtype"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INVOCATIONS)
def test_bad_extract_input_is_one_line_and_store_intact(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    store_copy: Path,
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    _image_folder(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "a" / "broken.png").write_bytes(b"not a png")
    before = tree_digest(store_copy)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = store_copy
    if "--data" in argv and "corrupt" in argv[argv.index("--data") + 1]:
        # checked before anything is written: no new store, the existing one untouched
        argv += ["--model", "test_vit"]
        out = tmp_path / "new.zarr"
    code, _, err = run_cli(
        capsys, "extract", "--limit", "50", "--batch-size", "16", "--out", out, *argv
    )
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rba-store: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in err
    assert tree_digest(store_copy) == before
    assert not (tmp_path / "new.zarr").exists()


def test_pretrained_offline_fails_fast_and_suggests_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(
        capsys, "extract", "--model", "vit_tiny_patch16_224", "--pretrained", "--dry-run"
    )
    assert code == 1
    assert (
        "cannot load timm's pretrained weights for 'vit_tiny_patch16_224'" in err
        and "--checkpoint" in err
    )


def test_info_on_something_that_is_not_a_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(capsys, "info", tmp_path)  # usage errors: a path that is no store
    assert code == 2 and "is not an rba-store store" in err
    code, _, err = run_cli(capsys, "info", tmp_path / "absent.zarr")
    assert code == 2 and "does not exist" in err


def test_newer_format_version_is_refused(
    capsys: pytest.CaptureFixture[str], store_copy: Path
) -> None:
    group = zarr.open_group(str(store_copy), mode="r+", use_consolidated=False)
    attrs = dict(group.attrs["rba_store"])
    group.attrs["rba_store"] = attrs | {"format_version": 99}
    code, _, err = run_cli(capsys, "info", store_copy)
    assert code == 1 and "format version 99, newer than this rba-store reads (1)" in err


def test_verbose_shows_the_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "info", tmp_path / "absent.zarr", "--verbose")
    assert code == 2 and "Traceback" in err and err.strip().endswith("'rba-store extract'")


def test_console_script_runs_in_a_fresh_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from rba_store.cli import run; run()", "info", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2  # a path that is no store: a usage error
    assert result.stderr.count("\n") == 1 and "not an rba-store store" in result.stderr
