"""Planning before a run (``extract --dry-run --plan-samples``), the true size in ``info``, the
threads of ``stats --threads N``, and the held-out pass on Dask without a large graph."""

from __future__ import annotations

import shutil
import subprocess
import threading
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from rba_store.cli.main import main
from rba_store.extract import dry_run as dry_run_module
from rba_store.extract.dry_run import binary_size
from rba_store.store.info import store_info

LAYOUT = ["--batch-size", "32", "--chunk-samples", "32", "--shard-samples", "64"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _images(root: Path, n: int, broken: int | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:03d}.png"
        if i == broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return root


def _du(path: Path) -> int:
    done = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True)
    return int(done.stdout.split()[0])


def test_plan_samples_that_are_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.zarr"
    code, stdout, _ = run_cli(
        capsys, "extract", "--dry-run", "--plan-samples", 100_000, "--out", out
    )
    assert code == 0 and not out.exists()
    assert "100,000 planned (--plan-samples); the data holds 1,077" in stdout
    assert "h0..h12: 100,000 x 17 tokens x 64 channels" in stdout
    assert "ratio 1." in stdout and "measured on the first" in stdout  # not "10-20 %"
    assert " MB" not in stdout and "MiB" in stdout  # binary units, named as such
    assert "free disk" in stdout and "peak about" in stdout and "nothing was written" in stdout
    assert "a later 'rba-store stats' saves about" in stdout


def test_plan_samples_needs_dry_run_and_a_positive_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.zarr"
    code, _, err = run_cli(capsys, "extract", "--plan-samples", 10, "--out", out)
    assert code == 2 and "--plan-samples only plans: add --dry-run" in err
    code, _, err = run_cli(capsys, "extract", "--dry-run", "--plan-samples", 0, "--out", out)
    assert code == 2 and "--plan-samples 0 is invalid" in err
    assert "Traceback" not in err and not out.exists()


def test_a_limit_above_the_data_is_said_not_clamped_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _images(tmp_path / "images", 6)
    out = tmp_path / "s.zarr"
    code, stdout, err = run_cli(
        capsys, "extract", "--data", data, "--limit", 10_000, "--dry-run", "--out", out
    )
    assert code == 0 and "6 (all the data holds, --limit 10,000)" in stdout
    assert "--limit 10,000 is more than the 6 samples the data holds; planning all 6" in err
    assert "--plan-samples 10000" in err
    code, _, err = run_cli(capsys, "extract", "--data", data, "--limit", 7, "--out", out)
    assert code == 0 and "extracting all 6" in err
    assert store_info(out)["n_samples"] == 6


def test_dry_run_counts_images_without_decoding_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rba_store.extract.data import FolderSource

    data = _images(tmp_path / "images", 40, broken=39)
    opened: list[Path] = []
    original = FolderSource._open
    monkeypatch.setattr(
        FolderSource, "_open", staticmethod(lambda p: opened.append(p) or original(p))
    )
    code, stdout, _ = run_cli(
        capsys, "extract", "--data", data, "--batch-size", 8, "--dry-run", "--plan-samples", 1000
    )
    assert code == 0 and "the data holds 40; images counted, not decoded" in stdout
    assert len(opened) <= 10  # the probe and the compression sample (a batch), not all 40
    code, _, err = run_cli(capsys, "extract", "--data", data, "--out", tmp_path / "s.zarr")
    assert code == 1 and "cannot be read: c1/039.png" in err  # the run itself still checks


def test_dry_run_warns_when_the_disk_is_too_small(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dry_run_module.shutil, "disk_usage", lambda _: usage(2**40, 0, 2**20))
    out = tmp_path / "deep" / "er" / "s.zarr"  # free disk of the nearest existing parent
    code, stdout, err = run_cli(capsys, "extract", "--dry-run", "--out", out)
    assert code == 0
    assert f"free disk   1.0 MiB at {tmp_path}: NOT ENOUGH" in stdout
    assert "rba-store: warning: the store needs about" in err and "1.0 MiB is free" in err


def test_dry_run_size_matches_a_real_run_scaled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dry run for 4x the samples there, against the real run on them times 4 (du)."""
    out = tmp_path / "real.zarr"
    assert run_cli(capsys, "extract", "--limit", 256, *LAYOUT, "--out", out)[0] == 0
    real = _du(out)
    report: dict[str, object] = {}
    inner = dry_run_module.dry_run

    def spy(*args: object, **kwargs: object) -> object:
        report["r"] = inner(*args, **kwargs)  # type: ignore[arg-type]
        return report["r"]

    dry_run_module.dry_run, saved = spy, inner  # type: ignore[assignment]
    try:
        code, _, _ = run_cli(
            capsys, "extract", "--limit", 256, *LAYOUT, "--dry-run", "--plan-samples", 1024
        )
    finally:
        dry_run_module.dry_run = saved
    assert code == 0
    planned = report["r"].disk  # type: ignore[attr-defined]
    assert planned.total == pytest.approx(4 * real, rel=0.2)
    assert planned.free == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.2)


def test_dry_run_counts_the_random_weights_kept_in_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", "test_vit", "--data", _images(tmp_path / "images", 4), *LAYOUT]
    code, stdout, _ = run_cli(capsys, "extract", *args, "--dry-run")
    assert code == 0 and "random weights kept in the store" in stdout
    out = tmp_path / "s.zarr"
    assert run_cli(capsys, "extract", *args, "--out", out)[0] == 0
    info = store_info(out)
    weights = info["bytes_weights"]
    assert weights > 0 and f"random weights kept in the store {binary_size(weights)}" in stdout


def test_info_reports_the_true_size_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], small_store: Path
) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    (store / "stats").mkdir(exist_ok=True)
    (store / "stats" / "extra.bin").write_bytes(b"x" * 3 * 2**20)  # anything in the folder
    info = store_info(store)
    files = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert files <= info["bytes_on_disk"] <= _du(store)
    assert info["bytes_on_disk"] > info["bytes_stored"] + 3 * 2**20
    code, stdout, _ = run_cli(capsys, "info", store)
    assert code == 0 and f"size       {info['bytes_on_disk'] / 2**20:,.1f} MiB on disk" in stdout
    assert "activations and features" in stdout and " MB" not in stdout


@pytest.mark.parametrize("threads", [1, 2])
def test_stats_threads_controls_dask_and_blas_threads(
    threads: int, small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from threadpoolctl import threadpool_info

    import rba_store.stats.reduce as reduce

    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()
    on_shard = reduce.on_shard

    def spy(*args: object, **kwargs: object) -> object:
        blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        with lock:
            seen.append((threading.get_ident(), max(blas, default=1)))
        return on_shard(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reduce, "on_shard", spy)
    assert main(["stats", str(store), "--overwrite", "--threads", str(threads)]) == 0
    assert seen, "no shard task ran"
    assert len({ident for ident, _ in seen}) <= threads
    assert max(blas for _, blas in seen) <= threads
    if threads == 1:
        assert {blas for _, blas in seen} == {1}


def test_holdout_fit_on_a_cluster_sends_no_large_graph(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    from benchmarks._synthetic import write_store
    from rba_store.solve import FitOptions, fit_spans

    store = write_store(
        tmp_path / "s.zarr", 48, 768, tokens=4, n_points=3, chunk_samples=4, shard_samples=4
    )
    spans = ((0, 1), (1, 2), (0, 2))  # 3 maps of 768 x 768 float64: 13.5 MiB, over 10 MB
    local = fit_spans(store, FitOptions(spans=spans, holdout=0.5, ridge=1e-3, overwrite=True))
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        remote = fit_spans(
            store,
            FitOptions(
                spans=spans,
                holdout=0.5,
                ridge=1e-3,
                overwrite=True,
                scheduler=cluster.scheduler_address,
            ),
        )
    assert not [w for w in caught if "large graph" in str(w.message)]
    for a, b in zip(local, remote, strict=True):
        assert b.diagnostics["heldout"]["r2"] == pytest.approx(
            a.diagnostics["heldout"]["r2"], rel=1e-10
        )


def test_a_real_run_warns_when_the_activations_exceed_the_free_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rba_store.extract.dry_run as dry_run

    monkeypatch.setattr(dry_run, "free_disk", lambda out: (2**20, tmp_path))
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli(capsys, "extract", "--limit", "40", "--out", out)
    assert code == 0 and out.exists()  # a warning: the run goes on, and resumes if it fails
    raw = 40 * 13 * 17 * 64 * 4  # 40 samples of h0..h12, 17 tokens x 64 channels, float32
    assert f"take {raw / 2**20:.1f} MiB uncompressed and 1.0 MiB is free at" in stderr
    code, _, stderr = run_cli(capsys, "extract", "--limit", "40", "--out", out)
    assert code == 0 and "uncompressed" not in stderr  # nothing left to write
