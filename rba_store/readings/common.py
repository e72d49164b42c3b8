"""What the readings share: per-sample representations, labels, capture points, names.

Letters: n = samples of a shard, t = tokens per sample, c = channels of a capture point.

A reading works on one vector per sample and capture point: the class token (``cls``) or the
mean over all tokens (``mean``), in float64. Only labelled samples take part (label >= 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rba_store.errors import DataSourceError, UsageError
from rba_store.store import LABEL, SampleSelection, Store
from rba_store.store.points import parse_points as parse_point_list
from rba_store.store.selection import usable_samples

TOKENS = ("cls", "mean")


def check_reading_tokens(store: Store, tokens: str) -> None:
    """Refuse a per-sample representation the store cannot give."""
    if tokens not in TOKENS:
        raise UsageError(f"--tokens {tokens!r} is not valid; use cls or mean")
    description = store.description
    if tokens == "mean" and description["tokens"] == "cls":
        raise UsageError(
            f"--tokens mean averages every token, but {str(store)!r} holds the class token only "
            "(extracted with --tokens cls); use --tokens cls, or re-extract with --tokens all"
        )
    if tokens == "cls" and not description["model"].get("has_class_token", False):
        raise UsageError(
            f"--tokens cls needs a class token, and the model of {str(store)!r} "
            f"({description['model']['name']}) has none; use --tokens mean"
        )


def represent(chunk_ntc: Any, tokens: str) -> np.ndarray:
    """One float64 vector per sample: the class token (first token) or the mean of all tokens."""
    if tokens == "cls":
        return np.asarray(chunk_ntc[:, 0, :], dtype=np.float64)
    return np.asarray(chunk_ntc, dtype=np.float64).mean(axis=1)


def parse_points(text: str | None, store: Store) -> list[int]:
    """Capture points from ``0,6,12`` (or ``h0,h6``; negatives count from the end); None: every
    stored point. A point that does not exist, or that ``extract --points`` left out, is refused.
    """
    layout = store.layout
    if text is None:
        return list(layout.stored_blocks)
    chosen = parse_point_list(text, layout.n_blocks + 1, repr(str(store)))
    for point in chosen:
        layout.position(point)  # refuses one that is not stored
    return chosen


@dataclass(frozen=True)
class LabelledRows:
    """The selected samples that carry a label, and their labels (classes 0..n_classes-1)."""

    indices: np.ndarray  # sample indices in the store, sorted
    labels: np.ndarray  # (n,) int64
    n_classes: int
    n_unlabelled: int  # selected samples left out for having no label


def labelled_rows(
    store: Store, selection: SampleSelection, allow_incomplete: bool = False, what: str = ""
) -> LabelledRows:
    """The labelled samples among those selected; refuses a store without labels."""
    indices = selection.indices(usable_samples(store, allow_incomplete), store)
    labels = np.asarray(store.array(LABEL)[:], dtype=np.int64)[indices]
    known = labels >= 0
    if not known.any():
        raise DataSourceError(
            f"store {str(store)!r} has no labels (every selected sample's label is -1): {what} "
            "needs the classes of the samples; extract from labelled data (digits, a folder with "
            "one sub-folder per class, or a .npz with y)"
        )
    classes = store.description.get("data", {}).get("classes") or []
    n_classes = max(len(classes), int(labels[known].max()) + 1)
    return LabelledRows(indices[known], labels[known], n_classes, int((~known).sum()))


def selection_suffix(selection: SampleSelection) -> str:
    """``-limit100`` / ``-sample500-seed0`` / nothing: what a default analysis name adds."""
    if selection.sample is not None:
        return f"-sample{selection.sample}-seed{selection.seed}"
    if selection.limit is not None:
        return f"-limit{selection.limit}"
    return ""


def points_suffix(points: list[int], stored: tuple[int, ...]) -> str:
    """``-points0-6-12`` when only some of the ``stored`` points are read; nothing for all."""
    if tuple(points) == stored:
        return ""
    return "-points" + "-".join(str(p) for p in points)


def point_label(point: int) -> str:
    return f"h{point}"
