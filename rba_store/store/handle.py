"""``Store``: an open activation store, opened once per command and passed to the library.

Like ``zarr.Group`` or ``xarray.Dataset``, a :class:`Store` is a handle: it opens the Zarr group
once, reads the description and layout once, and hands out the arrays, the ledger, the worker
claims and the saved analyses (``stats/<name>``, ``fits/<name>``). Functions that take a store
accept a :class:`Store` or a path (opened once, at that boundary, by :meth:`Store.coerce`).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from rba_store.errors import ConfigMismatchError, NotFoundError, StoreError, UsageError
from rba_store.store import analyses, claims
from rba_store.store.fingerprint import describe_differences, fingerprint, normalize
from rba_store.store.layout import (
    ATTRS_KEY,
    BFLOAT16,
    CLAIMS_GROUP,
    DTYPE_ATTR,
    FEATURES,
    FORMAT_VERSION,
    INPUT_IDS,
    LABEL,
    LEDGER_PATH,
    NOT_STORED,
    SAMPLE_DIM,
    SAMPLE_ID,
    SAMPLE_ID_DIMS,
    TOKEN_POSITIONS,
    WEIGHTS_PATH,
    StoreLayout,
    compressors,
    decode_sample_ids,
    decode_values,
    dims_of,
    storage_dtype,
)
from rba_store.store.shard_files import ShardFiles

MODES = ("r", "r+")


class Store:
    """An open rba-store store: its group, description and layout, read once."""

    def __init__(self, path: str | Path, group: zarr.Group, mode: str = "r") -> None:
        self.path = Path(path)
        self.group = group
        self.mode = mode
        self.description: dict[str, Any] = dict(group.attrs[ATTRS_KEY])
        self.layout = StoreLayout.from_attrs(self.description["layout"])
        self._arrays: dict[str, zarr.Array] = {}
        self._files: dict[str, ShardFiles | None] = {}
        self._writable: Store | None = self if mode == "r+" else None

    # -- opening, creating, removing ------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> Store:
        """Open an existing store, checking that it is one and that its format is readable."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        path = Path(path)
        if not path.exists():
            raise NotFoundError(
                f"store {str(path)!r} does not exist; create it with 'rba-store extract'"
            )
        if not path.is_dir():
            raise NotFoundError(
                f"{str(path)!r} is a file, not a store (a folder); pass the folder written by "
                "'rba-store extract'"
            )
        try:
            group = zarr.open_group(str(path), mode=mode, use_consolidated=False)  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise NotFoundError(
                f"{str(path)!r} is not an rba-store store (no Zarr v3 group there); "
                "pass the directory written by 'rba-store extract'"
            ) from e
        attrs = group.attrs.get(ATTRS_KEY)
        if not isinstance(attrs, dict):
            raise NotFoundError(
                f"{str(path)!r} is a Zarr group but not an rba-store store (no {ATTRS_KEY!r} "
                "attributes); pass the directory written by 'rba-store extract'"
            )
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"store {str(path)!r} has format version {version!r}, newer than this rba-store "
                f"reads ({FORMAT_VERSION}); upgrade rba-store"
            )
        return cls(path, group, mode)

    @classmethod
    def coerce(cls, store: Store | str | Path, mode: str = "r") -> Store:
        """``store`` itself when it is a :class:`Store` (writable if asked), else open the path."""
        if isinstance(store, Store):
            return store.writable() if mode == "r+" else store
        return cls.open(store, mode)

    @classmethod
    def create(cls, path: str | Path, description: Mapping[str, Any], layout: StoreLayout) -> Store:
        """Create a store with every array preallocated and an empty ledger.

        A store described as holding no activations (``extract --no-activations``) gets no
        ``h`` arrays at all: an array that exists reads as data (its fill value) to any reader.
        """
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        comp = compressors(layout.codec, layout.clevel)
        h_dims, feature_dims = dims_of(layout)
        n, chunk, shard = layout.n_samples, layout.chunk_samples, layout.shard_samples
        stored = description.get("activations") != NOT_STORED
        points = zip(layout.array_names, layout.all_points, strict=True) if stored else ()
        bf16 = {DTYPE_ATTR: BFLOAT16} if layout.dtype == BFLOAT16 else {}
        for k, (name, point) in enumerate(points):
            shape = (n, point.n_tokens, point.n_channels)
            group.create_array(
                name,
                shape=shape,
                chunks=(chunk, *shape[1:]),
                shards=(shard, *shape[1:]),
                dtype=storage_dtype(layout.dtype),
                compressors=comp,
                fill_value=0,
                dimension_names=h_dims[k],
                attributes={"source_shape": list(point.source_shape)} | bf16,
            )
        group.create_array(
            FEATURES,
            shape=(n, layout.n_features),
            chunks=(shard, layout.n_features),
            dtype=storage_dtype(layout.dtype),
            compressors=comp,
            fill_value=0,
            dimension_names=feature_dims,
            attributes=bf16,
        )
        if layout.seq_len is not None:  # a language model's windows: the labels of the rows
            group.create_array(
                INPUT_IDS,
                shape=(n, layout.seq_len),
                chunks=(shard, layout.seq_len),
                dtype="int32",
                compressors=compressors("zstd", 3),
                fill_value=-1,
                dimension_names=(SAMPLE_DIM, "position"),
                attributes={"description": "token ids of each window; position t predicts t+1"},
            )
        if str(description.get("tokens", "")).startswith("random:"):
            group.create_array(
                TOKEN_POSITIONS,
                shape=(n, layout.points[0].n_tokens),
                chunks=(shard, layout.points[0].n_tokens),
                dtype="int32",
                compressors=compressors("zstd", 3),
                fill_value=-1,
                dimension_names=(SAMPLE_DIM, "token"),
                attributes={"description": "position of each stored token in the model's tokens"},
            )
        group.create_array(
            LABEL,
            shape=(n,),
            chunks=(shard,),
            dtype="int64",
            fill_value=-1,
            dimension_names=(SAMPLE_DIM,),
        )
        # Ids in core Zarr v3 types (uint8), so that every Zarr v3 reader reads them, not only
        # zarr-python (its string dtype is an extension): see layout.encode_sample_ids.
        width = layout.sample_id_bytes
        if width is None:
            raise ValueError("a new store needs layout.sample_id_bytes (see plan_layout)")
        group.create_array(
            SAMPLE_ID,
            shape=(n, width),
            chunks=(shard, width),
            dtype="uint8",
            compressors=compressors("zstd", 3),
            fill_value=0,
            dimension_names=SAMPLE_ID_DIMS,
            attributes={
                "encoding": "utf-8",
                "width": width,
                "description": "each sample's id in UTF-8, zero-padded to width bytes",
            },
        )
        group.create_array(
            LEDGER_PATH,
            shape=(layout.n_shards,),
            chunks=(1,),
            dtype="uint8",
            fill_value=0,
            dimension_names=("shard",),
        )
        group.create_group(CLAIMS_GROUP)
        # The description goes last: a store without it is not yet a store (``exists``).
        group.attrs[ATTRS_KEY] = normalize(dict(description))
        return cls(path, group, "r+")

    @staticmethod
    def exists(path: str | Path) -> bool:
        """True when ``path`` holds a Zarr group with rba-store attributes."""
        try:
            group = zarr.open_group(str(path), mode="r", use_consolidated=False)
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        return ATTRS_KEY in group.attrs

    @staticmethod
    def remove(path: str | Path) -> None:
        """Delete a store, refusing anything that is not a store or an empty directory."""
        path = Path(path)
        if not path.exists():
            return
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            return
        if not Store.exists(path):
            raise StoreError(
                f"refusing to overwrite {str(path)!r}: it is not an rba-store store; "
                "choose another --out path or remove it yourself"
            )
        shutil.rmtree(path)
        # and the extraction workers' statistics partials kept beside it (worker_partials.py)
        shutil.rmtree(path.parent / f".{path.name}.partials", ignore_errors=True)

    def writable(self) -> Store:
        """This store opened for writing (the same handle when it already is)."""
        if self._writable is None:
            self._writable = Store.open(self.path, "r+")
        return self._writable

    # -- what it holds ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<rba-store Store {str(self.path)!r} mode={self.mode!r}>"

    def __str__(self) -> str:
        return str(self.path)

    def __reduce__(self) -> tuple[Any, ...]:  # to Dask workers: reopened there, by path
        return (Store.open, (str(self.path), "r"))

    def __dask_tokenize__(self) -> tuple[str, str]:
        return str(self.path.resolve()), self.fingerprint

    @property
    def fingerprint(self) -> str:
        return str(self.description["fingerprint"])

    @property
    def root(self) -> Path:
        """The store's folder on the local file system."""
        return Path(str(self.group.store.root))  # type: ignore[attr-defined]

    def array(self, name: str) -> zarr.Array:
        """An array of the store, opened once per handle."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]  # type: ignore[assignment]
        return self._arrays[name]

    def point(self, k: int) -> zarr.Array:
        """``h_k``: the residual stream after ``k`` blocks (``k > L``: block ``k - L``'s MLP
        output, see :meth:`StoreLayout.array_name`); refused when not stored."""
        self._require_activations()
        if k <= self.layout.n_blocks:
            self.layout.position(k)  # a clear error for a point extract --points left out
        return self.array(self.layout.array_name(k))

    @property
    def activation_names(self) -> list[str]:
        """The ``h`` (and ``m``) arrays the store holds: none for a ``--no-activations`` store
        (an older store of that kind has them, unwritten, reading as zeros: not listed)."""
        if not self.holds_activations:
            return []
        return self.layout.array_names

    @property
    def holds_mlp_outputs(self) -> bool:
        """True for a store extracted with ``--mlp-outputs`` (arrays ``m1 .. mL``)."""
        return bool(self.layout.mlp_points) and self.holds_activations

    @property
    def holds_activations(self) -> bool:
        """False for a store extracted with ``--no-activations`` (statistics only)."""
        return self.description.get("activations") != NOT_STORED

    def read_points(self, points: Sequence[int], start: int, stop: int) -> list[np.ndarray]:
        """``h_k[start:stop]`` for every k in ``points`` (joint numbering: ``m_a`` is ``L + a``)."""
        self._require_activations()
        dtype = self.layout.dtype
        return [decode_values(self._read(k, start, stop), dtype) for k in points]

    def _read(self, k: int, start: int, stop: int) -> np.ndarray:
        """``h_k[start:stop]`` as stored: straight from the shard files where they are laid out
        as rba-store writes them (:class:`ShardFiles`), else through zarr-python."""
        array = self.point(k)
        name = self.layout.array_name(k)
        if name not in self._files:
            self._files[name] = ShardFiles.of(array)
        files = self._files[name]
        return array[start:stop] if files is None else files.read(start, stop)

    def _require_activations(self) -> None:
        if not self.holds_activations:
            raise UsageError(
                f"{str(self.path)!r} holds no activations (extracted with --no-activations): "
                "only what its saved statistics answer (stats, and fit/select/evaluate --auto "
                "of all its rows, from the joint moments) works on it"
            )

    def sample_ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The ids of samples ``[start, stop)`` as strings, from either encoding of ``sample_id``.

        Stores of this format keep them as zero-padded UTF-8 bytes (uint8, ``(sample, byte)``);
        stores written before as zarr-python strings. Read ids through here, not the array.
        """
        return decode_sample_ids(np.asarray(self.array(SAMPLE_ID)[start:stop]))

    def check_compatible(self, description: Mapping[str, Any]) -> None:
        """Raise unless the store was made with the same configuration as ``description``."""
        if self.description.get("fingerprint") != fingerprint(description):
            raise ConfigMismatchError(
                "the store was made with a different configuration ("
                + describe_differences(self.description, description)
                + "); re-run with --overwrite to replace it, or choose another --out path"
            )

    # -- model weights kept in the store (random initialisation) -------------------------------

    def write_weights(self, payload: bytes) -> None:
        """Keep the bytes of a safetensors file of the model's weights in the store."""
        data = np.frombuffer(payload, dtype=np.uint8)
        self.writable().group.create_array(
            WEIGHTS_PATH,
            shape=data.shape,
            chunks=(max(1, min(len(data), 16 * 2**20)),),
            dtype="uint8",
            dimension_names=("byte",),
            attributes={"format": "safetensors"},
        )[:] = data

    def read_weights(self) -> bytes | None:
        """The safetensors bytes kept by :meth:`write_weights`, or None when there are none."""
        try:
            array = self.array(WEIGHTS_PATH)
        except KeyError:
            return None
        return np.asarray(array[:], dtype=np.uint8).tobytes()

    # -- ledger --------------------------------------------------------------------------------

    def completed_shards(self) -> np.ndarray:
        """Boolean mask of the shards whose data are all written (read afresh each call)."""
        return np.asarray(self.array(LEDGER_PATH)[:]).astype(bool)

    def mark_shard_complete(self, shard_idx: int) -> None:
        """Record a shard as complete; called only after all its arrays are written."""
        self.array(LEDGER_PATH)[shard_idx] = 1

    def discard_torn_shard(self, shard_idx: int, names: Sequence[str]) -> None:
        """Delete whatever a crash left of an incomplete shard before it is written again.

        Zarr merges a write into an existing shard file (it reads the file first), so a torn
        file would fail to decode, or worse, lend its bytes; an incomplete shard's files hold
        nothing of value (the ledger never called them complete).
        """
        if self.array(LEDGER_PATH)[shard_idx]:  # one ledger object, not the whole ledger
            raise StoreError(f"shard {shard_idx} is complete; refusing to discard it")
        for name in names:
            array = self.array(name)
            key = array.metadata.encode_chunk_key((shard_idx,) + (0,) * (array.ndim - 1))
            (self.root / array.path / key).unlink(missing_ok=True)

    def shard_present(self, name: str, shard_idx: int) -> bool:
        """Whether the shard object of array ``name`` exists on disk."""
        array = self.array(name)
        key = array.metadata.encode_chunk_key((shard_idx,) + (0,) * (array.ndim - 1))
        return (self.root / array.path / key).exists()

    # -- worker claims -------------------------------------------------------------------------

    def claim_worker(self, index: int, n_workers: int) -> str:
        """Record that this process fills the shards of worker ``index`` (see ``claims``)."""
        return claims.claim_worker(self.writable().group, self.root, index, n_workers)

    def release_claim(self, path: str) -> None:
        claims.release_claim(self.writable().group, self.root, path)

    # -- saved analyses (stats/<name>, fits/<name>) ---------------------------------------------

    def has_analysis(self, kind: str, name: str) -> bool:
        """Whether ``kind/name`` (e.g. ``fits/4-6``) is saved in the store."""
        return analyses.analysis_path(kind, name) in self.group

    def list_analyses(self, kind: str) -> list[str]:
        """Names of the saved analyses of one kind, sorted."""
        if kind not in self.group:
            return []
        return sorted(name for name, _ in self.group[kind].groups())  # type: ignore[union-attr]

    def analysis_attrs(self, kind: str, name: str) -> dict[str, Any]:
        """The attributes of a saved analysis, without reading its arrays."""
        return dict(self.group[analyses.analysis_path(kind, name)].attrs)

    def read_analysis(self, kind: str, name: str) -> xr.Dataset | None:
        """A saved analysis as an in-memory Dataset, or None when there is none."""
        if not self.has_analysis(kind, name):
            return None
        return analyses.read(self.path, analyses.analysis_path(kind, name))

    def write_analysis(self, kind: str, name: str, ds: xr.Dataset) -> None:
        """Save an analysis (replacing one of the same name), written beside and moved in."""
        store = self.writable()
        analyses.write(store.group, self.path, analyses.analysis_path(kind, name), ds)
        store.consolidate()

    def consolidate(self) -> None:
        """Write consolidated metadata so that a plain ``xarray.open_zarr(STORE)`` opens quietly.

        Consolidated metadata is outside the Zarr v3 spec (zarr warns about it); rba-store never
        reads it, and every command that adds to the store consolidates again at its end.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.path), zarr_format=3)
