"""Analyses saved beside the arrays: ``stats/<name>`` and ``fits/<name>`` groups.

Each is an xarray Dataset written with ``to_zarr``, readable with
``xarray.open_zarr(STORE, group="fits/<name>")``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import xarray as xr
import zarr

from rba_store.errors import UsageError

STATS, FITS = "stats", "fits"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


def analysis_path(kind: str, name: str) -> str:
    """Group path of a saved analysis, e.g. ``stats/tokens-all``."""
    if not _NAME.match(name):
        raise UsageError(
            f"name {name!r} is not valid; use letters, digits and _ . = - (not starting with "
            "a punctuation mark)"
        )
    return f"{kind}/{name}"


def read(root: Path, path: str) -> xr.Dataset:
    """The analysis group at ``path`` as an in-memory Dataset."""
    with xr.open_zarr(str(root), group=path, consolidated=False, zarr_format=3) as ds:
        return ds.load()


def open_lazy(root: Path, path: str) -> xr.Dataset:
    """The analysis group at ``path``, its arrays read on access (e.g. a few blocks of large
    joint moments)."""
    return xr.open_zarr(str(root), group=path, consolidated=False, zarr_format=3)


def write(group: zarr.Group, root: Path, path: str, ds: xr.Dataset) -> None:
    """Save an analysis group, replacing one of the same path.

    The group is written whole beside the store, then moved in: a write error (full disk,
    read-only folder) or a crash while writing leaves the store as it was.
    """
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
