"""Bad input across every command: one line on stderr, a non-zero exit, every store untouched.

Each row is an invocation, the words its error must contain, and an optional way of breaking
the world first (a store from a newer format version, an incomplete store, a read-only store
or a full disk). Read-only folders and full disks are simulated by making Zarr's file writes
fail with EACCES / ENOSPC (tests may run as root, who can write to read-only folders, and
cannot mount a tiny filesystem without privileges).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import zarr
import zarr.storage._local as zarr_local

from rba_store.cli import main
from rba_store.solve import FitOptions, fit_spans
from rba_store.stats import run_stats
from tests.conftest import tree_digest

S = "{store}"
N = "{newer}"
T = "{tmp}"

# (setup, argv, exit code, words the error line must contain). The exit code rule: 2 when the
# command line cannot be carried out as written (invalid values, excluding options, names of
# things that do not exist), 1 when what it found stops a valid command (see rba_store.errors).
BAD = [
    # info
    (None, ["info", f"{T}/absent.zarr"], 2, "does not exist; create it with 'rba-store extract'"),
    (None, ["info", f"{T}/notes.txt"], 2, "is a file, not a store (a folder)"),
    (None, ["info", S, "--jsn"], 2, "No such option: --jsn (Possible options: --json)"),
    (None, ["info", N], 1, "format version 99, newer than this rba-store reads (1)"),
    # stats
    (None, ["stats", S, "--limit", "abc"], 2, "Invalid value for '--limit'"),
    (None, ["stats", S, "--limit", "500"], 2, "--limit 500 is out of range for"),
    (None, ["stats", S, "--sample", "-3"], 2, "--sample -3 is out of range"),
    (None, ["stats", S, "--max-span", "0"], 2, "must be positive numbers"),
    (None, ["stats", S, "--name", "../evil"], 2, "name '../evil' is not valid"),
    (None, ["stats", S, "--limit", "5", "--sample", "5"], 2, "exclude each other; pass only one"),
    (None, ["stats", S, "--plots", f"{T}/notes.txt"], 2, "is a file; pass a folder"),
    (None, ["stats", N], 1, "newer than this rba-store reads"),
    ("incomplete", ["stats", S, "--overwrite"], 1, "2/3 shards (30/50 samples)"),
    ("read-only", ["stats", S, "--overwrite"], 1, "is read-only (Permission denied); make it"),
    ("full-disk", ["stats", S, "--overwrite"], 1, "no space left on the device writing"),
    # fit
    (None, ["fit", S, "--span", "4-6"], 2, "--span '4-6' is not of the form a:b"),
    (None, ["fit", S, "--span", "6:4"], 2, "span 6:4 is out of range"),
    (None, ["fit", S, "--span", "0:13"], 2, "pass a:b with 0 <= a < b <= 12"),
    (None, ["fit", S, "--span", "4:6", "--name", "f46"], 2, "pass --overwrite to replace it"),
    (None, ["fit", S, "--auto", "0"], 2, "--auto 0 is invalid"),
    (None, ["fit", S, "--auto", "2", "--stats", "nope"], 2, "has no stats/nope; run"),
    (None, ["fit", S, "--span", "2:3", "--eval-store", f"{T}/absent.zarr"], 2, "does not exist"),
    (None, ["fit", S, "--span", "2:3", "--eval-store", N], 1, "newer than this rba-store"),
    (None, ["fit", S, "--span", "2:3", "--holdout", "0.2", "--eval-store", S], 2, "exclude"),
    (None, ["fit", S, "--span", "2:3", "--gemm", "float16"], 2, "Invalid value for '--gemm'"),
    (None, ["fit", S, "--span", "2:3", "--checkpoint-every", "-1"], 2, "pass seconds >= 0"),
    (None, ["fit", S, "--span", "2:3", "--checkpoint", T], 2, "is a folder; pass a file path"),
    (None, ["fit", S, "--span", "2:3", "--ridge", "nan"], 2, "--ridge nan is invalid"),
    (None, ["fit", S, "--span", "1:2", "--limit", "3"], 2, "underdetermined; pass --ridge"),
    (None, ["fit", S, "--span", "2:3", "--scheduler-file", f"{T}/none.json"], 2, "dask scheduler"),
    ("incomplete", ["fit", S, "--span", "2:3"], 1, "--allow-incomplete"),
    ("read-only", ["fit", S, "--span", "2:3"], 1, "is read-only (Permission denied); make it"),
    ("full-disk", ["fit", S, "--span", "2:3"], 1, "no space left on the device writing"),
    # apply
    (None, ["apply", S, "--out", f"{T}/out"], 2, "nothing to apply; pass --fit NAME"),
    (None, ["apply", S, "--out", f"{T}/out", "--fit", "nope"], 2, "no fit 'nope' in"),
    (None, ["apply", S, "--out", f"{T}/out", "--identity", "3:2"], 2, "pass a:b with 0 <= a < b"),
    (None, ["apply", S, "--fit", "f46"], 2, "Missing option '--out'"),
    (None, ["apply", S, "--out", f"{T}/notes.txt", "--fit", "f46"], 2, "is a file; pass a folder"),
    (None, ["apply", S, "--out", f"{T}/o", "--fit", "f46", "--identity", "5:7"], 2, "overlap"),
    # evaluate
    (None, ["evaluate", S], 2, "nothing to evaluate in"),
    (None, ["evaluate", S, "--fit", "nope"], 2, "no fit 'nope' in"),
    (None, ["evaluate", S, "--identity", "0:99"], 2, "span 0:99 is out of range"),
    (None, ["evaluate", S, "--fit", "f46", "--batch-size", "0"], 2, "--batch-size 0 is invalid"),
    (None, ["evaluate", S, "--auto", "--max-blocks", "0"], 2, "--max-blocks 0 is invalid"),
    (
        None,
        ["evaluate", S, "--fit", "f46", "--checkpoint", f"{T}/none.pth"],
        2,
        "none.pth' does not",
    ),
    # validate
    (None, ["validate", f"{T}/absent.zarr"], 2, "does not exist"),
    (None, ["validate", S, "--fix"], 2, "No such option: --fix"),
    (None, ["validate", N], 1, "newer than this rba-store reads"),
    # extract
    (None, ["extract", "--out", S, "--limit", "20"], 1, "different configuration"),
    (None, ["extract", "--out", N, "--limit", "50"], 1, "newer than this rba-store reads"),
    # issue 18, items 8-10: command-line fixes exit 2; values are checked before name clashes
    (None, ["extract", "--out", f"{T}/notes.txt"], 2, "is a file; choose a new path"),
    (None, ["extract", "--out", f"{T}/folder"], 2, "is a folder that is not an rba-store store"),
    (None, ["extract", "--out", f"{T}/new.zarr", "--limit", "-5"], 2, "--limit -5 is invalid"),
    (None, ["extract", "--out", f"{T}/new.zarr", "--data", f"{T}/img.png"], 2, "neither a folder"),
    (None, ["extract", "--out", f"{T}/new.zarr", "--data", f"{T}/junk.npz"], 1, "not a .npz file"),
    (None, ["fit", S, "--span", "4:6", "--name", "f46", "--holdout", "1.5"], 2, "--holdout 1.5"),
    (None, ["select", S, "--out", f"{T}/no/such/x.json"], 2, "/no/such' does not exist"),
    (None, ["select", S, "--out", f"{T}/folder"], 2, "is a folder; pass a file path"),
    (None, ["extract", "--out", S, "--num-workers", "0"], 2, "--num-workers 0 is invalid"),
    (None, ["extract", "--out", S, "--num-workers", "2", "--worker-index", "2"], 2, "pass 0..1"),
    (None, ["extract", "--out", S, "--clevel", "12"], 2, "out of range for --codec blosc-lz4"),
    (None, ["extract", "--out", S, "--chunk-mb", "0"], 2, "--chunk-mb 0.0 is invalid"),
    ("full-disk", ["extract", "--out", f"{T}/new.zarr", "--limit", "20"], 1, "no space left"),
    ("read-only", ["extract", "--out", f"{T}/new.zarr", "--limit", "20"], 1, "is read-only"),
    # modularity and probe (issue 21)
    ("unlabelled", ["modularity", S], 1, "has no labels (every selected sample's label is -1)"),
    ("unlabelled", ["probe", S], 1, "has no labels (every selected sample's label is -1)"),
    (None, ["modularity", S, "--k", "50"], 2, "--k 50 needs more than 50 labelled samples"),
    (None, ["modularity", S, "--k", "0"], 2, "--k 0 is invalid"),
    (None, ["modularity", S, "--points", "14"], 2, "capture point 14 does not exist in"),
    (None, ["modularity", S, "--tokens", "all"], 2, "Invalid value for '--tokens'"),
    (None, ["modularity", S, "--plateau", "1"], 2, "--plateau 1.0 is out of range"),
    (None, ["modularity", N], 1, "newer than this rba-store reads"),
    ("read-only", ["modularity", S], 1, "is read-only (Permission denied); make it"),
    ("full-disk", ["modularity", S], 1, "no space left on the device writing"),
    (None, ["probe", S, "--fractions", "0,0.5"], 2, "fraction 0 is outside (0, 1]"),
    (None, ["probe", S, "--fractions", "0.5,1.5"], 2, "fraction 1.5 is outside (0, 1]"),
    (None, ["probe", S, "--points", "h13"], 2, "capture point h13 does not exist in"),
    (None, ["probe", S, "--seeds", "0"], 2, "--seeds 0 is invalid"),
    (None, ["probe", S, "--eval-store", f"{T}/absent.zarr"], 2, "does not exist"),
    (None, ["probe", S, "--eval-store", N], 1, "newer than this rba-store reads"),
]


@pytest.fixture(scope="module")
def analysed_store(tmp_path_factory: pytest.TempPathFactory, small_store: Path) -> Path:
    """The small store with saved statistics and a fit named f46."""
    store = tmp_path_factory.mktemp("bad-input") / "analysed.zarr"
    shutil.copytree(small_store, store)
    run_stats(store)
    fit_spans(store, FitOptions(spans=((4, 6),), name="f46", backend="numpy"))
    return store


def _fail_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(path: Path, *args: object, **kwargs: object) -> int:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(zarr_local, "_put", refuse)


@pytest.mark.parametrize(("setup", "argv", "exit_code", "words"), BAD, ids=lambda v: str(v)[:40])
def test_bad_invocation_is_one_line_and_leaves_stores_byte_identical(
    setup: str | None,
    argv: list[str],
    exit_code: int,
    words: str,
    analysed_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, newer = tmp_path / "store.zarr", tmp_path / "newer.zarr"
    shutil.copytree(analysed_store, store)
    shutil.copytree(analysed_store, newer)
    group = zarr.open_group(str(newer), mode="r+", use_consolidated=False)
    group.attrs["rba_store"] = dict(group.attrs["rba_store"]) | {"format_version": 99}
    (tmp_path / "notes.txt").write_text("not a store")
    (tmp_path / "img.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "junk.npz").write_text("not arrays")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("someone's")
    if setup == "unlabelled":
        zarr.open_group(str(store), mode="r+", use_consolidated=False)["label"][:] = -1
    if setup == "incomplete":
        zarr.open_group(str(store), mode="r+", use_consolidated=False)["ledger/shards"][1] = 0
    before = {path: tree_digest(path) for path in (store, newer)}
    if setup in ("read-only", "full-disk"):
        _fail_writes(monkeypatch, errno.EACCES if setup == "read-only" else errno.ENOSPC)

    paths = {S: str(store), N: str(newer), T: str(tmp_path)}
    args = [paths.get(a, a) for a in argv]
    args = [a.replace(T, str(tmp_path)) for a in args]
    code = main(args)
    err = capsys.readouterr().err

    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rba-store: error: ") and "Traceback" not in err
    assert words in lines[0], lines[0]
    assert {path: tree_digest(path) for path in (store, newer)} == before
    assert not (tmp_path / "new.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["mine.txt"]


def test_the_table_covers_every_command_with_at_least_30_cases() -> None:
    commands = {argv[0] for _, argv, _, _ in BAD}
    every = {"extract", "info", "validate", "stats", "fit", "evaluate", "select", "apply"}
    assert every <= commands
    assert len(BAD) >= 30
