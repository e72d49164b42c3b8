"""Worker claims: which process fills which shards of a store (``claims/worker-k-of-N``).

A claim is taken by creating its folder, which is atomic: of two processes claiming the same
worker at once, exactly one wins. A live claim by another process (same host) is refused; a stale
one (its process is gone, or it died before recording itself) is taken over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import zarr

from rba_store.errors import ConfigMismatchError
from rba_store.store.layout import CLAIMS_GROUP


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_worker(group: zarr.Group, root: Path, index: int, n_workers: int) -> str:
    """Record that this process fills the shards of worker ``index`` of ``n_workers``.

    Returns the claim's path, for :func:`release_claim`.
    """
    path = f"{CLAIMS_GROUP}/worker-{index}-of-{n_workers}"
    if CLAIMS_GROUP not in group:  # stores made before claims existed
        group.require_group(CLAIMS_GROUP)
    folder = root / path
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
            release_claim(group, root, path)  # stale (or our own): replace it
            continue
        group[CLAIMS_GROUP].create_array(  # type: ignore[union-attr]
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


def release_claim(group: zarr.Group, root: Path, path: str) -> None:
    """Remove a claim (its metadata and its folder)."""
    with contextlib.suppress(KeyError):
        del group[path]
    shutil.rmtree(root / path, ignore_errors=True)
