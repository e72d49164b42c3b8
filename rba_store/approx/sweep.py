"""The sweep: remove 1, 2, 3 … blocks in the order of the statistics, each time with fitted linear
maps and with the identity; and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rba_store.approx.evaluate import Variant, fit_variant, identity_variant
from rba_store.errors import UsageError
from rba_store.store import FITS, STATS, Store
from rba_store.store.layout import points_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Span = tuple[int, int]


def sweep_spans(
    store: Store | str | Path, max_blocks: int | None = None, stats_name: str | None = None
) -> list[tuple[int, list[Span]]]:
    """Remove 1, 2, 3 … blocks in the order of the statistics (least relative change first):
    the saved ``stats/<stats_name>``, or the default statistics (computed when missing).

    Removed blocks that are consecutive form one span, replaced by one map.
    """
    from rba_store.stats import BlockStats, default_stats

    if max_blocks is not None and max_blocks < 1:
        raise UsageError(f"--max-blocks {max_blocks} is invalid; pass a positive number")
    store = Store.coerce(store)
    if stats_name is None:
        stats = default_stats(store)  # saved (any band), or computed with the default band
    else:
        saved = store.read_analysis(STATS, stats_name)
        if saved is None:
            raise UsageError(
                f"{str(store)!r} has no stats/{stats_name}; run 'rba-store stats {store} "
                f"--name {stats_name}' first, or leave --stats out"
            )
        stats = BlockStats.from_dataset(saved)
    # A row of the statistics is one block, or with extract --points the span between two
    # consecutive stored points: rows are removed whole, and counted by their blocks.
    order = [int(b) + 1 for b in np.argsort(stats.relative_change, kind="stable")]
    steps = []
    for k in range(1, stats.n_blocks):
        spans: list[Span] = []
        for a, b in sorted(stats.step_span(row) for row in order[:k]):
            if spans and spans[-1][1] == a:
                spans[-1] = (spans[-1][0], b)
            else:
                spans.append((a, b))
        removed = sum(b - a for a, b in spans)
        if max_blocks is not None and removed > max_blocks:
            break
        steps.append((removed, spans))
    if not steps and max_blocks is not None and stats.n_blocks > 1:
        fewest = min(b - a for a, b in map(stats.step_span, range(1, stats.n_blocks + 1)))
        raise UsageError(
            f"--max-blocks {max_blocks} removes nothing: the store keeps "
            f"{points_text(stats.labels)} (extract --points), and the shortest span "
            f"between them has {fewest} blocks; pass --max-blocks {fewest} or more"
        )
    return steps


def sweep_variants(
    store: Store | str | Path, max_blocks: int | None = None, stats_name: str | None = None
) -> list[tuple[int, Variant, Variant]]:
    """For each number of removed blocks: the variant with fitted maps and the identity one.

    Every map is fitted on the original network's activations (default options, saved as
    ``fits/a-b`` and reused when present), all missing spans in one pass over the store.
    """
    from rba_store.solve import FitOptions, fit_spans

    store = Store.coerce(store)
    steps = sweep_spans(store, max_blocks, stats_name)
    needed = sorted({span for _, spans in steps for span in spans})
    missing = [(a, b) for a, b in needed if not store.has_analysis(FITS, f"{a}-{b}")]
    if missing:
        fit_spans(store, FitOptions(spans=tuple(missing)))
    out = []
    for k, spans in steps:
        linear = fit_variant(store, [f"{a}-{b}" for a, b in spans])
        linear.name = f"linear -{k}"
        identity = identity_variant(spans)
        identity.name = f"identity -{k}"
        out.append((k, linear, identity))
    return out


def write_sweep_plot(
    report: dict[str, Any], path: str | Path, title: str = "", fig: Figure | None = None
) -> Path:
    """Accuracy and parameters against the number of removed blocks, linear vs identity.

    Three panels: every accuracy on an axis that holds them all (nothing clipped, no labels to
    collide); the same near the original, where "original" (solid) and "original - 1 pt"
    (dashed, the band between them shaded) stay apart; and the parameters. Linear maps are
    filled circles drawn on top of larger hollow identity squares, so equal values show both.
    ``fig``: an empty Figure to draw into (to inspect it afterwards); a new one by default.
    """
    from matplotlib.figure import Figure

    rows = {v["name"]: v for v in report["variants"]}
    original = rows["original"]
    ks = sorted(int(n.split("-")[-1]) for n in rows if n.startswith("linear -"))
    top = 100 * original["accuracy"]
    series = {
        kind: np.array([100 * rows[f"{kind} -{k}"]["accuracy"] for k in ks])
        for kind in ("linear", "identity")
    }
    values = np.concatenate([*series.values(), [top, top - 1]])
    if fig is None:
        fig = Figure(figsize=(15, 4))
    ax_all, ax_near, ax_par = fig.subplots(1, 3)
    styles = {
        "linear": dict(marker="o", ls="-", ms=6, zorder=4, color="tab:blue"),
        "identity": dict(
            marker="s", ls="--", ms=11, zorder=3, color="tab:orange", mfc="none", mew=1.5
        ),
    }
    labels = {"linear": "fitted linear map T", "identity": "identity (drop blocks)"}
    margin = 0.04 * max(float(values.max() - values.min()), 1.0)
    near_low = top - 4
    for ax, (low, high) in (
        (ax_all, (float(values.min()) - margin, float(values.max()) + margin)),
        (ax_near, (near_low, top + 1)),
    ):
        ax.axhspan(top - 1, top, color="tab:green", alpha=0.12, lw=0, label="within 1 pt")
        ax.axhline(top, color="k", lw=1.2, ls="-", label=f"original ({top:.1f}%)")
        ax.axhline(top - 1, color="tab:green", lw=1.2, ls="--", label="original - 1 pt")
        for kind, accuracy in series.items():
            ax.plot(ks, accuracy, **styles[kind], label=labels[kind])
        ax.set_ylim(low, high)
        ax.set(xlabel="blocks removed", ylabel="test accuracy (%)")
    ax_all.set_title("Accuracy (all)")
    below = int(sum((a < near_low).sum() for a in series.values()))
    ax_near.set_title(
        "Accuracy near the original" + (f" ({below} points below, see left)" if below else ""),
        fontsize=10,
    )
    ax_all.legend(fontsize=8)
    for kind, marker in (("linear", "o-"), ("identity", "s--")):
        style = {k: v for k, v in styles[kind].items() if k not in ("marker", "ls")}
        ax_par.plot(
            [0, *ks],
            [original["params"] / 1e6] + [rows[f"{kind} -{k}"]["params"] / 1e6 for k in ks],
            marker,
            **style,
            label="with linear maps" if kind == "linear" else "identity",
        )
    ax_par.set(xlabel="blocks removed", ylabel="parameters (M)", title="Parameters")
    ax_par.legend()
    for ax in (ax_all, ax_near, ax_par):
        ax.grid(alpha=0.3)
        ax.set_xticks([0, *ks])
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
