"""Shared fixtures: offline hub, the embedded default's shipped weights, small stores."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

# No network in tests: timm's hub lookups fail fast instead of retrying for ~46 s.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads_rule():
    """The CLI's thread rule for the whole run: library calls in this process, and the
    subprocesses tests start, use ``$OMP_NUM_THREADS`` or half the CPUs, as ``rba-store`` does
    (all cores made the suite twice as slow on a shared 2-core machine)."""
    from rba_store.cli.threads import cpu_threads, default_threads

    with cpu_threads(default_threads()):
        yield


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The array module under test: NumPy always, CuPy where a GPU is visible."""
    import numpy as np

    from rba_store.solve._backend import gpu_available

    if request.param == "numpy":
        return np
    if not gpu_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    import cupy

    return cupy


def tree_digest(path: Path) -> str:
    """sha256 over every file (name and bytes) below ``path``: proves a store was not touched."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def default_weights() -> Path:
    from rba_store.extract.default_model import ensure_default_weights

    return ensure_default_weights()


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory, default_weights: Path) -> Path:
    """The embedded default on 50 digits, ragged batches (16) and shards (20 samples)."""
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

    out = tmp_path_factory.mktemp("stores") / "small.zarr"
    options = ExtractOptions(limit=50, batch_size=16, chunk_samples=10, shard_samples=20)
    run_extraction(plan_extraction(options), out)
    return out


def plain_progress_on_a_clock(monkeypatch: pytest.MonkeyPatch, step: float) -> None:
    """Progress as plain lines, one per update, on a fake clock that advances ``step`` seconds
    at each reading."""
    import itertools
    import time

    monkeypatch.setenv("RBA_STORE_PROGRESS_SECONDS", "0")
    monkeypatch.setattr("rba_store.cli.progress.plain_lines", lambda: True)
    clock = itertools.count(0.0, step)
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
