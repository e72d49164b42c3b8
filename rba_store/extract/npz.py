"""Arrays of a ``.npz`` file without reading it whole.

``numpy.load`` reads a member of an ``.npz`` completely when it is accessed, and the samples of
a data set are read a batch at a time: a member stored uncompressed (``numpy.savez``) is
memory-mapped where it lies in the archive, so that counting the samples (``--dry-run``) and
extracting take no more memory than a batch; a compressed one (``numpy.savez_compressed``) is
read whole. Arrays of Python objects are refused (reading them would mean unpickling).
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local file header (30 bytes)


def npz_arrays(path: Path, names: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The names of the archive's arrays (without ``.npy``), and those of ``names`` it holds:
    memory-mapped (read-only) when stored uncompressed, else read whole.

    Raises ``ValueError`` for an array of Python objects (as ``numpy.load(allow_pickle=False)``).
    """
    with zipfile.ZipFile(path) as archive:
        members = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        arrays = {
            name: _array(archive, path, archive.getinfo(f"{name}.npy"))
            for name in names
            if name in members
        }
    return members, arrays


def _array(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        name_len, extra_len = header[-2], header[-1]
        f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if not int(np.prod(shape)):
        return np.empty(shape, dtype)
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
