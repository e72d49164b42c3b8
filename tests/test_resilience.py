"""Crash safety, parallel extraction into one store, and ``rba-store validate``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store import schema
from rba_store.cli import main
from rba_store.errors import ConfigMismatchError
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

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
    layout = schema.read_layout(group)
    names = [schema.h_name(k) for k in range(layout.n_blocks + 1)]
    names += [schema.FEATURES, schema.LABEL, schema.SAMPLE_ID, schema.LEDGER_PATH]
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


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [0, 3, 9])
def test_sigkill_then_resume_is_bit_identical(
    tmp_path: Path, kill_after_shards: int, default_weights: Path
) -> None:
    options = [
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
    reference = tmp_path / "reference.zarr"
    assert main(["extract", "--out", str(reference), *options]) == 0
    out = tmp_path / "killed.zarr"
    process = cli_process("extract", "--out", out, *options)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if schema.is_store(out):
            done = int(schema.completed_shards(schema.open_store(out)).sum())
            if done >= kill_after_shards:
                break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # reap it and close its pipes
    assert main(["extract", "--out", str(out), *options]) == 0  # the same command resumes
    assert_same_store(out, reference)
    assert main(["validate", str(out)]) == 0


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
