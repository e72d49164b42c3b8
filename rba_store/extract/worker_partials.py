"""Each extraction worker's statistics partials, kept in the store: ``extract --stats`` across
many workers, resumable after a kill or Ctrl-C.

A worker folds its shards into its own :class:`BlockPartials` and saves them, with the list of
shards they contain, as ``.STORE.partials/worker-K-of-N.npz`` beside the store's folder (inside
it, Zarr and xarray would take the files for a broken part of the hierarchy): written beside and
moved in (``os.replace``), so a file is always whole; the folder is deleted once the statistics
are saved. It saves at least every
``checkpoint_every`` seconds, at the end and on Ctrl-C. A re-run loads its file and never folds a
shard twice. The store's statistics are the exact merge (Chan's update) of all workers' files,
made once every shard is in, by the worker that finishes last or by whichever command needs them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from rba_store.stats.moments import PairMoments
from rba_store.stats.partials import BlockPartials

_NAME = re.compile(r"^worker-(\d+)-of-(\d+)\.npz$")
_SUMS = ("sq_change", "rel_change", "cos_sum", "norm_sum")


def partials_folder(root: Path) -> Path:
    """Where the workers of the store at ``root`` keep their partials (beside it)."""
    return root.parent / f".{root.name}.partials"


def partial_path(root: Path, index: int, n_workers: int) -> Path:
    return partials_folder(root) / f"worker-{index}-of-{n_workers}.npz"


def remove_partials(root: Path) -> None:
    """Delete the workers' partials (once the merged statistics are saved)."""
    shutil.rmtree(partials_folder(root), ignore_errors=True)


def _moments_arrays(prefix: str, m: PairMoments) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_n": np.asarray(m.n),
        f"{prefix}_mean": m.mean,
        f"{prefix}_widths": np.asarray(m.widths, np.int64),
        f"{prefix}_pairs": np.asarray(m.pairs, np.int64).reshape(-1, 2),
        f"{prefix}_blocks": m.blocks,
    }


def _moments_of(arrays: dict[str, np.ndarray], prefix: str) -> PairMoments:
    if f"{prefix}_n" not in arrays:  # saved before MLP outputs were covered
        return PairMoments.empty()
    pairs = tuple((int(a), int(b)) for a, b in arrays[f"{prefix}_pairs"])
    return PairMoments(
        int(arrays[f"{prefix}_n"]),
        arrays[f"{prefix}_mean"],
        tuple(int(w) for w in arrays[f"{prefix}_widths"]),
        pairs,
        arrays[f"{prefix}_blocks"],
    )


def save_partial(path: Path, partials: BlockPartials, shards: set[int]) -> None:
    """Write ``partials`` and the shards they hold to ``path``, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(partials, name) for name in _SUMS}
    arrays |= _moments_arrays("moments", partials.moments)
    arrays |= _moments_arrays("heldout", partials.heldout)
    arrays |= _moments_arrays("mlp", partials.mlp)
    arrays |= _moments_arrays("mlp_heldout", partials.mlp_heldout)
    arrays |= {
        "n_samples": np.asarray(partials.n_samples),
        "n_rows": np.asarray(partials.n_rows),
        "shards": np.asarray(sorted(shards), np.int64),
    }
    staging = path.with_name(f".{path.name}.writing-{os.getpid()}.npz")
    try:
        with open(staging, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def load_partial(path: Path) -> tuple[BlockPartials, set[int]] | None:
    """The partials saved at ``path`` and their shards (None when there is no file)."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    partials = BlockPartials(
        int(arrays["n_samples"]),
        int(arrays["n_rows"]),
        *(arrays[name] for name in _SUMS),
        _moments_of(arrays, "moments"),
        _moments_of(arrays, "heldout"),
        _moments_of(arrays, "mlp"),
        _moments_of(arrays, "mlp_heldout"),
    )
    return partials, {int(s) for s in arrays["shards"]}


def saved_partials(root: Path, n_workers: int) -> dict[int, Path]:
    """The partial files of the workers of an ``n_workers`` extraction, by worker index."""
    found = {}
    for path in sorted(partials_folder(root).glob("worker-*-of-*.npz")):
        match = _NAME.match(path.name)
        if match and int(match.group(2)) == n_workers:
            found[int(match.group(1))] = path
    return found


def merge_saved(root: Path, n_workers: int) -> tuple[BlockPartials | None, set[int]]:
    """The exact merge of every worker's saved partials, and the shards they cover."""
    merged, covered = None, set()
    for path in saved_partials(root, n_workers).values():
        try:
            loaded = load_partial(path)
        except FileNotFoundError:  # another worker merged and removed them meanwhile
            continue
        if loaded is None:
            continue
        partials, shards = loaded
        if shards & covered:
            raise ValueError(f"{path.name} folds shards another worker's file holds already")
        covered |= shards
        merged = partials if merged is None else merged.merge(partials)
    return merged, covered
