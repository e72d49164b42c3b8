"""PNG figures for RESULTS.md, drawn with matplotlib's object API (no pyplot, no global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Series = dict[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)


def line_plot(
    path: Path,
    xlabel: str,
    panels: Sequence[tuple[str, Series]],
    title: str = "",
    logx: bool = False,
    reference: Sequence[float | None] = (),
) -> Path:
    """One panel per ``(ylabel, series)``, side by side; ``reference[i]`` draws a dashed y line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (ax, (ylabel, series)) in enumerate(zip(axes, panels, strict=True)):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", label=label)
        if i < len(reference) and reference[i] is not None:
            ax.axhline(reference[i], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def bar_plot(
    path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, target: float | None
) -> Path:
    """Horizontal bars, one per label, with an optional dashed target line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.45 * len(labels) + 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh(list(labels), list(values), color="tab:blue")
    if target is not None:
        ax.axvline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.legend(fontsize="small")
    ax.invert_yaxis()
    ax.set(xlabel=ylabel)
    ax.grid(alpha=0.3, axis="x")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
