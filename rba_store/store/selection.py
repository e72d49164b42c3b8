"""Which samples and token vectors an analysis uses: selections, completeness, token checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rba_store.errors import IncompleteStoreError, UsageError
from rba_store.store.handle import Store


@dataclass(frozen=True)
class SampleSelection:
    """Which samples to use: all, the first ``limit``, or ``sample`` drawn with ``seed``."""

    limit: int | None = None
    sample: int | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        if self.sample is not None:
            return {"mode": "sample", "n": self.sample, "seed": self.seed}
        if self.limit is not None:
            return {"mode": "limit", "n": self.limit}
        return {"mode": "all"}

    def indices(self, available: np.ndarray, store: Store | str) -> np.ndarray:
        """Sorted sample indices, chosen among the ``available`` ones (complete shards)."""
        if self.limit is not None and self.sample is not None:
            raise UsageError("--limit and --sample exclude each other; pass only one")
        wanted = self.sample if self.sample is not None else self.limit
        if wanted is None:
            return available
        option = "--sample" if self.sample is not None else "--limit"
        if wanted < 1 or wanted > len(available):
            raise UsageError(
                f"{option} {wanted} is out of range for {str(store)!r}, which has {len(available)} "
                f"usable samples; pass 1..{len(available)}"
            )
        if self.sample is None:
            return available[:wanted]
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(available, size=wanted, replace=False))


def split_holdout(
    indices: np.ndarray, fraction: float | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, held)``: ``fraction`` of ``indices`` held out, drawn with ``seed``.

    ``stats --holdout``, ``extract --stats --holdout`` and ``fit --holdout`` all split with this
    function, so that the held-out moments saved with statistics cover exactly a fit's held-out
    rows.
    """
    if fraction is None:
        return indices, indices[:0]
    if not 0 < fraction < 1:
        raise UsageError(f"--holdout {fraction} is out of range; pass a fraction between 0 and 1")
    n_held = max(1, round(fraction * len(indices)))
    if n_held >= len(indices):
        raise UsageError(
            f"--holdout {fraction} leaves no sample to fit ({len(indices)} samples); "
            "pass a smaller fraction"
        )
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(indices, size=n_held, replace=False))
    return np.setdiff1d(indices, held), held


def describe_holdout(fraction: float | None, seed: int) -> dict[str, Any] | None:
    """How saved statistics and fits record a held-out split (None: no split)."""
    return None if fraction is None else {"fraction": float(fraction), "seed": int(seed)}


def missing_workers(store: Store) -> tuple[list[int], int]:
    """The worker indices whose shards are not all written, and the number of workers the
    extraction ran with (recorded at its start; 1 for stores that do not say)."""
    n = int(store.description.get("run", {}).get("num_workers", 1))
    incomplete = np.flatnonzero(~store.completed_shards())
    return sorted({int(s) % n for s in incomplete}), n


def how_to_finish(store: Store) -> str:
    """What finishes an incomplete store: the same command, or the missing workers' commands."""
    missing, n = missing_workers(store)
    if n == 1:
        return "re-running the same 'rba-store extract' command"
    return (
        f"running the same 'rba-store extract' command with --num-workers {n} --worker-index "
        f"{', '.join(map(str, missing))} (the workers whose shards are missing)"
    )


def usable_samples(store: Store, allow_incomplete: bool) -> np.ndarray:
    """Indices of the samples in complete shards; refuses an incomplete store unless allowed."""
    layout = store.layout
    complete = store.completed_shards()
    ranges = [layout.shard_rows(s) for s in range(layout.n_shards) if complete[s]]
    available = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.arange(0)
    if not complete.all() and not allow_incomplete:
        raise IncompleteStoreError(
            f"store {str(store)!r} is incomplete: {int(complete.sum())}/{layout.n_shards} shards "
            f"({len(available)}/{layout.n_samples} samples) are written; finish it by "
            f"{how_to_finish(store)}, or pass --allow-incomplete to use what is there"
        )
    if len(available) == 0:
        raise IncompleteStoreError(
            f"store {str(store)!r} holds no complete shard yet; run 'rba-store extract' to fill it"
        )
    return available


def check_tokens(store: Store, tokens: str) -> None:
    """Refuse a token selection the store cannot give."""
    description = store.description
    if tokens == description["tokens"]:  # what the store holds (e.g. random:16) always reads
        return
    if tokens not in ("all", "cls", "last"):
        raise UsageError(f"--tokens {tokens!r} is not valid; use all, cls or last")
    if tokens == "last" and description["tokens"] != "last":
        raise UsageError(
            f"--tokens last reads a store extracted with --tokens last, and {str(store)!r} holds "
            f"--tokens {description['tokens']}; leave --tokens out"
        )
    if tokens == "all" and description["tokens"] == "cls":
        raise UsageError(
            f"--tokens all needs every token, but {str(store)!r} holds the class token only "
            "(extracted with --tokens cls); use --tokens cls, or re-extract with --tokens all"
        )
    if tokens == "cls" and not description["model"].get("has_class_token", False):
        raise UsageError(
            f"--tokens cls needs a class token, and the model of {str(store)!r} "
            f"({description['model']['name']}) has none; use --tokens all"
        )
