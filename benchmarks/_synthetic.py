"""Synthetic stores of any width and size, written through the store's own protocol.

The activations are ViT-like rather than random: a shared mean direction plus low-rank structure
plus noise, with each point a noisy linear map of the previous one (what a redundant block looks
like), so compression and conditioning resemble real stores. Written shard by shard, as the
extractor writes. With ``period=M`` the store repeats its first M samples: its least-squares
maps are then exactly those of those M samples, whatever its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from rba_store import store as rs
from rba_store.store.layout import encode_sample_ids


class ActivationModel:
    """A seeded generator of ViT-like activations with ``n_points`` capture points."""

    def __init__(self, channels: int, n_points: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.channels, self.n_points = channels, n_points
        self.mean = (self.rng.normal(size=channels) * 2).astype(np.float32)
        self.basis = (self.rng.normal(size=(32, channels)) / np.sqrt(32)).astype(np.float32)
        self.maps = [
            (
                np.eye(channels)
                + 0.1 * self.rng.normal(size=(channels, channels)) / np.sqrt(channels)
            ).astype(np.float32)
            for _ in range(n_points - 1)
        ]

    def _noise(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)

    def samples(self, n_samples: int, tokens: int) -> list[np.ndarray]:
        """Activations of every point, each ``(n_samples, tokens, channels)`` float32."""
        rows = n_samples * tokens
        h = self.mean + self._noise(rows, 32) @ self.basis + 0.5 * self._noise(rows, self.channels)
        points = [h]
        for t in self.maps:
            h = h @ t + 0.05 * self._noise(*h.shape)
            points.append(h)
        return [p.reshape(n_samples, tokens, self.channels) for p in points]


def write_store(
    path: Path,
    n_samples: int,
    channels: int,
    tokens: int = 197,
    n_points: int = 2,
    dtype: str = "float32",
    codec: str = rs.DEFAULT_CODEC,
    seed: int = 0,
    shard_samples: int | None = None,
    chunk_samples: int | None = None,
    period: int | None = None,
) -> Path:
    """A complete store with ``n_points`` capture points ``h0..`` of shape (tokens, channels)."""
    point = rs.CapturePoint(tokens, channels, (tokens, channels))
    layout = rs.plan_layout(
        n_samples,
        [point] * n_points,
        channels,
        dtype,
        codec=codec,
        chunk_samples=chunk_samples,
        shard_samples=shard_samples,
    )
    description = {
        "format_version": rs.FORMAT_VERSION,
        "kind": "activations",
        "model": {
            "name": "synthetic",
            "weights": {"source": "synthetic", "seed": seed},
            "n_blocks": n_points - 1,
            "has_class_token": True,
        },
        "data": {"source": "synthetic", "n_samples": n_samples, "period": period},
        "preprocessing": "none",
        "tokens": "all",
        "dtype": dtype,
        "codec": {"name": codec, "clevel": 3},
        "layout": layout.to_attrs(),
        "versions": {},
    }
    description["fingerprint"] = rs.fingerprint(description)
    store = rs.Store.create(path, description, layout)
    model = ActivationModel(channels, n_points, seed)
    base = model.samples(period, tokens) if period else None
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        if base is None:
            points = model.samples(stop - start, tokens)
        else:
            index = np.arange(start, stop) % len(base[0])
            points = [b[index] for b in base]
        for k, values in enumerate(points):
            store.point(k)[start:stop] = values
        store.array(rs.FEATURES)[start:stop] = points[-1][:, 0]
        ids = [f"s{i}" for i in range(start, stop)]
        width = store.array(rs.SAMPLE_ID).shape[1]
        store.array(rs.SAMPLE_ID)[start:stop] = encode_sample_ids(ids, width)
        store.array(rs.LABEL)[start:stop] = np.zeros(stop - start, np.int64)
        store.mark_shard_complete(shard)
    store.consolidate()
    return path


def read_rows(store: str | Path, point_idx: int, n_samples: int | None = None) -> np.ndarray:
    """``h_k`` of the first ``n_samples`` (default: all) as rows ``(samples·tokens, channels)``."""
    array = zarr.open_group(str(store), mode="r", use_consolidated=False)[rs.h_name(point_idx)]
    h = array[: n_samples or array.shape[0]]
    return h.reshape(-1, h.shape[-1])


def stored_bytes(store: str | Path) -> int:
    """Bytes the store's files take on disk."""
    return sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
