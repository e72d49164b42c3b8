"""The sweep: remove 1, 2, 3 … blocks in the order of the statistics, each time with fitted linear
maps and with the identity; and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rba_store.approx.evaluate import Variant, fit_variant, identity_variant
from rba_store.errors import UsageError
from rba_store.store import FITS, Store

Span = tuple[int, int]


def sweep_spans(
    store: Store | str | Path, max_blocks: int | None = None
) -> list[tuple[int, list[Span]]]:
    """Remove 1, 2, 3 … blocks in the order of the statistics (least relative change first).

    Removed blocks that are consecutive form one span, replaced by one map.
    """
    from rba_store.stats import run_stats

    if max_blocks is not None and max_blocks < 1:
        raise UsageError(f"--max-blocks {max_blocks} is invalid; pass a positive number")
    stats, _ = run_stats(store)
    order = [int(b) + 1 for b in np.argsort(stats.relative_change, kind="stable")]
    k_max = min(max_blocks or stats.n_blocks - 1, stats.n_blocks - 1)
    steps = []
    for k in range(1, k_max + 1):
        spans: list[Span] = []
        for block in sorted(order[:k]):
            if spans and spans[-1][1] == block - 1:
                spans[-1] = (spans[-1][0], block)
            else:
                spans.append((block - 1, block))
        steps.append((k, spans))
    return steps


def sweep_variants(
    store: Store | str | Path, max_blocks: int | None = None
) -> list[tuple[int, Variant, Variant]]:
    """For each number of removed blocks: the variant with fitted maps and the identity one.

    Every map is fitted on the original network's activations (default options, saved as
    ``fits/a-b`` and reused when present), all missing spans in one pass over the store.
    """
    from rba_store.solve import FitOptions, fit_spans

    store = Store.coerce(store)
    steps = sweep_spans(store, max_blocks)
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


def write_sweep_plot(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Accuracy and parameters against the number of removed blocks, linear vs identity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {v["name"]: v for v in report["variants"]}
    original = rows["original"]
    ks = sorted(int(n.split("-")[-1]) for n in rows if n.startswith("linear -"))
    fig, (ax_acc, ax_par) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("linear", "o-"), ("identity", "s--")):
        ax_acc.plot(
            ks,
            [100 * rows[f"{kind} -{k}"]["accuracy"] for k in ks],
            style,
            label="fitted linear map T" if kind == "linear" else "identity (drop blocks)",
        )
    ax_acc.axhline(100 * original["accuracy"], color="k", lw=1, label="original")
    ax_acc.axhline(
        100 * original["accuracy"] - 1, color="k", lw=0.5, ls=":", label="original - 1 pt"
    )
    ax_acc.set(xlabel="blocks removed", ylabel="test accuracy (%)", title="Accuracy")
    ax_acc.legend()
    ax_par.plot(
        [0, *ks],
        [original["params"] / 1e6] + [rows[f"linear -{k}"]["params"] / 1e6 for k in ks],
        "o-",
        label="with linear maps",
    )
    ax_par.plot(
        [0, *ks],
        [original["params"] / 1e6] + [rows[f"identity -{k}"]["params"] / 1e6 for k in ks],
        "s--",
        label="identity",
    )
    ax_par.set(xlabel="blocks removed", ylabel="parameters (M)", title="Parameters")
    ax_par.legend()
    for ax in (ax_acc, ax_par):
        ax.grid(alpha=0.3)
        ax.set_xticks([0, *ks])
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
