"""Checkpoints of a fit's partial normal equations, so that a killed ``fit`` resumes.

A checkpoint is one ``.npz`` file: how many shards (in store order) are folded into the
accumulators, the accumulators themselves (float64, D x D per source block: small), and a key
that identifies the fit (store fingerprint, spans, rows, options). It is written to a temporary
file, flushed and renamed over the previous one, so a kill at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from rba_store.errors import UsageError
from rba_store.solve.normal_eq import NormalEquations

_FIELDS = ("mean_x", "mean_y", "sxx", "sxy", "syy")


def checkpoint_key(description: dict[str, Any], rows: np.ndarray) -> str:
    """sha256 of what determines the accumulators: the fit's description and its sample rows."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: Path, key: str, shards_done: int, equations: dict[int, NormalEquations]
) -> None:
    """Atomically replace ``path`` by a checkpoint of ``shards_done`` folded shards."""
    arrays: dict[str, np.ndarray] = {
        "key": np.array(key),
        "shards_done": np.array(shards_done, dtype=np.int64),
    }
    for a, ne in equations.items():
        ne = ne.to_numpy()
        arrays[f"{a}/n"] = np.array(ne.n, dtype=np.int64)
        for name in _FIELDS:
            arrays[f"{a}/{name}"] = np.asarray(getattr(ne, name), dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def load_checkpoint(path: Path, key: str) -> tuple[int, dict[int, NormalEquations]] | None:
    """``(shards_done, accumulators)`` from ``path``; None if there is none yet.

    Refuses a checkpoint of another fit (different store, spans, samples or options) rather
    than mixing it into this one.
    """
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            stored_key = str(data["key"])
            shards_done = int(data["shards_done"])
            sources = sorted({int(name.split("/")[0]) for name in data.files if "/" in name})
            equations = {
                a: NormalEquations(
                    int(data[f"{a}/n"]), *(np.array(data[f"{a}/{name}"]) for name in _FIELDS)
                )
                for a in sources
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UsageError(
            f"--checkpoint {str(path)!r} is not a readable fit checkpoint ({e}); delete it to "
            "start the fit afresh"
        ) from e
    if stored_key != key:
        raise UsageError(
            f"--checkpoint {str(path)!r} belongs to another fit (other store, spans, samples or "
            "options); delete it, or pass another --checkpoint path"
        )
    return shards_done, equations
