"""A selection on disk (a JSON recipe that ``apply --selection`` takes), its report and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rba_store.approx.select import Selection, to_json
from rba_store.errors import NotFoundError, UsageError
from rba_store.store import Store, normalize_json

SELECTION_VERSION = 1


def write_selection(
    store: Store, selection: Selection, report: dict[str, Any], path: str | Path
) -> Path:
    """Save the chosen spans (with the fits that replace them) and the measured path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format_version": SELECTION_VERSION,
        "kind": "selection",
        "store": str(store.path.resolve()),
        "store_fingerprint": store.fingerprint,
        "spans": [
            {"span": list(m.span), "kind": _kind(m), "fit": name}
            for m, name in zip(selection.maps, selection.fit_names, strict=True)
        ],
        "selection": to_json(selection),
        "test": report,
    }
    path.write_text(json.dumps(normalize_json(body), indent=2))
    return path


def read_selection(path: str | Path, store: Store) -> tuple[list[str], list[str]]:
    """The ``--fit`` names and ``--identity a:b`` spans of a saved selection of ``store``."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(
            f"--selection {str(path)!r} does not exist; pass the file 'rba-store select' wrote"
        )
    try:
        body = json.loads(path.read_text())
        spans = body["spans"]
        fingerprint = body["store_fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--selection {str(path)!r} is not a selection written by 'rba-store select' ({e})"
        ) from e
    if fingerprint != store.fingerprint:
        raise UsageError(
            f"--selection {str(path)!r} was made on another store than {str(store)!r}; pass "
            "the store it was selected on"
        )
    fits = [s["fit"] for s in spans if s["kind"] in ("linear", "folded")]
    identities = [f"{s['span'][0]}:{s['span'][1]}" for s in spans if s["kind"] == "identity"]
    return fits, identities


def write_selection_plot(
    selection: Selection, report: dict[str, Any], path: str | Path, title: str = ""
) -> Path:
    """Validation and test accuracy along the path; the same spans dropped, for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {v["name"]: v for v in report["variants"]}
    removed = [0, *(s.blocks_removed for s in selection.steps)]
    val = [selection.original_val_accuracy, *(s.val_accuracy for s in selection.steps)]
    test = [rows["original"]["accuracy"]] + [
        rows[f"selected -{k}"]["accuracy"] for k in removed[1:]
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(removed, [100 * v for v in val], "o-", label="selected: validation (chooses)")
    ax.plot(removed, [100 * v for v in test], "o--", label="selected: test")
    identity = [
        (k, rows[f"identity -{k}"]["accuracy"]) for k in removed if f"identity -{k}" in rows
    ]
    if identity:
        ax.plot(
            [k for k, _ in identity],
            [100 * a for _, a in identity],
            "x:",
            markersize=9,
            label="same spans dropped (identity): test",
        )
    limit = 100 * selection.original_val_accuracy - selection.options.max_drop
    ax.axhline(limit, color="grey", lw=0.8, ls="-.", label=f"stop: validation < {limit:.2f}%")
    for step in selection.steps:
        a, b = step.span
        ax.annotate(
            f"{a}:{b}",
            (step.blocks_removed, 100 * step.val_accuracy),
            fontsize=8,
            xytext=(3, 5),
            textcoords="offset points",
        )
    ax.set(xlabel="blocks removed", ylabel="accuracy (%)", title=title or "greedy selection")
    ax.set_xticks(removed)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _kind(m: Any) -> str:
    return "identity" if m.t is None else "folded" if m.folded else "linear"
