"""Synthetic stores of any width and size, written through the store's own protocol.

The activations are ViT-like rather than random: a shared mean direction plus low-rank structure
plus noise, with h1 a noisy linear map of h0 (what a redundant block looks like), so compression
and conditioning resemble real stores. Written shard by shard, as the extractor writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rba_store import schema


def write_store(
    path: Path,
    n_samples: int,
    channels: int,
    tokens: int = 197,
    n_points: int = 2,
    dtype: str = "float32",
    codec: str = "blosc-zstd",
    seed: int = 0,
) -> Path:
    """A complete store with ``n_points`` capture points ``h0..`` of shape (tokens, channels)."""
    rng = np.random.default_rng(seed)
    point = schema.CapturePoint(tokens, channels, (tokens, channels))
    layout = schema.plan_layout(n_samples, [point] * n_points, channels, dtype, codec=codec)
    description = {
        "format_version": schema.FORMAT_VERSION,
        "kind": "activations",
        "model": {
            "name": "synthetic",
            "weights": {"source": "synthetic", "seed": seed},
            "n_blocks": n_points - 1,
            "has_class_token": True,
        },
        "data": {"source": "synthetic", "n_samples": n_samples},
        "preprocessing": "none",
        "tokens": "all",
        "dtype": dtype,
        "codec": {"name": codec, "clevel": 3},
        "layout": layout.to_attrs(),
        "versions": {},
    }
    description["fingerprint"] = schema.fingerprint(description)
    group = schema.create_store(path, description, layout)
    mean = rng.normal(size=channels) * 2
    basis = rng.normal(size=(32, channels)) / np.sqrt(32)
    maps = [
        np.eye(channels) + 0.1 * rng.normal(size=(channels, channels)) / np.sqrt(channels)
        for _ in range(n_points - 1)
    ]
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        rows = (stop - start) * tokens
        h = mean + rng.normal(size=(rows, 32)) @ basis + 0.5 * rng.normal(size=(rows, channels))
        for k in range(n_points):
            if k:
                h = h @ maps[k - 1] + 0.05 * rng.normal(size=h.shape)
            group[schema.h_name(k)][start:stop] = h.reshape(stop - start, tokens, channels)
        group[schema.FEATURES][start:stop] = h.reshape(stop - start, tokens, channels)[:, 0]
        group[schema.SAMPLE_ID][start:stop] = np.array([f"s{i}" for i in range(start, stop)])
        group[schema.LABEL][start:stop] = np.zeros(stop - start, np.int64)
        schema.mark_shard_complete(group, shard)
    schema.consolidate(path)
    return path
