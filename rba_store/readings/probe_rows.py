"""The rows the diffused-redundancy probes see (:mod:`rba_store.readings.probe`): the joint
moments of the training rows and the representations of the evaluation rows.

Letters: n = training rows (samples), d = channels of a point, c = classes.

Training rows are summarised in **one** pass over the store: per capture point, the moments of
``[x | one-hot y]`` (count, mean, centred co-moment, float64), a Dask reduction of per-shard
partials. Evaluation rows are kept as vectors: the data's validation split through the store's
model, or the labelled samples of ``--eval-store``, each read once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np

from rba_store.dask_compute import compute, tree_reduce
from rba_store.errors import DataSourceError, UsageError
from rba_store.readings.common import check_reading_tokens, represent
from rba_store.solve._backend import get_xp
from rba_store.stats.moments import Moments
from rba_store.store import LABEL, Store, normalize
from rba_store.store.layout import as_stored
from rba_store.store.reading import on_shard, shard_ranges
from rba_store.store.selection import usable_samples

# -- the one pass: moments of [x | one-hot y] -------------------------------------------------


def _shard_moments(
    local: np.ndarray, onehot: np.ndarray, tokens: str, backend: str, *chunks: np.ndarray
) -> list[Moments]:
    xp = get_xp(backend)
    return [
        Moments.from_rows(np.hstack([represent(c[local], tokens), onehot]), xp, overwrite=True)
        for c in chunks
    ]


def _merge_all(a: list[Moments], b: list[Moments]) -> list[Moments]:
    return [x.merge(y) for x, y in zip(a, b, strict=True)]


def _shard_vectors(local: np.ndarray, tokens: str, *chunks: np.ndarray) -> list[np.ndarray]:
    return [represent(c[local], tokens) for c in chunks]


def _stack(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


def train_moments(
    store: Store,
    indices: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    points: list[int],
    tokens: str,
    backend: str = "numpy",
    scheduler: str | None = None,
    scheduler_file: str | None = None,
) -> list[Moments]:
    """The moments of ``[x_k | one-hot]`` for every point: each shard of the store read once."""
    onehot = np.eye(n_classes)[labels]
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(
            _shard_moments,
            store,
            points,
            start,
            stop,
            local,
            onehot[np.searchsorted(indices, local + start)],
            tokens,
            backend,
        )
        for local, start, stop in shard_ranges(store.layout, indices)
    ]
    return compute(tree_reduce(parts, _merge_all), scheduler, scheduler_file, len(parts))


def stored_vectors(
    store: Store,
    indices: np.ndarray,
    points: list[int],
    tokens: str,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
) -> list[np.ndarray]:
    """One vector per sample and point (float64), each shard read once."""
    task = dask.delayed(on_shard, pure=True)
    parts = [
        task(_shard_vectors, store, points, start, stop, local, tokens)
        for local, start, stop in shard_ranges(store.layout, indices)
    ]
    pick = dask.delayed(operator.getitem, pure=True)
    stack = dask.delayed(_stack, pure=True)
    graph = dask.delayed(list, pure=True)(
        [stack(*[pick(p, i) for p in parts]) for i in range(len(points))]
    )
    return compute(graph, scheduler, scheduler_file, len(parts))


# -- evaluation rows ------------------------------------------------------------------------------


@dataclass
class EvalRows:
    """Representations (per point) and labels of the rows probes are scored on."""

    vectors: list[np.ndarray]  # per point, (n_eval, d)
    labels: np.ndarray
    source: dict[str, Any]  # what they are: {"kind": "val", ...} or {"kind": "eval_store", ...}


def eval_store_rows(
    store: Store,
    eval_path: str | Path,
    points: list[int],
    tokens: str,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
) -> EvalRows:
    """The labelled samples of ``--eval-store`` (a store of the same model), read once."""
    other = Store.open(eval_path)
    if other.description["model"]["weights"] != store.description["model"]["weights"]:
        raise UsageError(
            f"--eval-store {str(eval_path)!r} was extracted from other model weights than "
            f"{str(store)!r}; pass a store of the same model"
        )
    held = set(other.layout.stored_blocks) >= set(points)
    if not held or [other.layout.point(p).n_channels for p in points] != [
        store.layout.point(p).n_channels for p in points
    ]:
        raise UsageError(
            f"--eval-store {str(eval_path)!r} has other capture points than {str(store)!r}; "
            "pass a store of the same model"
        )
    check_reading_tokens(other, tokens)
    indices = usable_samples(other, False)
    labels = np.asarray(other.array(LABEL)[:], dtype=np.int64)[indices]
    known = labels >= 0
    if not known.any():
        raise DataSourceError(
            f"--eval-store {str(eval_path)!r} has no labels (every label is -1); the probes "
            "are scored on labelled samples: pass a labelled store"
        )
    vectors = stored_vectors(other, indices[known], points, tokens, scheduler, scheduler_file)
    source = {"kind": "eval_store", "store": str(eval_path), "fingerprint": other.fingerprint}
    return EvalRows(vectors, labels[known], source)


def validation_rows(
    store: Store,
    points: list[int],
    tokens: str,
    checkpoint: str | Path | None = None,
    batch_size: int = 256,
) -> EvalRows:
    """The data's validation split run through the store's model (as ``select`` scores), its
    residual stream captured at every point as the extractor stores it (the store's dtype)."""
    import torch

    from rba_store.approx.rebuild import held_out_source, rebuild_model
    from rba_store.extract.capture import ActivationCapture
    from rba_store.extract.data import make_preprocess

    description = store.description
    try:
        source = held_out_source(description["data"], "val")
    except DataSourceError as e:
        raise DataSourceError(f"{e}; or pass --eval-store STORE") from e
    labels = np.asarray(source.labels, dtype=np.int64)
    known = labels >= 0
    if not known.any():
        raise DataSourceError(
            "the validation split has no labels; the probes are scored on labelled samples: "
            "pass --eval-store with a labelled store"
        )
    loaded = rebuild_model(description["model"], checkpoint, store)
    capture = ActivationCapture(loaded, "cls" if tokens == "cls" else "all")
    preprocess = make_preprocess(loaded.data_config)
    dtype = store.layout.dtype  # rows as the store holds them (bfloat16: its rounding)
    parts: list[list[np.ndarray]] = [[] for _ in points]
    with torch.inference_mode():
        for start in range(0, len(source), batch_size):
            x = source.load(start, min(start + batch_size, len(source)), preprocess)
            captured = capture(x)
            for i, k in enumerate(points):
                stored = as_stored(captured.points[k].numpy(), dtype)
                parts[i].append(represent(stored, tokens))
    vectors = [np.concatenate(p)[known] for p in parts]
    return EvalRows(vectors, labels[known], eval_identity(store, None))


def eval_identity(store: Store, eval_store: str | Path | None) -> dict[str, Any]:
    """What the evaluation rows will be, without reading them (to decide about reuse)."""
    if eval_store is None:
        weights = store.description["model"]["weights"]
        return normalize({"kind": "val", "split": "val", "model_weights": weights})
    other = Store.open(eval_store)
    return {"kind": "eval_store", "store": str(eval_store), "fingerprint": other.fingerprint}
