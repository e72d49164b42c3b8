"""Runs of samples read straight from a local store's shard files.

zarr-python reads a shard through its asynchronous codec pipeline: the calling thread waits on
an event loop, which hands each inner chunk to a worker thread, decodes it into a fresh buffer
and copies it into the result. For the arrays rba-store writes (sharded along samples only;
``bytes`` then ``blosc``, ``zstd`` or nothing; the index at the end, with its CRC32C) on a local
folder, :class:`ShardFiles` does the same work in the calling thread: it reads each shard file
once into a reused buffer, checks the index's checksum, and decodes each inner chunk with
numcodecs straight into the result. A fit of 200k rows at D = 768 took 4.11 s this way against
4.72 s through zarr-python (benchmarks/RESULTS.md, 2026-12-03).

Anything else (another kind of store, codec or chunk layout, a shard whose index fails its
checksum) goes through zarr-python, which stays the reference: the tests compare both bit for
bit on every codec and dtype, partial and missing shards, and chunks never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore

from rba_store.workspace import float64_buffer

NO_CHUNK = 2**64 - 1  # an index entry (offset, length) of a chunk never written: its fill value
INDEX_ENTRY_BYTES = 16  # offset and length, little-endian uint64 each
CHECKSUM_BYTES = 4


@dataclass(frozen=True)
class ShardFiles:
    """How to read one sharded array's samples from its files (see the module docstring)."""

    folder: Path
    array: zarr.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    shard_samples: int
    chunk_samples: int
    decoder: Any  # a numcodecs codec, or None for chunks stored as plain bytes
    chunk_keys: Any  # the array's chunk key encoding: where each shard's file is

    @classmethod
    def of(cls, array: zarr.Array) -> ShardFiles | None:
        """The reader of ``array``, or None when its files are not laid out as rba-store's."""
        metadata = array.metadata
        if getattr(metadata, "zarr_format", None) != 3 or not isinstance(array.store, LocalStore):
            return None
        codecs = metadata.codecs
        grid = metadata.chunk_grid
        if not isinstance(grid, RegularChunkGrid):
            return None
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        decoder = _decoder(sharding.codecs)
        if decoder is False or not _plain_index(sharding):
            return None
        shape, dtype = tuple(array.shape), np.dtype(array.dtype)
        shard, chunk = tuple(grid.chunk_shape), tuple(sharding.chunk_shape)
        if (
            dtype.byteorder == ">"
            or not shape
            or shard[1:] != shape[1:]
            or chunk[1:] != shape[1:]
            or shard[0] % chunk[0]
        ):
            return None
        folder = Path(str(array.store.root)) / array.path
        keys = metadata.chunk_key_encoding
        return cls(folder, array, shape, dtype, array.fill_value, shard[0], chunk[0], decoder, keys)

    def _path(self, shard: int) -> Path:
        """The file of shard ``shard`` (the array's own chunk key encoding)."""
        return self.folder / self.chunk_keys.encode_chunk_key(
            (shard,) + (0,) * (len(self.shape) - 1)
        )

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` of the array, as zarr-python reads them."""
        start, stop = max(0, start), min(stop, self.shape[0])
        out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
        for first in range(start - start % self.shard_samples, stop, self.shard_samples):
            lo, hi = max(start, first), min(stop, first + self.shard_samples)
            part = out[lo - start : hi - start]
            if not self._read_shard(first // self.shard_samples, lo, hi, part):
                part[...] = self.array[lo:hi]  # zarr-python, the reference
        return out

    def _read_shard(self, shard: int, start: int, stop: int, out: np.ndarray) -> bool:
        """Samples ``start:stop`` of shard ``shard`` into ``out``; False where zarr-python
        must read them instead (an index that fails its checksum)."""
        try:
            data = _read_file(self._path(shard))
        except FileNotFoundError:  # a shard never written reads as its fill value
            out[...] = self.fill_value
            return True
        index = _index(data, self.shard_samples // self.chunk_samples)
        if index is None:
            return False
        base = shard * self.shard_samples
        for i, (offset, length) in enumerate(index):
            first = base + i * self.chunk_samples
            lo, hi = max(start, first), min(stop, first + self.chunk_samples)
            if lo >= hi:
                continue
            target = out[lo - start : hi - start]
            if offset == NO_CHUNK:
                target[...] = self.fill_value
                continue
            if offset + length > len(data):
                return False
            encoded = data[int(offset) : int(offset + length)]
            if hi - lo == self.chunk_samples:
                self._decode(encoded, target)
            else:  # part of a chunk: decode it whole, keep the samples asked for
                whole = np.empty((self.chunk_samples, *self.shape[1:]), self.dtype)
                self._decode(encoded, whole)
                target[...] = whole[lo - first : hi - first]
        return True

    def _decode(self, encoded: np.ndarray, out: np.ndarray) -> None:
        if self.decoder is None:
            out.reshape(-1).view(np.uint8)[...] = encoded
        else:
            self.decoder.decode(encoded, out=out)


def _decoder(codecs: tuple[Any, ...]) -> Any:
    """The numcodecs decoder of a shard's inner chunks, None for plain bytes, False when the
    chain is not ``bytes`` (little-endian) followed by at most one of ``blosc``, ``zstd``."""
    if not codecs or not isinstance(codecs[0], BytesCodec) or _big_endian(codecs[0]):
        return False
    if len(codecs) == 1:
        return None
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        return numcodecs.Blosc()  # a blosc frame says how it was compressed
    if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
        return numcodecs.Zstd()
    return False


def _big_endian(codec: BytesCodec) -> bool:
    return codec.endian is not None and codec.endian.value == "big"


def _plain_index(sharding: ShardingCodec) -> bool:
    """Whether the shard index is little-endian (offset, length) pairs with a CRC32C, at the
    end of the file."""
    codecs = sharding.index_codecs
    return (
        sharding.index_location == ShardingCodecIndexLocation.end
        and len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and not _big_endian(codecs[0])
        and isinstance(codecs[1], Crc32cCodec)
    )


def _read_file(path: Path) -> np.ndarray:
    """The bytes of ``path`` in this thread's reused buffer (valid until its next call)."""
    with open(path, "rb", buffering=0) as f:
        size = f.seek(0, 2)
        f.seek(0)
        data = float64_buffer((-(-size // 8),), "shard-file").view(np.uint8)[:size]
        if f.readinto(memoryview(data)) != size:
            raise OSError(f"{str(path)!r} changed while it was read")
    return data


def _index(data: np.ndarray, n_chunks: int) -> np.ndarray | None:
    """The (n_chunks, 2) offsets and lengths at the end of a shard file; None when the file is
    too short or the index fails its CRC32C."""
    size = n_chunks * INDEX_ENTRY_BYTES
    if len(data) < size + CHECKSUM_BYTES:
        return None
    raw = data[len(data) - size - CHECKSUM_BYTES : len(data) - CHECKSUM_BYTES]
    stored = data[len(data) - CHECKSUM_BYTES :].tobytes()
    if np.uint32(google_crc32c.value(raw.tobytes())).tobytes() != stored:
        return None
    return raw.view("<u8").reshape(n_chunks, 2)
