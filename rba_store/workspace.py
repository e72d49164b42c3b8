"""Per-thread float64 scratch buffers, reused across the chunks an analysis goes through."""

from __future__ import annotations

import math
import threading

import numpy as np

_local = threading.local()


def float64_buffer(shape: tuple[int, ...], slot: str) -> np.ndarray:
    """This thread's float64 buffer for ``slot`` as an array of ``shape`` (contents undefined).

    Reusing one buffer per thread and slot, instead of a fresh 10-300 MB array per chunk, saves
    the page faults of fresh memory (a fresh 250 MB copy took 0.65 s where a reused buffer took
    0.05 s) and keeps the process's peak memory flat however many chunks pass: glibc otherwise
    serves such blocks from per-thread heaps that fragment as more chunks go through. The array
    is valid until the next call with the same slot in the same thread; the buffer stays with
    the thread (the largest chunk's size per slot).
    """
    size = math.prod(shape)
    buffers: dict[str, np.ndarray] = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < size:
        buffer = buffers[slot] = np.empty(size, dtype=np.float64)
    return buffer[:size].reshape(shape)
