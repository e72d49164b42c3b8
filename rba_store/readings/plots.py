"""PNG figures of the readings: the modularity curve, and probe accuracy against the fraction of
channels kept. ``*_figure`` build matplotlib figures (no pyplot state); ``write_*`` save them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rba_store.readings.modularity import ModularityCurve
from rba_store.readings.probe import KINDS, ProbeResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARK_COLOURS = {"plateau": "tab:orange", "drop": "tab:red"}
KIND_TITLES = {
    "random": "random channels",
    "pca_top": "top principal components",
    "pca_bottom": "bottom principal components",
    "projection": "Gaussian random projection",
}


def modularity_figure(curve: ModularityCurve, title: str = "") -> Figure:
    """Q at every point; steps that plateau or drop drawn in colour and labelled."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    points = np.asarray(curve.points)
    ax.plot(points, curve.modularity, "o-", color="tab:blue", label="Q (class partition)")
    for mark in curve.marks():
        kind = mark["kind"]
        if kind not in MARK_COLOURS:
            continue
        a, b = mark["span"]
        qa, qb = (curve.modularity[curve.points.index(p)] for p in (a, b))
        ax.plot([a, b], [qa, qb], "-", lw=4, alpha=0.6, color=MARK_COLOURS[kind])
        ax.annotate(
            f"{a}:{b}",
            ((a + b) / 2, (qa + qb) / 2),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color=MARK_COLOURS[kind],
        )
    for kind, colour in MARK_COLOURS.items():
        ax.plot([], [], "-", lw=4, alpha=0.6, color=colour, label=kind)
    ax.set(
        xlabel="capture point k (h_k: after k blocks)",
        ylabel="modularity Q",
        title=title
        or f"Modularity of the classes, {curve.k}-NN graph, tokens={curve.attrs['tokens']}",
        xticks=points,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def probe_figure(result: ProbeResult, title: str = "") -> Figure:
    """Accuracy against the fraction of channels (log x), one line per point, one panel per
    kind of subset; the dashed line of each colour is that point's full-layer accuracy."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2, sharex=True, sharey=True).ravel()
    colours = colormaps["viridis"](np.linspace(0, 0.95, len(result.points)))
    fractions = np.asarray(result.fractions)
    for k, (ax, kind) in enumerate(zip(axes, KINDS, strict=True)):
        for p, point in enumerate(result.points):
            mean = 100 * result.accuracy[p, k].mean(axis=1)
            ax.plot(fractions, mean, "o-", ms=3, color=colours[p], label=f"h{point}")
        ax.set(xscale="log", title=KIND_TITLES[kind])
        ax.grid(alpha=0.3, which="both")
    for ax in axes[2:]:
        ax.set_xlabel("fraction of channels (log scale)")
    for ax in axes[::2]:
        ax.set_ylabel("accuracy (%)")
    axes[0].legend(ncol=2, fontsize=7, loc="lower right")
    fig.suptitle(
        title
        or f"Linear probes on parts of each layer (tokens={result.attrs['tokens']}, "
        f"mean of {result.seeds} seeds)"
    )
    fig.tight_layout()
    return fig


def write_modularity_plot(curve: ModularityCurve, folder: Path, title: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "modularity.png"
    modularity_figure(curve, title).savefig(path, dpi=110)
    return path


def write_probe_plot(result: ProbeResult, folder: Path, title: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe.png"
    probe_figure(result, title).savefig(path, dpi=110)
    return path
