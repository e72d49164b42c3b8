"""Crash safety, parallel extraction into one store, and ``rba-store validate``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store import store as rs
from rba_store.cli import main
from rba_store.errors import ConfigMismatchError, IncompleteStoreError, UsageError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.solve import FitOptions, fit_spans
from rba_store.solve import passes as fit_module
from rba_store.solve.checkpoint import save_checkpoint
from rba_store.solve.fit import load_fit

SMALL = ["--limit", "50", "--batch-size", "16", "--chunk-samples", "10", "--shard-samples", "20"]


def cli_process(*args: object) -> subprocess.Popen[str]:
    code = "from rba_store.cli import run; run()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    layout = rs.StoreLayout.from_attrs(group.attrs["rba_store"]["layout"])
    names = [rs.h_name(k) for k in range(layout.n_blocks + 1)]
    names += [rs.FEATURES, rs.LABEL, rs.SAMPLE_ID, rs.LEDGER_PATH]
    return {name: group[name][:] for name in names}


def assert_same_store(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def test_two_processes_fill_one_store_like_one_process(tmp_path: Path, small_store: Path) -> None:
    out = tmp_path / "parallel.zarr"
    workers = [
        cli_process("extract", "--out", out, *SMALL, "--num-workers", "2", "--worker-index", str(k))
        for k in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    assert_same_store(out, small_store)


def test_a_live_claim_is_refused_and_a_stale_one_taken_over(
    tmp_path: Path, small_store: Path
) -> None:
    out = tmp_path / "claimed.zarr"
    shutil.copytree(small_store, out)
    group = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    group["ledger/shards"][1] = 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        group.create_array(
            "claims/worker-1-of-2",
            shape=(0,),
            dtype="uint8",
            dimension_names=("claim",),
            attributes={"pid": sleeper.pid, "host": os.uname().nodename},
        )
        options = ExtractOptions(
            limit=50,
            batch_size=16,
            chunk_samples=10,
            shard_samples=20,
            num_workers=2,
            worker_index=1,
        )
        with pytest.raises(ConfigMismatchError, match=r"worker 1 of 2 is already filling"):
            run_extraction(plan_extraction(options), out)
    finally:
        sleeper.kill()
        sleeper.wait()
    result = run_extraction(plan_extraction(options), out)  # the claim is stale now
    assert result.shards_written == 1
    assert_same_store(out, small_store)


_CLAIM_AT = """
import sys, time
from rba_store import store as rs
from rba_store.errors import ConfigMismatchError
store = rs.Store.open(sys.argv[1], mode="r+")
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    store.claim_worker(0, 2)
except ConfigMismatchError:
    print("refused")
else:
    print("claimed")
    time.sleep(3)
"""


def test_two_processes_claiming_the_same_worker_at_once_one_wins(
    tmp_path: Path, small_store: Path
) -> None:
    store = tmp_path / "race.zarr"
    shutil.copytree(small_store, store)
    at = time.time() + 3  # both start their claim at this instant
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM_AT, str(store), str(at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert outcomes == ["claimed", "refused"]


def test_a_claim_whose_owner_died_before_recording_itself_is_taken_over(
    tmp_path: Path, small_store: Path
) -> None:
    store = tmp_path / "crashed-claim.zarr"
    shutil.copytree(small_store, store)
    (store / "claims" / "worker-0-of-2").mkdir()  # the folder, no metadata: a crash in between
    opened = rs.Store.open(store, mode="r+")
    path = opened.claim_worker(0, 2)
    assert dict(opened.group[path].attrs)["pid"] == os.getpid()
    opened.release_claim(path)
    assert not (store / "claims" / "worker-0-of-2").exists()


KILL_OPTIONS = [
    "--model",
    "test_vit",
    "--limit",
    "240",
    "--batch-size",
    "8",
    "--chunk-samples",
    "8",
    "--shard-samples",
    "16",
]


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted extraction of 15 shards, to compare interrupted ones with."""
    out = tmp_path_factory.mktemp("reference") / "reference.zarr"
    assert main(["extract", "--out", str(out), *KILL_OPTIONS]) == 0
    return out


def wait_for_shards(process: subprocess.Popen[str], out: Path, n: int) -> None:
    """Return once ``out`` has ``n`` complete shards (the process still running)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if rs.Store.exists(out) and rs.Store.open(out).completed_shards().sum() >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the extraction ended or stalled before {n} shards were complete")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [0, 3, 9])
def test_sigkill_then_resume_is_bit_identical(
    tmp_path: Path, kill_after_shards: int, reference_store: Path
) -> None:
    out = tmp_path / "killed.zarr"
    process = cli_process("extract", "--out", out, *KILL_OPTIONS)
    if kill_after_shards:
        wait_for_shards(process, out, kill_after_shards)
    else:  # as early as possible: while the model loads or the first batch runs
        while process.poll() is None and not out.exists():
            time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # reap it and close its pipes
    assert process.returncode == -signal.SIGKILL
    assert main(["extract", "--out", str(out), *KILL_OPTIONS]) == 0  # the same command resumes
    assert_same_store(out, reference_store)
    assert main(["validate", str(out)]) == 0


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_a_true_ledger_and_says_how_to_resume(
    tmp_path: Path, reference_store: Path
) -> None:
    out = tmp_path / "interrupted.zarr"
    process = cli_process("extract", "--out", out, *KILL_OPTIONS)
    wait_for_shards(process, out, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    # the random-weights warning comes first (issue 18), then the error: one line
    lines = [line for line in err.strip().splitlines() if "random weights" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"rba-store: error: interrupted: (\d+)/15 shards of .* are complete and kept; "
        r"re-run the same command to resume",
        lines[0],
    ), lines[0]
    kept = int(re.search(r"(\d+)/15", lines[0]).group(1))  # type: ignore[union-attr]
    group = rs.Store.open(out).group
    complete = np.asarray(group["ledger/shards"][:]).astype(bool)
    assert 2 <= kept == complete.sum() < 15
    assert not list(out.parent.glob(".*creating*")) and not list((out / "claims").glob("*/"))
    reference = arrays(reference_store)
    layout = rs.StoreLayout.from_attrs(group.attrs["rba_store"]["layout"])
    for shard in np.flatnonzero(complete):  # every shard the ledger calls complete is whole
        start, stop = layout.shard_rows(int(shard))
        for k in (0, layout.n_blocks // 2, layout.n_blocks):
            name = rs.h_name(k)
            np.testing.assert_array_equal(group[name][start:stop], reference[name][start:stop])
    assert main(["extract", "--out", str(out), *KILL_OPTIONS]) == 0
    assert_same_store(out, reference_store)


def test_a_torn_shard_is_never_read_and_is_rewritten(tmp_path: Path, small_store: Path) -> None:
    store = tmp_path / "torn.zarr"
    shutil.copytree(small_store, store)
    # A crash while shard 1 was written: h3's shard file half on disk, h7's not yet, no ledger mark
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    group["ledger/shards"][1] = 0
    torn = store / "h3" / "c" / "1" / "0" / "0"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    (store / "h7" / "c" / "1" / "0" / "0").unlink()

    with pytest.raises(IncompleteStoreError, match=r"2/3 shards \(30/50 samples\)"):
        fit_spans(store, FitOptions(spans=((3, 7),), backend="numpy"))
    (fit,) = fit_spans(store, FitOptions(spans=((3, 7),), backend="numpy", allow_incomplete=True))
    kept = np.r_[0:20, 40:50]  # the complete shards only
    x, y = (arrays(small_store)[f"h{k}"][kept].reshape(-1, 64).astype(np.float64) for k in (3, 7))
    reference = np.linalg.lstsq(x, y, rcond=None)[0]
    assert np.abs(fit.solution.t - reference).max() < 1e-8
    assert main(["validate", str(store)]) == 0  # incomplete, but nothing marked complete is bad

    options = ExtractOptions(limit=50, batch_size=16, chunk_samples=10, shard_samples=20)
    result = run_extraction(plan_extraction(options), store)
    assert result.shards_written == 1
    assert_same_store(store, small_store)


# -- fit checkpoints ---------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for a kill: nothing after it runs, no handler saves anything."""


def crash_after_saves(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    saves = {"n": 0}

    def save_then_maybe_crash(*args: object) -> None:
        save_checkpoint(*args)  # type: ignore[arg-type]
        saves["n"] += 1
        if saves["n"] == n:
            raise Crash

    monkeypatch.setattr(fit_module, "save_checkpoint", save_then_maybe_crash)


def test_fit_resumes_from_its_checkpoint_to_the_same_t(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "fit.zarr"
    shutil.copytree(small_store, store)
    spans = ((4, 6), (5, 6), (2, 9))
    checkpoint = tmp_path / "fit.ckpt.npz"

    def fit(name: str, **kwargs: object) -> list[np.ndarray]:
        options = FitOptions(spans=spans, backend="numpy", name=name, **kwargs)  # type: ignore[arg-type]
        return [f.solution.t for f in fit_spans(store, options)]

    uninterrupted = fit("whole", checkpoint=str(checkpoint), checkpoint_every=0)
    assert not checkpoint.exists()  # deleted once the fits are saved
    for t, plain in zip(uninterrupted, fit("plain"), strict=True):  # tree order: 1e-15 apart
        np.testing.assert_allclose(t, plain, rtol=0, atol=1e-10)

    for crash_after in (1, 2):  # shards are folded one at a time, then three at a time
        monkeypatch.setattr(fit_module, "_shards_per_group", lambda client: 1)
        crash_after_saves(monkeypatch, crash_after)
        with pytest.raises(Crash):
            fit(f"resumed{crash_after}", checkpoint=str(checkpoint), checkpoint_every=0)
        with np.load(checkpoint) as saved:
            assert int(saved["shards_done"]) == crash_after
        monkeypatch.setattr(fit_module, "_shards_per_group", lambda client: 3)
        resumed = fit(f"resumed{crash_after}", checkpoint=str(checkpoint), checkpoint_every=0)
        for t, reference in zip(resumed, uninterrupted, strict=True):
            np.testing.assert_array_equal(t, reference)  # bit for bit
        assert not checkpoint.exists()


def test_a_checkpoint_of_another_fit_is_refused(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "fit.zarr"
    shutil.copytree(small_store, store)
    checkpoint = tmp_path / "other.npz"
    monkeypatch.setattr(fit_module, "_shards_per_group", lambda client: 1)
    crash_after_saves(monkeypatch, 1)
    with pytest.raises(Crash):
        fit_spans(
            store, FitOptions(spans=((4, 6),), checkpoint=str(checkpoint), checkpoint_every=0)
        )
    saved = checkpoint.read_bytes()
    with pytest.raises(UsageError, match="belongs to another fit"):
        fit_spans(store, FitOptions(spans=((5, 6),), checkpoint=str(checkpoint)))
    with pytest.raises(UsageError, match="belongs to another fit"):
        cls = FitOptions(spans=((4, 6),), checkpoint=str(checkpoint), tokens="cls", ridge=1e-3)
        fit_spans(store, cls)
    assert checkpoint.read_bytes() == saved  # refused, and left as it was
    checkpoint.write_bytes(saved[:100])
    with pytest.raises(UsageError, match="is not a readable fit checkpoint"):
        fit_spans(store, FitOptions(spans=((4, 6),), checkpoint=str(checkpoint)))


_SLOW_CHECKPOINTS = """
import time
import rba_store.solve.passes as fit
save = fit.save_checkpoint
def save_then_wait(*args):
    save(*args)
    time.sleep(120)  # a window in which the test kills this process
fit.save_checkpoint = save_then_wait
fit._shards_per_group = lambda client: 1
from rba_store.cli import run
run()
"""


@pytest.mark.slow
def test_sigkilled_fit_resumes_with_the_same_t(tmp_path: Path, small_store: Path) -> None:
    store = tmp_path / "fit.zarr"
    shutil.copytree(small_store, store)
    checkpoint = tmp_path / "ckpt.npz"
    args = ["fit", str(store), "--span", "3:8", "--checkpoint", str(checkpoint)]
    args += ["--checkpoint-every", "0"]
    assert main([*args, "--name", "whole"]) == 0
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHECKPOINTS, *args, "--name", "resumed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert main([*args, "--name", "resumed"]) == 0  # the same command, with the same checkpoint
    whole, resumed = (load_fit(store, name)["T"].values for name in ("whole", "resumed"))
    np.testing.assert_array_equal(resumed, whole)
    assert not checkpoint.exists()


def test_validate_finds_problems(
    tmp_path: Path, small_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(small_store)]) == 0
    assert "3/3 shards complete (complete), 3 checked: no problem found" in capsys.readouterr().out

    store = tmp_path / "bad.zarr"
    shutil.copytree(small_store, store)
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    block = group["h5"][20:40]
    block[4, 1, 2] = np.nan
    group["h5"][20:40] = block
    shutil.rmtree(store / "h7" / "c" / "2")  # shard 2 of h7 lost, the ledger still says complete
    attrs = dict(group.attrs["rba_store"])
    group.attrs["rba_store"] = attrs | {"tokens": "cls"}
    assert main(["validate", str(store), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    problems = "\n".join(report["problems"])
    assert "fingerprint does not match" in problems
    assert "h5 holds NaN or Inf in samples 24..24" in problems
    assert "shard 2 (samples 40..49) is marked complete but h7 has no data" in problems


def test_ctrl_c_during_a_fit_saves_the_partial_sums_and_the_same_command_resumes(
    tmp_path: Path,
    small_store: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "fit.zarr"
    shutil.copytree(small_store, store)
    checkpoint = tmp_path / "ckpt.npz"
    args = ["fit", str(store), "--span", "3:8", "--checkpoint", str(checkpoint), "--name"]
    assert main([*args, "whole"]) == 0
    monkeypatch.setattr(fit_module, "_shards_per_group", lambda client: 1)
    real_compute, calls = fit_module.compute_with, {"n": 0}

    def interrupted_second_time(*a: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_compute(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(fit_module, "compute_with", interrupted_second_time)
    capsys.readouterr()
    assert main([*args, "resumed"]) == 130  # --checkpoint-every 60: only Ctrl-C saves here
    err = capsys.readouterr().err
    assert err.strip() == (
        f"rba-store: error: interrupted: the partial sums are saved in {str(checkpoint)!r}; "
        "re-run the same command to resume"
    )
    with np.load(checkpoint) as saved:
        assert int(saved["shards_done"]) == 1
    monkeypatch.setattr(fit_module, "compute_with", real_compute)
    assert main([*args, "resumed"]) == 0
    whole, resumed = (load_fit(store, name)["T"].values for name in ("whole", "resumed"))
    np.testing.assert_array_equal(resumed, whole)
