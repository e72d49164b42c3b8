"""Compression ratio and speed of every codec on the same activations.

The uncompressed store of an extraction is re-encoded, array by array and shard by shard, into
zarr arrays with the store's own chunking and each codec (``rs.compressors``), then read back.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import zarr

from rba_store import store as rs


@dataclass(frozen=True)
class CodecRun:
    """One codec on one store's activations (all ``h`` arrays)."""

    codec: str
    raw_bytes: int
    stored_bytes: int
    write_s: float
    read_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes

    @property
    def write_mb_s(self) -> float:
        return self.raw_bytes / 2**20 / self.write_s

    @property
    def read_mb_s(self) -> float:
        return self.raw_bytes / 2**20 / self.read_s


def reencode(store: Path, codec: str, out: Path) -> CodecRun:
    """Write every ``h`` array of ``store`` with ``codec`` into ``out`` (removed afterwards)."""
    source = zarr.open_group(str(store), mode="r", use_consolidated=False)
    layout = rs.StoreLayout.from_attrs(source.attrs["rba_store"]["layout"])
    target = zarr.open_group(str(out), mode="w", zarr_format=3)
    write_s = read_s = 0.0
    raw = stored = 0
    try:
        for k in range(len(layout.points)):
            name = rs.h_name(k)
            src = source[name]
            dst = target.create_array(
                name,
                shape=src.shape,
                chunks=src.chunks,
                shards=src.shards,
                dtype=src.dtype,
                compressors=rs.compressors(codec, layout.clevel),
                fill_value=0,
            )
            for shard in range(layout.n_shards):
                start, stop = layout.shard_rows(shard)
                values = src[start:stop]
                t0 = time.perf_counter()
                dst[start:stop] = values
                t1 = time.perf_counter()
                dst[start:stop]
                read_s += time.perf_counter() - t1
                write_s += t1 - t0
            raw += src.nbytes
            stored += dst.nbytes_stored()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return CodecRun(codec, raw, stored, write_s, read_s)
