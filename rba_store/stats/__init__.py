"""Block statistics (BR, relative change, cosine, norms, exact linear CKA) computed lazily with
Dask from a store, saved under ``stats/<name>`` in it and reused."""

from __future__ import annotations

from pathlib import Path

from rba_store.errors import UsageError
from rba_store.stats.reduce import compute_block_stats, stats_attrs
from rba_store.stats.result import BlockStats
from rba_store.store import STATS, SampleSelection, Store, normalize

__all__ = ["BlockStats", "SampleSelection", "compute_block_stats", "default_name", "run_stats"]


def default_name(
    tokens: str,
    selection: SampleSelection,
    cka: bool = True,
    holdout: float | None = None,
    holdout_seed: int = 0,
) -> str:
    """A name that says what was computed: ``tokens-all``, ``tokens-cls-limit100``,
    ``tokens-all-holdout0.2-seed0`` ..."""
    name = f"tokens-{tokens}"
    if selection.sample is not None:
        name += f"-sample{selection.sample}-seed{selection.seed}"
    elif selection.limit is not None:
        name += f"-limit{selection.limit}"
    if holdout is not None:
        name += f"-holdout{holdout:g}-seed{holdout_seed}"
    return name if cka else f"{name}-nocka"


def run_stats(
    store: Store | str | Path,
    *,
    name: str | None = None,
    tokens: str | None = None,
    selection: SampleSelection | None = None,
    allow_incomplete: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    overwrite: bool = False,
    cka: bool = True,
    backend: str = "auto",
    holdout: float | None = None,
    holdout_seed: int = 0,
) -> tuple[BlockStats, bool]:
    """Compute (or reuse) the statistics saved as ``stats/<name>``. Returns (stats, reused).

    ``tokens`` defaults to what the store holds (``all``, or ``cls`` for a class-token store).
    ``holdout`` keeps the joint moments of that fraction of the samples apart (see
    :func:`compute_block_stats`).
    """
    selection = selection or SampleSelection()
    store = Store.coerce(store)
    if holdout is not None and not cka:
        raise UsageError(
            "--holdout keeps the joint moments of the held-out rows, and --no-cka computes no "
            "moments; drop one of them"
        )
    tokens = tokens or store.description["tokens"]
    name = name or default_name(tokens, selection, cka, holdout, holdout_seed)
    saved = store.read_analysis(STATS, name)
    wanted = stats_attrs(store, tokens, selection, allow_incomplete, cka, holdout, holdout_seed)
    if saved is not None and not overwrite:
        stats = BlockStats.from_dataset(saved)
        if {k: stats.attrs.get(k) for k in wanted} == normalize(wanted):
            return stats, True
        raise UsageError(
            f"statistics {name!r} already exist in {str(store)!r} with other options; "
            "pass --overwrite to replace them, or another --name"
        )
    stats = compute_block_stats(
        store,
        tokens=tokens,
        selection=selection,
        allow_incomplete=allow_incomplete,
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        cka=cka,
        backend=backend,
        holdout=holdout,
        holdout_seed=holdout_seed,
    )
    stats.attrs["name"] = name
    store.write_analysis(STATS, name, stats.to_dataset())
    return stats, False
