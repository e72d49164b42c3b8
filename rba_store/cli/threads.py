"""``--threads N`` (anywhere on the command line): the CPU threads of torch and of BLAS.

Default: ``$OMP_NUM_THREADS`` when it is set, otherwise half the CPUs this process may use (at
least 1). Measured on a shared 2-core machine: with every core given to torch, another job on
the machine made the demo's ``extract`` take 0.9-31 s and ``evaluate --auto`` 12-96 s between
runs (OpenMP threads spin-wait for a busy core), and the extractor's loader and writer threads
(decoding, compression) compete with the forward pass for the same cores; one thread per two
cores leaves them room and keeps timings steady.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rba_store.errors import UsageError

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Set only by an explicit --threads: Dask's local threads (rba_store.dask_compute.local_threads).
# Without it the analyses keep every core for Dask (reading and decompressing shards), with BLAS
# threads split between the concurrent tasks.
DASK_ENV = "RBA_STORE_THREADS"


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return max(1, (available or os.cpu_count() or 2) // 2)


def pop_threads(args: list[str]) -> tuple[list[str], int | None]:
    """Remove ``--threads N`` / ``--threads=N`` from ``args``; its value (None when absent)."""
    rest, value = [], None
    it = iter(args)
    for arg in it:
        if arg == "--threads" or arg.startswith("--threads="):
            text = arg.partition("=")[2] if "=" in arg else next(it, "")
            if not text.isdigit() or int(text) < 1:
                raise UsageError(f"--threads {text!r} is invalid; pass a positive whole number")
            value = int(text)
        else:
            rest.append(arg)
    return rest, value


@contextlib.contextmanager
def cpu_threads(n: int, explicit: bool = False) -> Iterator[None]:
    """Run with ``n`` threads for torch and BLAS; restore the previous settings afterwards.

    ``explicit`` (``--threads N`` given): Dask's local scheduler runs ``n`` threads too, and
    the BLAS threads of its concurrent tasks add up to ``n``."""
    keys = (*_ENV, DASK_ENV)
    saved = {k: os.environ.get(k) for k in keys}
    for key in _ENV:  # libraries not yet loaded read these when they start
        os.environ[key] = str(n)
    if explicit:
        os.environ[DASK_ENV] = str(n)
    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch is not None else None
    try:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=n, user_api="blas"):
            _set_torch_threads(n)
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if previous is not None and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(previous)


def _set_torch_threads(n: int) -> None:
    """Set torch's threads now if it is loaded; otherwise it reads ``OMP_NUM_THREADS`` when a
    command imports it (so that ``info`` and ``validate`` do not pay for importing torch)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
