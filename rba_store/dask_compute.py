"""Dask plumbing shared by the analyses: tree reductions, local threads, a running cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import dask
from dask.delayed import Delayed

from rba_store.errors import NotFoundError, UsageError

THREADS_ENV = "RBA_STORE_THREADS"  # set by the CLI's --threads N (rba_store/cli/threads.py)


def tree_reduce(parts: list[Delayed], combine: Callable[[Any, Any], Any]) -> Delayed:
    """Combine delayed partial results pairwise, level by level (a balanced tree)."""
    merge = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        paired = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = paired + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def shared_constant(client: Any, value: Any) -> Any:
    """``value`` once in the graph, however many tasks take it: on a cluster, scattered to the
    workers (a future: the graph holds its key, so no "Sending large graph" for large maps);
    locally, one delayed constant."""
    if client is not None:
        return client.scatter([value], broadcast=False)[0]  # a list: one future for all of it
    return dask.delayed(value, traverse=False)


def check_scheduler_file(scheduler_file: str | None) -> None:
    """Refuse a ``--scheduler-file`` that does not exist (before any work, even none on Dask)."""
    if scheduler_file is not None and not os.path.isfile(scheduler_file):
        raise NotFoundError(
            f"--scheduler-file {scheduler_file!r} does not exist; start a scheduler with "
            f"'dask scheduler --scheduler-file {scheduler_file}' first"
        )


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, scheduler_file: str | None = None) -> Iterator[Any]:
    """A ``dask.distributed`` client for a running cluster, or None for the local scheduler."""
    if scheduler is None and scheduler_file is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as e:  # pragma: no cover - distributed is a dependency
        raise UsageError("--scheduler needs dask.distributed: pip install distributed") from e
    check_scheduler_file(scheduler_file)
    try:
        client = Client(scheduler, scheduler_file=scheduler_file, timeout="10s")
    except (OSError, TimeoutError, ValueError) as e:
        where = scheduler or scheduler_file
        raise UsageError(
            f"cannot connect to the Dask scheduler {where!r} ({e}); start one with "
            "'dask scheduler' or pass the address it prints"
        ) from e
    with client:
        yield client


def compute(
    graph: Delayed,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_tasks: int = 1,
) -> Any:
    """Compute a delayed result locally (threads) or on a running ``dask.distributed`` cluster."""
    with dask_client(scheduler, scheduler_file) as client:
        return compute_with(client, graph, n_tasks)


def local_threads() -> int:
    """Threads of a local computation: ``$RBA_STORE_THREADS`` (what ``--threads N`` sets), else
    every core."""
    env = os.environ.get(THREADS_ENV, "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def compute_with(client: Any, graph: Delayed, n_tasks: int = 1) -> Any:
    """Compute on ``client``'s cluster, or locally when it is None.

    Locally, Dask runs :func:`local_threads` threads, and the shard tasks' GEMMs share them:
    BLAS gets ``threads // concurrent tasks`` threads each, so that one task's GEMM does not
    fight another's (oversubscription) and one task's read overlaps another's GEMM.
    """
    if client is not None:
        return client.compute(graph).result()
    from threadpoolctl import threadpool_limits

    threads = local_threads()
    blas_threads = max(1, threads // max(1, min(n_tasks, threads)))
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return graph.compute(num_workers=threads)  # the threaded scheduler (or one configured)


def concurrency(client: Any) -> int:
    """How many tasks run at once: the cluster's worker threads, or the local threads."""
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return local_threads()
