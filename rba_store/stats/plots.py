"""PNG figures of block statistics: change per block and the CKA heat map.

``block_change_figure`` and ``cka_figure`` build the figures (testable objects, no pyplot state);
``write_plots`` saves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rba_store.stats.result import BlockStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAN_COLOUR = "lightgrey"


def _log_axis_ticks(ax, values: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Enough labelled ticks on a log axis: 1-2-5 per decade, or every integer multiple when the
    data span less than a decade (matplotlib's default labels only the powers of ten)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = values[np.isfinite(values) & (values > 0)]
    decades = np.log10(positive.max() / positive.min()) if len(positive) else 0.0
    if decades > 4:
        subs: tuple[float, ...] = (1.0,)
    elif decades > 1:
        subs = (1.0, 2.0, 5.0)
    else:
        subs = tuple(float(s) for s in range(1, 10))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def block_change_figure(stats: BlockStats, title: str = "") -> Figure:
    """BR per block (bars) and the scale-free change on a log axis with labelled ticks."""
    from matplotlib.figure import Figure

    blocks = np.asarray(stats.labels[1:])  # extract --points: each span's last block
    tokens = stats.attrs.get("tokens", "all")
    fig = Figure(figsize=(11, 4))
    ax_br, ax_rel = fig.subplots(1, 2)
    ax_br.bar(blocks, stats.br, color="tab:blue")
    ax_br.set(
        xlabel="block b",
        ylabel=r"BR$(b) = -\mathrm{mean}\,\|h_b - h_{b-1}\|^2$",
        title="Block Redundancy (higher = more redundant)",
    )
    ax_rel.plot(blocks, stats.relative_change, "o-", color="tab:red", label="relative change")
    ax_rel.plot(blocks, 1 - stats.cosine, "s--", color="tab:gray", label="1 - cosine")
    ax_rel.set(
        xlabel="block b",
        ylabel=r"$\mathrm{mean}\,\|h_b - h_{b-1}\|^2 / \|h_{b-1}\|^2$",
        title="Scale-free change (lower = more redundant)",
        yscale="log",
    )
    _log_axis_ticks(ax_rel, np.concatenate([stats.relative_change, 1 - stats.cosine]))
    ax_rel.legend()
    for ax in (ax_br, ax_rel):
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
    ax_rel.grid(alpha=0.15, which="minor")
    fig.suptitle(f"{title} (tokens={tokens}, {stats.n_samples} samples)".strip())
    fig.tight_layout()
    return fig


def cka_figure(stats: BlockStats, title: str = "") -> Figure | None:
    """The CKA heat map, its colour scale spanning the data (NaN cells grey); None without CKA."""
    import matplotlib
    from matplotlib.figure import Figure

    cka = np.asarray(stats.cka, dtype=np.float64)
    finite = cka[np.isfinite(cka)]
    if not len(finite):  # computed with cka=False
        return None
    low, high = float(finite.min()), float(finite.max())
    if high - low < 1e-12:  # one value everywhere: a small window around it
        low, high = low - 1e-3, high + 1e-3
    digits = max(2, min(8, int(np.ceil(-np.log10(high - low))) + 2))
    tokens = stats.attrs.get("tokens", "all")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NAN_COLOUR)
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(cka), vmin=low, vmax=high, cmap=cmap, origin="lower")
    points, names = np.arange(stats.n_blocks + 1), [f"h{k}" for k in stats.labels]
    ax.set_xticks(points, names, rotation=90)
    ax.set_yticks(points, names)
    ax.set(
        xlabel="h_k: residual stream after k blocks",
        ylabel="h_k",
        title=f"Linear CKA between blocks\n{title} (tokens={tokens})".strip(),
    )
    label = f"CKA (range {low:.{digits}f} to {high:.{digits}f})"
    n_nan = int(np.isnan(cka).sum())
    if n_nan:
        label += f"; {NAN_COLOUR} = NaN ({n_nan} cells)"
    colorbar = fig.colorbar(image, ax=ax, label=label)
    colorbar.set_ticks(np.linspace(low, high, 5))
    colorbar.ax.set_yticklabels([f"{v:.{digits}f}" for v in np.linspace(low, high, 5)])
    fig.tight_layout()
    return fig


def write_plots(stats: BlockStats, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``block_change.png`` and ``cka.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    change_path = out_dir / "block_change.png"
    block_change_figure(stats, title).savefig(change_path, dpi=120)
    fig = cka_figure(stats, title)
    if fig is None:
        return [change_path]
    cka_path = out_dir / "cka.png"
    fig.savefig(cka_path, dpi=120)
    return [change_path, cka_path]
