"""Block statistics (BR, relative change, cosine, norms, exact linear CKA) computed lazily with
Dask from a store, saved under ``stats/<name>`` in it and reused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rba_store.errors import UsageError
from rba_store.stats.reduce import (
    StatsPlan,
    compute_block_stats,
    layout_steps,
    plan_stats,
    stats_attrs,
)
from rba_store.stats.result import BlockStats
from rba_store.store import STATS, SampleSelection, Store, analyses, normalize
from rba_store.store.selection import check_tokens, split_holdout, usable_samples

__all__ = [
    "BlockStats",
    "SampleSelection",
    "StatsPlan",
    "compute_block_stats",
    "default_name",
    "default_stats",
    "prepare_stats",
    "run_stats",
]


def default_name(
    tokens: str,
    selection: SampleSelection,
    cka: bool = True,
    holdout: float | None = None,
    holdout_seed: int = 0,
) -> str:
    """A name that says what was computed: ``tokens-all``, ``tokens-cls-limit100``,
    ``tokens-all-holdout0.2-seed0`` ..."""
    name = f"tokens-{tokens.replace(':', '')}"  # random:16 -> tokens-random16
    if selection.sample is not None:
        name += f"-sample{selection.sample}-seed{selection.seed}"
    elif selection.limit is not None:
        name += f"-limit{selection.limit}"
    if holdout is not None:
        name += f"-holdout{holdout:g}-seed{holdout_seed}"
    return name if cka else f"{name}-nocka"


@dataclass(frozen=True)
class PreparedStats:
    """What ``stats`` will do: reuse ``stats/<name>`` (``plan`` None) or compute it."""

    name: str
    tokens: str
    plan: StatsPlan | None


def covers(attrs: dict, max_span: int, cka_pairs: str) -> bool:
    """Whether saved statistics (their attributes) answer ``--max-span``/``--cka-pairs``: their
    joint moments cover spans of ``max_span`` blocks, and the CKA of every pair when asked."""
    if not attrs.get("cka", True):
        return True
    band = attrs.get("moment_band")  # absent (saved before the band) or None: every pair
    stored = attrs.get("stored_points")  # extract --points: the band counts stored points
    needed = max_span if stored is None else layout_steps(tuple(stored), max_span)
    return (band is None or band >= needed) and (
        cka_pairs != "all" or attrs.get("cka_pairs", "all") == "all"
    )


def prepare_stats(
    store: Store,
    *,
    name: str | None = None,
    tokens: str | None = None,
    selection: SampleSelection | None = None,
    allow_incomplete: bool = False,
    overwrite: bool = False,
    cka: bool = True,
    holdout: float | None = None,
    holdout_seed: int = 0,
    max_span: int = 4,
    cka_pairs: str = "auto",
) -> PreparedStats:
    """Check the options, find reusable saved statistics, or plan the pass (and refuse, in one
    line, one that does not fit in memory): nothing is read but attributes, nothing written."""
    selection = selection or SampleSelection()
    if holdout is not None and not cka:
        raise UsageError(
            "--holdout keeps the joint moments of the held-out rows, and --no-cka computes no "
            "moments; drop one of them"
        )
    tokens = tokens or store.description["tokens"]
    name = name or default_name(tokens, selection, cka, holdout, holdout_seed)
    wanted = stats_attrs(store, tokens, selection, allow_incomplete, cka, holdout, holdout_seed)
    if store.has_analysis(STATS, name) and not overwrite:
        attrs = store.analysis_attrs(STATS, name)
        same = {k: attrs.get(k) for k in wanted} == normalize(wanted)
        if same and covers(attrs, max_span, cka_pairs):
            return PreparedStats(name, tokens, None)
        other = (
            "other options"
            if not same
            else f"joint moments of spans up to {attrs.get('moment_band')} blocks only"
        )
        raise UsageError(
            f"statistics {name!r} already exist in {str(store)!r} with {other}; "
            "pass --overwrite to replace them, or another --name"
        )
    check_tokens(store, tokens)
    indices = selection.indices(usable_samples(store, allow_incomplete), store)
    held = split_holdout(indices, holdout, holdout_seed)[1] if cka else indices[:0]
    plan = plan_stats(
        store,
        indices,
        tokens,
        cka=cka,
        holdout=len(held) > 0,
        max_span=max_span,
        cka_pairs=cka_pairs,
    )
    return PreparedStats(name, tokens, plan)


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
    max_span: int = 4,
    cka_pairs: str = "auto",
    prepared: PreparedStats | None = None,
) -> tuple[BlockStats, bool]:
    """Compute (or reuse) the statistics saved as ``stats/<name>``. Returns (stats, reused).

    ``tokens`` defaults to what the store holds (``all``, or ``cls`` for a class-token store).
    ``holdout`` keeps the joint moments of that fraction of the samples apart (see
    :func:`compute_block_stats`). ``max_span``/``cka_pairs``: which joint moments are kept
    (:func:`rba_store.stats.reduce.plan_stats`); saved statistics that keep more are reused.
    ``prepared``: what :func:`prepare_stats` returned for these options (not done again).
    """
    selection = selection or SampleSelection()
    store = Store.coerce(store)
    prepared = prepared or prepare_stats(
        store,
        name=name,
        tokens=tokens,
        selection=selection,
        allow_incomplete=allow_incomplete,
        overwrite=overwrite,
        cka=cka,
        holdout=holdout,
        holdout_seed=holdout_seed,
        max_span=max_span,
        cka_pairs=cka_pairs,
    )
    if prepared.plan is None:
        saved = store.read_analysis(STATS, prepared.name)
        assert saved is not None
        return BlockStats.from_dataset(saved), True
    stats = compute_block_stats(
        store,
        tokens=prepared.tokens,
        selection=selection,
        allow_incomplete=allow_incomplete,
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        cka=cka,
        backend=backend,
        holdout=holdout,
        holdout_seed=holdout_seed,
        plan=prepared.plan,
    )
    stats.attrs["name"] = prepared.name
    store.write_analysis(STATS, prepared.name, stats.to_dataset())
    return stats, False


def default_stats(store: Store | str | Path, max_span: int = 4) -> BlockStats:
    """The store's default statistics (all samples, the stored tokens): the saved ones whatever
    their band (the ranking of spans needs none of the joint moments), or computed keeping the
    joint moments of spans up to ``max_span`` blocks (what ``select`` and the sweep fit from)."""
    store = Store.coerce(store)
    name = default_name(store.description["tokens"], SampleSelection())
    if store.has_analysis(STATS, name):
        lazy = analyses.open_lazy(store.path, analyses.analysis_path(STATS, name))
        return BlockStats.from_dataset(lazy, moments=False)
    return run_stats(store, max_span=max_span)[0]
