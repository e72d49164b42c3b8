"""Reading samples straight from shard files (store/shard_files.py) gives zarr-python's values
bit for bit, on every codec and stored dtype, for any run of samples; what it cannot read it
leaves to zarr-python."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import zarr

from rba_store.store import CODECS, Store, compressors
from rba_store.store.layout import storage_dtype
from rba_store.store.shard_files import ShardFiles

N, TOKENS, CHANNELS, CHUNK, SHARD = 29, 5, 12, 2, 6  # 29 = 4 whole shards + one of 5 samples
RANGES = [(0, 29), (0, 6), (6, 12), (3, 5), (5, 14), (1, 28), (24, 29), (25, 27), (28, 29), (7, 7)]


def _array(path: Path, codec: str, dtype: str, **kwargs: object) -> zarr.Array:
    shape = (N, TOKENS, CHANNELS)
    return zarr.open_group(str(path), mode="a", zarr_format=3).create_array(
        "h0",
        shape=shape,
        chunks=(CHUNK, *shape[1:]),
        shards=(SHARD, *shape[1:]),
        dtype=storage_dtype(dtype),
        compressors=compressors(codec, 3),
        fill_value=0,
        **kwargs,
    )


def _values(dtype: str, rng: np.random.Generator) -> np.ndarray:
    values = rng.normal(size=(N, TOKENS, CHANNELS)) * 10 + 3
    if dtype == "bfloat16":  # stored as the uint16 bits
        return rng.integers(0, 2**16, size=values.shape, dtype=np.uint16)
    return values.astype(dtype)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_equals_zarr_on_every_codec_and_dtype(tmp_path: Path, codec: str, dtype: str) -> None:
    array = _array(tmp_path / "s.zarr", codec, dtype)
    array[:] = _values(dtype, np.random.default_rng(0))
    files = ShardFiles.of(array)
    assert files is not None
    files = dataclasses.replace(files, array=None)  # no falling back to zarr-python
    for start, stop in RANGES:
        got = files.read(start, stop)
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array[start:stop])


def test_missing_shards_and_unwritten_chunks_read_as_the_fill_value(tmp_path: Path) -> None:
    array = _array(tmp_path / "s.zarr", "blosc-lz4", "float32")
    values = _values("float32", np.random.default_rng(1))
    values[8:10] = 0  # one inner chunk of zeros: zarr-python does not write it
    array[0:12] = values[0:12]  # shards 2..4 never written (an extraction stopped there)
    array[24:29] = values[24:29]
    assert not (tmp_path / "s.zarr" / "h0" / "c" / "2").exists()
    files = ShardFiles.of(array)
    assert files is not None
    files = dataclasses.replace(files, array=None)  # no falling back to zarr-python
    for start, stop in RANGES:
        np.testing.assert_array_equal(files.read(start, stop), array[start:stop])
    assert not files.read(12, 24).any()


def test_a_damaged_index_is_left_to_zarr(tmp_path: Path) -> None:
    """A shard whose index fails its CRC32C is read by zarr-python, which raises its error."""
    array = _array(tmp_path / "s.zarr", "blosc-zstd", "float32")
    array[:] = _values("float32", np.random.default_rng(2))
    shard = tmp_path / "s.zarr" / "h0" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a byte of the index
    shard.write_bytes(bytes(data))
    files = ShardFiles.of(array)
    assert files is not None
    np.testing.assert_array_equal(files.read(0, 6), array[0:6])  # other shards: as before
    with pytest.raises(ValueError, match="checksum"):
        array[6:12]
    with pytest.raises(ValueError, match="checksum"):
        files.read(6, 12)


def test_other_layouts_are_left_to_zarr(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    unsharded = group.create_array("plain", shape=(N, CHANNELS), chunks=(4, CHANNELS), dtype="f4")
    split = group.create_array(
        "split", shape=(N, CHANNELS), chunks=(2, 6), shards=(6, CHANNELS), dtype="f4"
    )
    in_memory = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=(N, CHANNELS),
        chunks=(2, CHANNELS),
        shards=(6, 12),
        dtype="f4",
    )
    assert ShardFiles.of(unsharded) is None
    assert ShardFiles.of(split) is None  # chunks split the channels
    assert ShardFiles.of(in_memory) is None


def test_stores_read_their_activations_through_the_shard_files(small_store: Path) -> None:
    store = Store.open(small_store)
    n = store.layout.n_samples
    points = list(store.layout.stored_indices)
    through_files = store.read_points(points, 1, n - 1)
    assert all(isinstance(store._files[store.layout.array_name(k)], ShardFiles) for k in points)
    for k, got in zip(points, through_files, strict=True):
        np.testing.assert_array_equal(got, store.point(k)[1 : n - 1])
