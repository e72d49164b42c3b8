"""Small labelled stores for the readings' tests: classes that separate with depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rba_store import store as rs
from rba_store.store.layout import encode_sample_ids


def labelled_store(
    path: Path,
    n_samples: int = 95,
    shard_samples: int = 30,
    channels: int = 12,
    tokens: int = 3,
    n_points: int = 4,
    n_classes: int = 4,
    seed: int = 0,
    weights_seed: int = 0,
    labelled: bool = True,
) -> Path:
    """A complete store whose class means grow apart point by point (ragged last shard).

    ``weights_seed`` names the "model" (stores with the same one count as the same model);
    ``seed`` draws the samples. ``labelled=False`` leaves every label at -1.
    """
    point = rs.CapturePoint(tokens, channels, (tokens, channels))
    layout = rs.plan_layout(
        n_samples,
        [point] * n_points,
        channels,
        "float32",
        chunk_samples=shard_samples // 3,
        shard_samples=shard_samples,
    )
    description = {
        "format_version": rs.FORMAT_VERSION,
        "kind": "activations",
        "model": {
            "name": "synthetic",
            "weights": {"source": "synthetic", "seed": weights_seed},
            "n_blocks": n_points - 1,
            "has_class_token": True,
            "num_classes": n_classes,
        },
        "data": {
            "source": "synthetic",
            "n_samples": n_samples,
            "classes": [str(c) for c in range(n_classes)],
        },
        "preprocessing": "none",
        "tokens": "all",
        "dtype": "float32",
        "codec": {"name": "blosc-zstd", "clevel": 3},
        "layout": layout.to_attrs(),
        "versions": {},
    }
    description["fingerprint"] = rs.fingerprint(description)
    store = rs.Store.create(path, description, layout)
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(weights_seed).normal(size=(n_classes, channels))
    labels = np.arange(n_samples) % n_classes
    rng.shuffle(labels)
    noise = rng.normal(size=(n_samples, tokens, channels))
    points = [
        (1.0 + 0.6 * k) * centres[labels][:, None, :] + noise + 0.3 * k * noise[:, ::-1]
        for k in range(n_points)
    ]
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        for k, values in enumerate(points):
            store.point(k)[start:stop] = values[start:stop].astype(np.float32)
        store.array(rs.FEATURES)[start:stop] = points[-1][start:stop, 0].astype(np.float32)
        ids = [f"s{i}" for i in range(start, stop)]
        width = store.array(rs.SAMPLE_ID).shape[1]
        store.array(rs.SAMPLE_ID)[start:stop] = encode_sample_ids(ids, width)
        values = labels[start:stop] if labelled else np.full(stop - start, -1)
        store.array(rs.LABEL)[start:stop] = values.astype(np.int64)
        store.mark_shard_complete(shard)
    store.consolidate()
    return path


def stored_vectors(path: Path, point: int, tokens: str = "cls") -> np.ndarray:
    """One float64 vector per sample of ``h_point``, read whole (the reference)."""
    h = np.asarray(rs.Store.open(path).point(point)[:], dtype=np.float64)
    return h[:, 0] if tokens == "cls" else h.mean(axis=1)


def stored_labels(path: Path) -> np.ndarray:
    return np.asarray(rs.Store.open(path).array(rs.LABEL)[:], dtype=np.int64)
