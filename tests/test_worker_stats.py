"""``extract --stats --no-activations`` across workers (issue 22): each worker's partials are
saved in the store; a SIGKILLed worker resumes from them; the merged statistics equal one
uninterrupted process."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np

from rba_store.cli import main
from rba_store.extract.worker_partials import load_partial, partial_path, partials_folder
from rba_store.solve import FitOptions, fit_spans, load_fit
from rba_store.store import Store
from rba_store.store.info import store_info
from tests.test_resilience import cli_process

ARGS = ["--stats", "--no-activations", "--limit", "400", "--batch-size", "2"]
ARGS += ["--chunk-samples", "10", "--shard-samples", "20", "--checkpoint-every", "0"]
SPANS = ((0, 1), (2, 4), (5, 9), (11, 12))


def _wait_for_partial(path: Path, shards: int, process: object) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # type: ignore[attr-defined]
        loaded = load_partial(path) if path.is_file() else None
        if loaded is not None and len(loaded[1]) >= shards:
            return
        time.sleep(0.01)
    raise AssertionError("the worker ended or stalled before saving its partials")


def test_two_workers_one_killed_and_resumed_equal_one_process(tmp_path: Path) -> None:
    single = tmp_path / "single.zarr"
    assert main(["extract", "--out", str(single), *ARGS]) == 0
    shared = tmp_path / "shared.zarr"
    workers = [
        cli_process("extract", "--out", shared, *ARGS, "--num-workers", 2, "--worker-index", k)
        for k in (0, 1)
    ]
    _wait_for_partial(partial_path(shared, 1, 2), 3, workers[1])
    workers[1].send_signal(signal.SIGKILL)
    workers[1].communicate(timeout=60)
    _, err = workers[0].communicate(timeout=300)
    assert workers[0].returncode == 0, err
    store = Store.open(shared)
    assert not store.completed_shards().all()  # worker 1 was killed mid-run
    assert store.read_analysis("stats", "tokens-all") is None  # nothing merged yet
    said = store_info(shared)["how_to_finish"]  # names the worker whose shards are missing
    assert said.endswith("--num-workers 2 --worker-index 1 (the workers whose shards are missing)")
    assert (
        main(["extract", "--out", str(shared), *ARGS, "--num-workers", "2", "--worker-index", "1"])
        == 0
    )

    merged, reference = (
        Store.open(p).read_analysis("stats", "tokens-all") for p in (shared, single)
    )
    assert merged is not None and reference is not None
    for name in ("moment_mean", "moment_blocks", "cka", "br", "relative_change"):
        np.testing.assert_allclose(
            merged[name].values, reference[name].values, rtol=1e-10, atol=1e-10
        )
    for path in (shared, single):
        fit_spans(path, FitOptions(spans=SPANS, source="moments", backend="numpy"))
    for a, b in SPANS:
        t_merged, t_single = (load_fit(p, f"{a}-{b}")["T"].values for p in (shared, single))
        # Within 1e-10 of the map's scale: merging in another order rounds the moments
        # differently (1e-16), and the solve scales that by the condition number.
        assert np.abs(t_merged - t_single).max() <= 1e-10 * np.abs(t_single).max()


def test_shards_written_after_the_last_save_are_extracted_again(tmp_path: Path) -> None:
    """Killed between two saves: complete shards that no saved partial holds cannot be read
    back (no activations), so the resumed worker extracts them again, once."""
    from tests.test_resilience import wait_for_shards

    single = tmp_path / "single.zarr"
    assert main(["extract", "--out", str(single), *ARGS]) == 0
    out = tmp_path / "killed.zarr"
    args = [*ARGS[:-2], "--checkpoint-every", "1000"]  # no save before the kill
    process = cli_process("extract", "--out", out, *args)
    wait_for_shards(process, out, 3)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not partial_path(out, 0, 1).exists() and Store.open(out).completed_shards().sum() >= 3
    assert main(["extract", "--out", str(out), *args]) == 0
    resumed, reference = (Store.open(p).read_analysis("stats", "tokens-all") for p in (out, single))
    assert resumed is not None and reference is not None
    assert int(resumed.attrs["n_samples"]) == 400
    np.testing.assert_allclose(
        resumed["moment_blocks"].values, reference["moment_blocks"].values, rtol=1e-10, atol=1e-10
    )


def test_a_finished_run_leaves_no_partials_and_a_new_store_ignores_old_ones(
    tmp_path: Path,
) -> None:
    """The merged statistics are saved and the workers' partials deleted, not saved again on
    the way out; a store created anew at a path never resumes a former store's partials."""
    layout = ["--chunk-samples", "10", "--shard-samples", "20"]
    args = ["--stats", "--no-activations", "--limit", "40", *layout]
    out, fresh = tmp_path / "s.zarr", tmp_path / "fresh.zarr"
    assert main(["extract", "--out", str(out), *args]) == 0
    assert not partials_folder(out).exists()
    stale = partial_path(out, 0, 1)  # as if left by another extraction at this path
    stale.parent.mkdir()
    shutil.copy(tmp_path / "s.zarr" / "zarr.json", stale)  # any bytes: never read
    other = ["--stats", "--no-activations", "--limit", "60", *layout]
    assert main(["extract", "--out", str(out), *other, "--overwrite"]) == 0
    assert main(["extract", "--out", str(fresh), *other]) == 0
    assert not partials_folder(out).exists()
    saved, reference = (Store.open(p).read_analysis("stats", "tokens-all") for p in (out, fresh))
    assert saved is not None and reference is not None and saved.attrs["n_samples"] == 60
    np.testing.assert_allclose(saved["moment_blocks"].values, reference["moment_blocks"].values)
