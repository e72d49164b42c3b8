"""``rba-store validate``: check a store's ledger, fingerprint, shards and values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rba_store.store.fingerprint import fingerprint
from rba_store.store.handle import Store
from rba_store.store.layout import storage_dtype


def validate_store(store: Store | str | Path) -> dict[str, Any]:
    """A report ``{"ok", "problems", ...}``; problems name the array, shard and samples."""
    store = Store.coerce(store)
    description = store.description
    problems: list[str] = []
    if description.get("fingerprint") != fingerprint(description):
        problems.append(
            "the fingerprint does not match the attributes: they were edited after extraction"
        )
    layout = store.layout
    names = store.activation_names
    arrays = {}
    for k, name in enumerate(names):
        try:
            array = store.array(name)
        except KeyError:
            problems.append(f"array {name} is missing")
            continue
        point = layout.all_points[k]
        expected = (layout.n_samples, point.n_tokens, point.n_channels)
        if tuple(array.shape) != expected or array.dtype != storage_dtype(layout.dtype):
            problems.append(
                f"array {name} is {tuple(array.shape)} {array.dtype}, the layout says "
                f"{expected} {layout.dtype}"
            )
            continue
        arrays[name] = array
    complete = store.completed_shards()
    checked = 0
    for shard in np.flatnonzero(complete):
        start, stop = layout.shard_rows(int(shard))
        for name, array in arrays.items():
            if not store.shard_present(name, int(shard)):
                problems.append(
                    f"shard {shard} (samples {start}..{stop - 1}) is marked complete but {name} "
                    "has no data for it"
                )
                continue
            try:
                values = array[start:stop]
            except Exception as e:  # a shard that does not decode
                problems.append(
                    f"{name} shard {shard} (samples {start}..{stop - 1}) does not "
                    f"decode: {type(e).__name__}: {e}"
                )
                continue
            finite = np.isfinite(values).all(axis=(1, 2))
            if not finite.all():
                bad = start + np.flatnonzero(~finite)
                problems.append(
                    f"{name} holds NaN or Inf in samples {bad.min()}..{bad.max()} "
                    f"({len(bad)} samples, shard {shard})"
                )
        checked += 1
    return {
        "path": str(store.path),
        "ok": not problems,
        "problems": problems,
        "n_shards": layout.n_shards,
        "shards_complete": int(complete.sum()),
        "shards_checked": checked,
        "complete": bool(complete.all()),
    }
