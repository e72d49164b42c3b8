"""PNG figures of block statistics: change per block and the CKA heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rba_store.stats.result import BlockStats


def write_plots(stats: BlockStats, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``block_change.png`` and ``cka.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = np.arange(1, stats.n_blocks + 1)
    tokens = stats.attrs.get("tokens", "all")

    fig, (ax_br, ax_rel) = plt.subplots(1, 2, figsize=(11, 4))
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
    ax_rel.legend()
    for ax in (ax_br, ax_rel):
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (tokens={tokens}, {stats.n_samples} samples)".strip())
    fig.tight_layout()
    change_path = out_dir / "block_change.png"
    fig.savefig(change_path, dpi=120)
    plt.close(fig)

    if np.isnan(stats.cka).all():  # computed with cka=False
        return [change_path]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(stats.cka, vmin=0, vmax=1, cmap="viridis", origin="lower")
    points = np.arange(stats.n_blocks + 1)
    ax.set_xticks(points, [f"h{k}" for k in points], rotation=90)
    ax.set_yticks(points, [f"h{k}" for k in points])
    ax.set(
        xlabel="h_k: residual stream after k blocks",
        ylabel="h_k",
        title=f"Linear CKA between blocks\n{title} (tokens={tokens})".strip(),
    )
    fig.colorbar(image, ax=ax, label="CKA")
    fig.tight_layout()
    cka_path = out_dir / "cka.png"
    fig.savefig(cka_path, dpi=120)
    plt.close(fig)
    return [change_path, cka_path]
