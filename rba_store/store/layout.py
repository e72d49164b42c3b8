"""The store's protocol: array names, dimension names, attribute keys, layout and codecs.

With :mod:`rba_store.store.analyses` (the ``stats/`` and ``fits/`` groups), this is the only place
that knows the store's array paths and attribute keys (``docs/STORE.md`` says it in prose). A
store is one Zarr v3 group:

- ``h0`` … ``hL``: the residual stream after k blocks, dims ``("sample", "token", "channel")``
  (``extract --points``: only some of them, the layout's ``point_blocks``);
- ``m1`` … ``mL`` (``extract --mlp-outputs`` only): block k's MLP output (after its LayerScale),
  the same dims; ``h_k = r_k + m_k`` (what folded maps are fitted on);
- ``features`` (``"sample", "channel"``), ``label`` (``"sample"``, int64) and ``sample_id``
  (``"sample", "byte"``, uint8: each id's UTF-8 bytes, zero-padded; see :func:`encode_sample_ids`);
- ``ledger/shards`` (``"shard"``, uint8): 1 where every array's shard has been written;
- ``claims/worker-k-of-N``: which process fills which shards;
- the group attribute ``rba_store``: the extraction's complete description and its fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr.codecs

from rba_store.errors import DataSourceError, UsageError

FORMAT_VERSION = 1
ATTRS_KEY = "rba_store"
LEDGER_PATH = "ledger/shards"
CLAIMS_GROUP = "claims"
NOT_STORED = "not stored"  # description["activations"] of a --no-activations store
FEATURES, LABEL, SAMPLE_ID = "features", "label", "sample_id"
INPUT_IDS = "input_ids"  # language models: each window's token ids (sample, position)
TOKEN_POSITIONS = "token_positions"  # --tokens random:K: each stored token's position
# Weights that come from no file (random initialisation) are kept in the store: the bytes of a
# safetensors file as a uint8 array, so that every later command rebuilds the very same model.
WEIGHTS_PATH = "model/weights_safetensors"
SAMPLE_DIM = "sample"
# Sample ids are stored in core Zarr v3 types only (any Zarr v3 reader, e.g. TensorStore, reads
# them): a uint8 array (sample, byte) of each id's UTF-8 bytes, zero-padded to a fixed width (the
# array's attribute ``width`` and the layout's ``sample_id_bytes``). Stores written before kept
# them as zarr-python's variable-length strings (dims ("sample",)); readers take both.
SAMPLE_ID_DIMS = (SAMPLE_DIM, "byte")
DEFAULT_SAMPLE_ID_BYTES = 256  # the width when the ids are not known when the layout is planned
CODECS = ("blosc-zstd", "zstd", "blosc-lz4", "none")
# blosc-lz4 with bit-shuffle stores activations about as small as blosc-zstd and encodes and
# decodes faster (every codec on the same activations: benchmarks/RESULTS.md, extraction).
DEFAULT_CODEC = "blosc-lz4"
DTYPES = ("float32", "float16", "bfloat16")
# bfloat16 is no core Zarr v3 data type (zarr-python 3.1 has none): a bfloat16 store keeps the
# values' 16 bits as uint16 (the top half of the float32 with the same value, rounded to nearest
# even), every h array and features carrying the attribute ``rba_store_dtype = "bfloat16"``.
# :func:`decode_values` (what ``Store.read_points`` returns) gives float32 exactly.
BFLOAT16 = "bfloat16"
DTYPE_ATTR = "rba_store_dtype"


def storage_dtype(dtype: str) -> np.dtype:
    """The Zarr (NumPy) dtype that holds values of the store's ``dtype``."""
    return np.dtype(np.uint16) if dtype == BFLOAT16 else np.dtype(dtype)


def encode_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float values as the store keeps them: bfloat16 bits (round to nearest even, NaN kept);
    other dtypes unchanged (NumPy casts them on assignment)."""
    if dtype != BFLOAT16:
        return values
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # a quiet NaN, sign kept
    return out


def decode_values(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Values read from an ``h`` array (or ``features``) as floats: bfloat16 bits to float32
    (exact), other dtypes as read. With xarray: ``(ds.h3.values.astype("uint32") << 16)
    .view("float32")``."""
    if dtype != BFLOAT16:
        return stored
    return (stored.astype(np.uint32) << 16).view(np.float32)


def as_stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float values rounded as a store of ``dtype`` keeps them, as floats (what reading them
    back gives)."""
    return decode_values(encode_values(values, dtype), dtype).astype(
        storage_dtype(dtype) if dtype != BFLOAT16 else np.float32
    )


def h_name(point_idx: int) -> str:
    """Name of the array holding the residual stream after ``point_idx`` blocks."""
    return f"h{point_idx}"


def m_name(block: int) -> str:
    """Name of the array holding block ``block``'s MLP output (``extract --mlp-outputs``)."""
    return f"m{block}"


@dataclass(frozen=True)
class CapturePoint:
    """Shape of one stored capture point per sample: ``(n_tokens, n_channels)``."""

    n_tokens: int
    n_channels: int
    source_shape: tuple[int, ...]  # the module output's own shape, without the batch dim


@dataclass(frozen=True)
class StoreLayout:
    """Sizes and chunking of a store: everything needed to create its arrays."""

    n_samples: int
    points: tuple[CapturePoint, ...]  # h0 .. hL
    n_features: int
    dtype: str
    chunk_samples: int
    shard_samples: int
    codec: str = DEFAULT_CODEC
    clevel: int = 3
    # Width of the sample_id array in bytes; None for stores that keep ids as zarr-python strings.
    sample_id_bytes: int | None = DEFAULT_SAMPLE_ID_BYTES
    # Language models: tokens per window; the store then keeps the windows' ``input_ids``.
    seq_len: int | None = None
    # ``extract --mlp-outputs``: m1 .. mL, each block's MLP output (empty: not stored).
    mlp_points: tuple[CapturePoint, ...] = ()
    # ``extract --points``: the block index k of each stored ``h_k``, ``points`` in the same
    # order (empty: every point h0 .. hL is stored).
    point_blocks: tuple[int, ...] = ()
    model_blocks: int | None = None  # the model's L when only some points are stored

    @property
    def n_blocks(self) -> int:
        """The model's number of blocks L (whatever points are stored)."""
        return self.model_blocks if self.model_blocks is not None else len(self.points) - 1

    @property
    def stored_blocks(self) -> tuple[int, ...]:
        """The k of every stored ``h_k``, ascending: ``0 .. L`` unless ``extract --points``."""
        return self.point_blocks or tuple(range(len(self.points)))

    @property
    def some_points(self) -> bool:
        """True when only some of h0 .. hL are stored (``extract --points``)."""
        return len(self.points) != self.n_blocks + 1

    def point(self, k: int) -> CapturePoint:
        """The shape of ``h_k`` (``k``: a block index; the point must be stored)."""
        return self.points[self.position(k)]

    def position(self, k: int) -> int:
        """Where ``h_k`` is among the stored points (what statistics index by)."""
        try:
            return self.stored_blocks.index(k)
        except ValueError:
            raise UsageError(
                f"h{k} is not stored: this store keeps {points_text(self.stored_blocks)} "
                f"(extract --points); use those points, or extract again with h{k}"
            ) from None

    def points_label(self) -> str:
        """``h0..h12``, or with ``extract --points`` the stored ones: ``h0, h4, h12 of h0..h12``."""
        return points_label(self.stored_blocks, self.n_blocks)

    @property
    def stored_indices(self) -> tuple[int, ...]:
        """The joint index (see :meth:`array_name`) of every stored array, in
        :attr:`all_points` order."""
        first_mlp = self.n_blocks + 1
        return self.stored_blocks + tuple(range(first_mlp, first_mlp + len(self.mlp_points)))

    @property
    def array_names(self) -> list[str]:
        """The name of every stored activation array, in :attr:`all_points` order."""
        return [self.array_name(k) for k in self.stored_indices]

    @property
    def all_points(self) -> tuple[CapturePoint, ...]:
        """Every stored point in the joint numbering: ``h0 .. hL``, then ``m1 .. mL`` (index
        ``L + a`` is block a's MLP output)."""
        return self.points + self.mlp_points

    def array_name(self, k: int) -> str:
        """The array of joint point ``k``: ``h_k`` for ``k <= L``, else ``m_{k - L}``."""
        return h_name(k) if k <= self.n_blocks else m_name(k - self.n_blocks)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_samples / self.shard_samples)

    def shard_rows(self, shard_idx: int) -> tuple[int, int]:
        """Half-open sample range ``[start, stop)`` of one shard."""
        start = shard_idx * self.shard_samples
        return start, min(start + self.shard_samples, self.n_samples)

    def sample_bytes(self) -> int:
        """Bytes of one sample over all stored arrays (MLP outputs too), uncompressed."""
        itemsize = storage_dtype(self.dtype).itemsize
        return sum(p.n_tokens * p.n_channels for p in self.all_points) * itemsize

    def to_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "n_samples": self.n_samples,
            "n_blocks": self.n_blocks,
            "points": [asdict(p) for p in self.points],
            "n_features": self.n_features,
            "dtype": self.dtype,
            "chunk_samples": self.chunk_samples,
            "shard_samples": self.shard_samples,
            "n_shards": self.n_shards,
            "codec": self.codec,
            "clevel": self.clevel,
        }
        if self.sample_id_bytes is not None:  # absent from stores that keep ids as strings
            attrs["sample_id_bytes"] = self.sample_id_bytes
        if self.seq_len is not None:  # absent from vision stores
            attrs["seq_len"] = self.seq_len
        if self.mlp_points:  # absent unless extracted with --mlp-outputs
            attrs["mlp_points"] = [asdict(p) for p in self.mlp_points]
        if self.point_blocks:  # absent unless extracted with --points
            attrs["point_blocks"] = list(self.point_blocks)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreLayout:
        def capture_points(key: str) -> tuple[CapturePoint, ...]:
            return tuple(
                CapturePoint(p["n_tokens"], p["n_channels"], tuple(p["source_shape"]))
                for p in attrs.get(key, [])
            )

        points = capture_points("points")
        return cls(
            n_samples=attrs["n_samples"],
            points=points,
            n_features=attrs["n_features"],
            dtype=attrs["dtype"],
            chunk_samples=attrs["chunk_samples"],
            shard_samples=attrs["shard_samples"],
            codec=attrs["codec"],
            clevel=attrs["clevel"],
            sample_id_bytes=attrs.get("sample_id_bytes"),
            seq_len=attrs.get("seq_len"),
            mlp_points=capture_points("mlp_points"),
            point_blocks=tuple(attrs.get("point_blocks", ())),
            model_blocks=attrs["n_blocks"] if "point_blocks" in attrs else None,
        )


def points_text(blocks: Sequence[int]) -> str:
    """``h0, h4, h8, h12``: the stored points, for messages."""
    return ", ".join(f"h{k}" for k in blocks)


def points_label(blocks: Sequence[int], n_blocks: int) -> str:
    """``h0..h12`` when ``blocks`` are all of them, else ``h0, h4, h12 of h0..h12``."""
    every = f"h0..h{n_blocks}"
    return every if len(blocks) == n_blocks + 1 else f"{points_text(blocks)} of {every}"


def plan_layout(
    n_samples: int,
    points: Sequence[CapturePoint],
    n_features: int,
    dtype: str = "float32",
    *,
    codec: str = DEFAULT_CODEC,
    clevel: int = 3,
    chunk_mb: float = 4.0,
    shard_mb: float = 16.0,
    chunk_samples: int | None = None,
    shard_samples: int | None = None,
    sample_ids: Sequence[str] | None = None,
    seq_len: int | None = None,
    mlp_points: Sequence[CapturePoint] = (),
    point_blocks: Sequence[int] = (),
    model_blocks: int | None = None,
) -> StoreLayout:
    """Choose chunk and shard sizes: chunks of about ``chunk_mb``, shards of whole chunks.

    Chunks are balanced (``n_samples`` split into equal chunks) so that the edge chunk is not
    mostly padding. A shard is the extractor's write unit: it is written once, whole.
    ``sample_ids`` (the source's ids) size the ``sample_id`` array to the longest id; without
    them it is :data:`DEFAULT_SAMPLE_ID_BYTES` wide.
    """
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if codec not in CODECS:
        raise UsageError(f"codec {codec!r} is not supported; use one of {', '.join(CODECS)}")
    if n_samples < 1:
        raise UsageError(f"the data set has {n_samples} samples; at least 1 is needed")
    itemsize = storage_dtype(dtype).itemsize
    row_bytes = max(p.n_tokens * p.n_channels for p in points) * itemsize
    if chunk_samples is None:
        target = max(1, int(chunk_mb * 2**20 // row_bytes))
        n_chunks = math.ceil(n_samples / target)
        chunk_samples = math.ceil(n_samples / n_chunks)
    if chunk_samples < 1:
        raise UsageError(f"chunk size {chunk_samples} samples is invalid; use a positive number")
    chunk_samples = min(chunk_samples, n_samples)
    if shard_samples is None:
        chunks_per_shard = max(1, int(shard_mb * 2**20 // (row_bytes * chunk_samples)))
        n_chunks = math.ceil(n_samples / chunk_samples)
        n_shards = math.ceil(n_chunks / chunks_per_shard)
        shard_samples = math.ceil(n_chunks / n_shards) * chunk_samples
    if shard_samples < chunk_samples or shard_samples % chunk_samples:
        raise UsageError(
            f"shard size {shard_samples} samples is not a multiple of the chunk size "
            f"{chunk_samples}; pass a multiple of it"
        )
    return StoreLayout(
        n_samples=n_samples,
        points=tuple(points),
        n_features=n_features,
        dtype=dtype,
        chunk_samples=chunk_samples,
        shard_samples=shard_samples,
        codec=codec,
        clevel=clevel,
        sample_id_bytes=DEFAULT_SAMPLE_ID_BYTES
        if sample_ids is None
        else sample_id_width(sample_ids),
        seq_len=seq_len,
        mlp_points=tuple(mlp_points),
        point_blocks=tuple(point_blocks),
        model_blocks=model_blocks if point_blocks else None,
    )


def sample_id_width(sample_ids: Sequence[str]) -> int:
    """Bytes needed to store every id of ``sample_ids`` in UTF-8 (at least 1)."""
    return max((len(s.encode("utf-8")) for s in sample_ids), default=1) or 1


def encode_sample_ids(sample_ids: Sequence[str], width: int) -> np.ndarray:
    """Ids as the ``sample_id`` array stores them: ``(n, width)`` uint8, UTF-8, zero-padded."""
    encoded = [s.encode("utf-8") for s in sample_ids]
    for sample_id, raw in zip(sample_ids, encoded, strict=True):
        if len(raw) > width:
            raise DataSourceError(
                f"sample id {sample_id!r} is {len(raw)} bytes long in UTF-8, but this store keeps "
                f"ids of at most {width} bytes (layout sample_id_bytes); give the sample a "
                "shorter name (file or folder), or plan the layout with the source's sample_ids"
            )
    fixed = np.array(encoded, dtype=f"S{width}").reshape(len(encoded))
    return fixed.view(np.uint8).reshape(len(encoded), width)


def decode_sample_ids(stored: np.ndarray) -> list[str]:
    """Ids from values read from a ``sample_id`` array, in either encoding.

    ``(n, width)`` uint8 (zero-padded UTF-8, this format) or ``(n,)`` strings (stores written
    with zarr-python's string dtype before). The same in plain NumPy, e.g. for
    ``xarray.open_zarr(STORE)["sample_id"].values``:
    ``numpy.char.decode(values.view(f"S{values.shape[1]}")[:, 0], "utf-8")``.
    """
    if stored.ndim == 1:
        return [str(s) for s in stored]
    fixed = np.ascontiguousarray(stored, dtype=np.uint8).view(f"S{stored.shape[1]}")
    return [raw.decode("utf-8") for raw in fixed[:, 0]]


def compressors(codec: str, clevel: int) -> tuple[Any, ...]:
    """zarr v3 compressor codecs for a codec name (``none``: no compression)."""
    if codec == "blosc-zstd":
        return (zarr.codecs.BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle"),)
    if codec == "blosc-lz4":
        return (zarr.codecs.BloscCodec(cname="lz4", clevel=clevel, shuffle="bitshuffle"),)
    if codec == "zstd":
        return (zarr.codecs.ZstdCodec(level=clevel),)
    if codec == "none":
        return ()
    raise UsageError(f"codec {codec!r} is not supported; use one of {', '.join(CODECS)}")


def dims_of(layout: StoreLayout) -> tuple[list[tuple[str, str, str]], tuple[str, str]]:
    """Dimension names of every ``h`` array and of ``features``.

    When every capture point has the same shape (any ViT), they share ``token``/``channel``;
    otherwise (CNNs) each array gets its own ``token_hK``/``channel_hK`` dims, since xarray needs
    arrays sharing a dimension name to agree on its length.
    """
    shared = len({(p.n_tokens, p.n_channels) for p in layout.all_points}) == 1
    names = layout.array_names
    h_dims = [
        (SAMPLE_DIM, "token", "channel")
        if shared
        else (SAMPLE_DIM, f"token_{name}", f"channel_{name}")
        for name in names
    ]
    channel_len = layout.points[0].n_channels if shared else None
    feature_dim = "channel" if layout.n_features == channel_len else "feature"
    return h_dims, (SAMPLE_DIM, feature_dim)
