"""The store's on-disk protocol: array names, attributes, layout, ledger, open and create.

This is the only module that knows the store's array paths and attribute keys (see
``docs/STORE.md`` for the protocol in prose). A store is one Zarr v3 group:

- ``h0`` … ``hL``: the residual stream after k blocks, dims ``("sample", "token", "channel")``;
- ``features`` (``"sample", "channel"``), ``label`` (``"sample"``, int64) and ``sample_id``
  (``"sample"``, string);
- ``ledger/shards`` (``"shard"``, uint8): 1 where every array's shard has been written;
- the group attribute ``rba_store``: the extraction's complete description and its fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.codecs

from rba_store.errors import ConfigMismatchError, StoreError, UsageError

FORMAT_VERSION = 1
ATTRS_KEY = "rba_store"
LEDGER_PATH = "ledger/shards"
CLAIMS_GROUP = "claims"
FEATURES, LABEL, SAMPLE_ID = "features", "label", "sample_id"
SAMPLE_DIM = "sample"
CODECS = ("blosc-zstd", "zstd", "blosc-lz4", "none")
DTYPES = ("float32", "float16")
# Keys of the attributes that describe a run rather than the extraction: not fingerprinted.
_UNFINGERPRINTED = ("fingerprint", "run")


def h_name(point_idx: int) -> str:
    """Name of the array holding the residual stream after ``point_idx`` blocks."""
    return f"h{point_idx}"


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
    codec: str = "blosc-zstd"
    clevel: int = 3

    @property
    def n_blocks(self) -> int:
        return len(self.points) - 1

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_samples / self.shard_samples)

    def shard_rows(self, shard_idx: int) -> tuple[int, int]:
        """Half-open sample range ``[start, stop)`` of one shard."""
        start = shard_idx * self.shard_samples
        return start, min(start + self.shard_samples, self.n_samples)

    def sample_bytes(self) -> int:
        """Bytes of one sample over all capture points (uncompressed)."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(p.n_tokens * p.n_channels for p in self.points) * itemsize

    def to_attrs(self) -> dict[str, Any]:
        return {
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

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreLayout:
        points = tuple(
            CapturePoint(p["n_tokens"], p["n_channels"], tuple(p["source_shape"]))
            for p in attrs["points"]
        )
        return cls(
            n_samples=attrs["n_samples"],
            points=points,
            n_features=attrs["n_features"],
            dtype=attrs["dtype"],
            chunk_samples=attrs["chunk_samples"],
            shard_samples=attrs["shard_samples"],
            codec=attrs["codec"],
            clevel=attrs["clevel"],
        )


def plan_layout(
    n_samples: int,
    points: Sequence[CapturePoint],
    n_features: int,
    dtype: str = "float32",
    *,
    codec: str = "blosc-zstd",
    clevel: int = 3,
    chunk_mb: float = 4.0,
    shard_mb: float = 16.0,
    chunk_samples: int | None = None,
    shard_samples: int | None = None,
) -> StoreLayout:
    """Choose chunk and shard sizes: chunks of about ``chunk_mb``, shards of whole chunks.

    Chunks are balanced (``n_samples`` split into equal chunks) so that the edge chunk is not
    mostly padding. A shard is the extractor's write unit: it is written once, whole.
    """
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if codec not in CODECS:
        raise UsageError(f"codec {codec!r} is not supported; use one of {', '.join(CODECS)}")
    if n_samples < 1:
        raise UsageError(f"the data set has {n_samples} samples; at least 1 is needed")
    itemsize = np.dtype(dtype).itemsize
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
    )


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
    shared = len({(p.n_tokens, p.n_channels) for p in layout.points}) == 1
    h_dims = [
        (SAMPLE_DIM, "token", "channel")
        if shared
        else (SAMPLE_DIM, f"token_{h_name(k)}", f"channel_{h_name(k)}")
        for k in range(len(layout.points))
    ]
    channel_len = layout.points[0].n_channels if shared else None
    feature_dim = "channel" if layout.n_features == channel_len else "feature"
    return h_dims, (SAMPLE_DIM, feature_dim)


# -- fingerprint ------------------------------------------------------------------------------


def normalize(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so stored and fresh descriptions compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def normalize_json(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars become numbers, non-finite floats the strings inf/-inf/nan."""
    if isinstance(obj, dict):
        return {str(k): normalize_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [normalize_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def fingerprint(description: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a description, without its run-specific keys."""
    body = {k: v for k, v in description.items() if k not in _UNFINGERPRINTED}
    canonical = json.dumps(normalize(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 3) -> str:
    """Human-readable list of the leaves that differ between two descriptions."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in _UNFINGERPRINTED:
                    walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            diffs.append(f"{path}: {a!r} in the store, {b!r} now")

    walk(normalize(old), normalize(new), "")
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


# -- open / create ----------------------------------------------------------------------------


def is_store(path: str | Path) -> bool:
    """True when ``path`` holds a Zarr group with rba-store attributes."""
    try:
        group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    return ATTRS_KEY in group.attrs


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an existing store, checking that it is one and that its format is readable."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {str(path)!r} does not exist; create it with 'rba-store extract'")
    try:
        group = zarr.open_group(str(path), mode=mode, use_consolidated=False)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise StoreError(
            f"{str(path)!r} is not an rba-store store (no Zarr v3 group there); "
            "pass the directory written by 'rba-store extract'"
        ) from e
    attrs = group.attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict):
        raise StoreError(
            f"{str(path)!r} is a Zarr group but not an rba-store store (no {ATTRS_KEY!r} "
            "attributes); pass the directory written by 'rba-store extract'"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"store {str(path)!r} has format version {version!r}, newer than this rba-store "
            f"reads ({FORMAT_VERSION}); upgrade rba-store"
        )
    return group


def read_description(group: zarr.Group) -> dict[str, Any]:
    """The extraction's description (the ``rba_store`` group attribute)."""
    return dict(group.attrs[ATTRS_KEY])


def read_layout(group: zarr.Group) -> StoreLayout:
    return StoreLayout.from_attrs(read_description(group)["layout"])


def create_store(
    path: str | Path, description: Mapping[str, Any], layout: StoreLayout
) -> zarr.Group:
    """Create a store with every array preallocated and an empty ledger."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    comp = compressors(layout.codec, layout.clevel)
    h_dims, feature_dims = dims_of(layout)
    n, chunk, shard = layout.n_samples, layout.chunk_samples, layout.shard_samples
    for k, point in enumerate(layout.points):
        shape = (n, point.n_tokens, point.n_channels)
        group.create_array(
            h_name(k),
            shape=shape,
            chunks=(chunk, *shape[1:]),
            shards=(shard, *shape[1:]),
            dtype=layout.dtype,
            compressors=comp,
            fill_value=0,
            dimension_names=h_dims[k],
            attributes={"source_shape": list(point.source_shape)},
        )
    group.create_array(
        FEATURES,
        shape=(n, layout.n_features),
        chunks=(shard, layout.n_features),
        dtype=layout.dtype,
        compressors=comp,
        fill_value=0,
        dimension_names=feature_dims,
    )
    group.create_array(
        LABEL,
        shape=(n,),
        chunks=(shard,),
        dtype="int64",
        fill_value=-1,
        dimension_names=(SAMPLE_DIM,),
    )
    group.create_array(
        SAMPLE_ID, shape=(n,), chunks=(shard,), dtype=str, dimension_names=(SAMPLE_DIM,)
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
    # The description goes last: a store without it is not yet a store (``is_store``).
    group.attrs[ATTRS_KEY] = normalize(dict(description))
    return group


def remove_store(path: str | Path) -> None:
    """Delete a store, refusing anything that is not an rba-store store or an empty directory."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return
    if not is_store(path):
        raise StoreError(
            f"refusing to overwrite {str(path)!r}: it is not an rba-store store; "
            "choose another --out path or remove it yourself"
        )
    shutil.rmtree(path)


def check_compatible(group: zarr.Group, description: Mapping[str, Any]) -> None:
    """Raise unless an existing store was made with the same configuration."""
    stored = read_description(group)
    if stored.get("fingerprint") != fingerprint(description):
        raise ConfigMismatchError(
            "the store was made with a different configuration ("
            + describe_differences(stored, description)
            + "); re-run with --overwrite to replace it, or choose another --out path"
        )


# -- ledger -----------------------------------------------------------------------------------


def completed_shards(group: zarr.Group) -> np.ndarray:
    """Boolean mask of the shards whose data are all written."""
    return np.asarray(group[LEDGER_PATH][:]).astype(bool)


def discard_torn_shard(group: zarr.Group, shard_idx: int, names: Sequence[str]) -> None:
    """Delete whatever a crash left of an incomplete shard before it is written again.

    Zarr merges a write into an existing shard file (it reads the file first), so a torn file
    would fail to decode, or worse, lend its bytes; an incomplete shard's files hold nothing of
    value (the ledger never called them complete).
    """
    if group[LEDGER_PATH][shard_idx]:  # one ledger object, not the whole ledger
        raise StoreError(f"shard {shard_idx} is complete; refusing to discard it")
    root = Path(str(group.store.root))  # type: ignore[attr-defined]
    for name in names:
        array = group[name]
        key = array.metadata.encode_chunk_key((shard_idx,) + (0,) * (array.ndim - 1))
        (root / array.path / key).unlink(missing_ok=True)


def mark_shard_complete(group: zarr.Group, shard_idx: int) -> None:
    """Record a shard as complete; called only after all its arrays are written."""
    group[LEDGER_PATH][shard_idx] = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_worker(group: zarr.Group, index: int, n_workers: int) -> str:
    """Record that this process fills the shards of worker ``index`` of ``n_workers``.

    The claim is taken by creating its folder, which is atomic: of two processes claiming the
    same worker at once, exactly one wins. A live claim by another process (same host) is
    refused; a stale one (its process is gone, or it died before recording itself) is taken
    over. Returns the claim's path, for :func:`release_claim`.
    """
    path = f"{CLAIMS_GROUP}/worker-{index}-of-{n_workers}"
    if CLAIMS_GROUP not in group:  # stores made before claims existed
        group.require_group(CLAIMS_GROUP)
    folder = Path(str(group.store.root)) / path  # type: ignore[attr-defined]
    host = socket.gethostname()
    for _ in range(3):
        try:
            folder.mkdir()
        except FileExistsError:
            owner = _claim_owner(group, path)
            mine = owner is not None and owner.get("pid") == os.getpid()
            live = owner is not None and (owner.get("host") != host or _alive(int(owner["pid"])))
            if live and not mine:
                who = f"pid {owner['pid']} on {owner.get('host')}"  # type: ignore[index]
                raise ConfigMismatchError(
                    f"worker {index} of {n_workers} is already filling this store ({who}); give "
                    "each process its own --worker-index, or wait for that one to finish"
                ) from None
            release_claim(group, path)  # stale (or our own): replace it
            continue
        group[CLAIMS_GROUP].create_array(
            path.split("/", 1)[1],
            shape=(0,),
            dtype="uint8",
            dimension_names=("claim",),
            attributes={"pid": os.getpid(), "host": host},
            overwrite=True,
        )
        return path
    raise ConfigMismatchError(
        f"worker {index} of {n_workers}: another process keeps claiming it; give each process "
        "its own --worker-index"
    )


def _claim_owner(group: zarr.Group, path: str, wait: float = 2.0) -> dict[str, Any] | None:
    """The pid and host of a claim; None when its owner died before recording them."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return dict(group[path].attrs)
        except KeyError:  # the folder exists, its metadata not (yet)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def release_claim(group: zarr.Group, path: str) -> None:
    """Remove a claim (its metadata and its folder)."""
    with contextlib.suppress(KeyError):
        del group[path]
    shutil.rmtree(Path(str(group.store.root)) / path, ignore_errors=True)  # type: ignore[attr-defined]


def consolidate(path: str | Path) -> None:
    """Write consolidated metadata so that a plain ``xarray.open_zarr(STORE)`` opens quietly.

    Consolidated metadata is outside the Zarr v3 spec (zarr warns about it); rba-store itself
    never reads it, and every command that adds to the store consolidates again at its end.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path), zarr_format=3)


# -- analyses saved beside the arrays (stats/<name>, fits/<name>) ------------------------------

STATS_GROUP, FITS_GROUP = "stats", "fits"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


def analysis_path(kind: str, name: str) -> str:
    """Group path of a saved analysis, e.g. ``stats/tokens-all``."""
    if not _NAME.match(name):
        raise UsageError(
            f"name {name!r} is not valid; use letters, digits and _ . = - (not starting with "
            "a punctuation mark)"
        )
    return f"{kind}/{name}"


def has_analysis(store: str | Path, path: str) -> bool:
    """Whether an analysis group (e.g. ``fits/4-6``) is saved in the store."""
    try:
        open_store(store)[path]
    except KeyError:
        return False
    return True


def read_analysis(store: str | Path, path: str) -> xr.Dataset | None:
    """A saved analysis as an in-memory Dataset, or None when there is none."""
    if not has_analysis(store, path):
        return None
    with xr.open_zarr(str(store), group=path, consolidated=False, zarr_format=3) as ds:
        return ds.load()


def write_analysis(store: str | Path, path: str, ds: xr.Dataset) -> None:
    """Save an analysis group (replacing one of the same path) and re-consolidate metadata.

    The group is written whole beside the store, then moved in: a write error (full disk,
    read-only folder) or a crash while writing leaves the store as it was.
    """
    group = open_store(store, mode="r+")
    root = Path(store)
    staging = root.parent / f".{root.name}.{path.replace('/', '.')}.writing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ds.to_zarr(str(staging), mode="w", zarr_format=3, consolidated=False)
        group.require_group(path.rpartition("/")[0])
        target = root / path
        replaced = target.with_name(f".{target.name}.replaced-{os.getpid()}")
        if target.exists():
            os.replace(target, replaced)
        os.replace(staging, target)
        shutil.rmtree(replaced, ignore_errors=True)
    except OSError as e:  # name the store, not the staging folder
        raise OSError(e.errno, e.strerror or str(e), f"{root}/{path}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    consolidate(store)
