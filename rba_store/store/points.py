"""Capture points chosen on the command line (``--points 0,6,12``, ``h0,h6``, ``-1``)."""

from __future__ import annotations

from rba_store.errors import UsageError


def parse_points(text: str, n_points: int, where: str) -> list[int]:
    """The points ``h_k`` of ``0,6,12`` (or ``h0,h6``; negatives count from the end), sorted.

    ``where`` names what holds the ``n_points`` points in the message refusing one that does
    not exist (timm's block-index semantics).
    """
    chosen: list[int] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        try:
            value = int(word[1:] if word.lower().startswith("h") else word)
        except ValueError:
            raise UsageError(
                f"--points {text!r} is not a list of capture points; pass e.g. 0,6,12 or h0,h6"
            ) from None
        if not -n_points <= value < n_points:
            raise UsageError(
                f"capture point {word} does not exist in {where}: it holds h0..h"
                f"{n_points - 1} ({n_points - 1} blocks); pass 0..{n_points - 1} "
                f"(or -{n_points}..-1 from the end)"
            )
        point = value % n_points
        if point not in chosen:
            chosen.append(point)
    if not chosen:
        raise UsageError("--points is empty; pass e.g. 0,6,12, or leave it out for every point")
    return sorted(chosen)
