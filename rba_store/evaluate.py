"""Evaluate the original model and approximated variants on the test split of a store's data.

The classifier is the model's own head when the model was trained for this data (the embedded
default), otherwise a linear probe (ridge regression on one-hot labels, with the project's own
solver) fitted on the stored ``features`` of the fit split and applied to every variant's features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rba_store import schema
from rba_store.approx import (
    LinearReplacement,
    SpanMap,
    count_flops,
    count_parameters,
    images_per_second,
    replace_spans,
)
from rba_store.data import make_preprocess
from rba_store.errors import UsageError
from rba_store.rebuild import rebuild_model, test_source
from rba_store.solve import NormalEquations, load_fit, solve

Span = tuple[int, int]
PROBE_RIDGE = 1e-3


@dataclass
class Variant:
    """The original model (no maps), or one with spans replaced by fits or by the identity."""

    name: str
    maps: list[SpanMap] = field(default_factory=list)

    @property
    def spans(self) -> list[list[int]]:
        return [list(m.span) for m in sorted(self.maps, key=lambda m: m.span)]


def fit_variant(store: str | Path, names: list[str]) -> Variant:
    """A variant made of saved fits."""
    maps = []
    for name in names:
        ds = load_fit(store, name)
        a, b = ds.attrs["span"]
        maps.append(SpanMap((int(a), int(b)), ds["T"].values, ds["bias"].values))
    return Variant("+".join(names), maps)


def identity_variant(spans: list[Span]) -> Variant:
    label = "+".join(f"{a}:{b}" for a, b in sorted(spans))
    return Variant(f"identity {label}", [SpanMap(s) for s in spans])


@dataclass
class Classifier:
    kind: str  # "head" or "probe"
    weight: np.ndarray | None = None  # (features, classes)
    bias: np.ndarray | None = None

    def predict(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            if self.kind == "head":
                return model(x).argmax(1).numpy()
            features = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
        return np.argmax(features @ self.weight + self.bias, axis=1)


def fit_probe(store: str | Path) -> Classifier:
    """Ridge regression from the stored features to one-hot labels (labelled samples only)."""
    group = schema.open_store(store)
    labels = group[schema.LABEL][:]
    features = group[schema.FEATURES][:].astype(np.float64)
    known = labels >= 0
    if known.sum() < 2:
        raise UsageError(
            f"store {str(store)!r} has no labels to fit a linear probe on; extract labelled data"
        )
    n_classes = int(labels[known].max()) + 1
    onehot = np.eye(n_classes)[labels[known]]
    solution = solve(
        NormalEquations.from_chunk(features[known], onehot), bias=True, ridge=PROBE_RIDGE
    )
    return Classifier("probe", solution.t, solution.bias)


def evaluate_variants(
    store: str | Path,
    variants: list[Variant],
    *,
    checkpoint: str | Path | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Accuracy, agreement with the original, parameters, FLOPs and images/s of each variant."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} is invalid; pass a positive number")
    description = schema.read_description(schema.open_store(store))
    loaded = rebuild_model(description["model"], checkpoint)
    source = test_source(description["data"])
    preprocess = make_preprocess(loaded.data_config)
    own_head = description["model"]["weights"]["source"] == "embedded"
    classifier = Classifier("head") if own_head else fit_probe(store)
    models = [("original", loaded.module, [])] + [
        (v.name, replace_spans(loaded.module, v.maps), v.spans) for v in variants
    ]
    predictions: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in models}
    first_batch = None
    for start in range(0, len(source), batch_size):
        x = source.load(start, min(start + batch_size, len(source)), preprocess)
        first_batch = x if first_batch is None else first_batch
        for name, model, _ in models:
            predictions[name].append(classifier.predict(model, x))
    labels = source.labels
    original = np.concatenate(predictions["original"])
    input_size = tuple(first_batch.shape[1:])
    results = []
    for name, model, spans in models:
        predicted = np.concatenate(predictions[name])
        known = labels >= 0
        results.append(
            {
                "name": name,
                "spans": spans,
                "blocks": len(model.blocks) - sum(1 for m in model.blocks if not _is_block(m)),
                "accuracy": float((predicted[known] == labels[known]).mean())
                if known.any()
                else None,
                "params": count_parameters(model),
                "flops": count_flops(model, input_size),
                "images_per_s": images_per_second(model, first_batch),
                "agreement": float((predicted == original).mean()),
            }
        )
    return {
        "classifier": "model head"
        if classifier.kind == "head"
        else f"linear probe (ridge {PROBE_RIDGE} on stored features, one-hot labels)",
        "test_samples": len(source),
        "variants": results,
    }


def _is_block(module: nn.Module) -> bool:
    return not isinstance(module, LinearReplacement | nn.Identity)


def sweep_spans(store: str | Path, max_blocks: int | None = None) -> list[tuple[int, list[Span]]]:
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
    store: str | Path, max_blocks: int | None = None
) -> list[tuple[int, Variant, Variant]]:
    """For each number of removed blocks: the variant with fitted maps and the identity one.

    Every map is fitted on the original network's activations (default options, saved as
    ``fits/a-b`` and reused when present), all missing spans in one pass over the store.
    """
    from rba_store.solve import FitOptions, fit_spans

    steps = sweep_spans(store, max_blocks)
    needed = sorted({span for _, spans in steps for span in spans})
    missing = [
        (a, b)
        for a, b in needed
        if not schema.has_analysis(store, schema.analysis_path(schema.FITS_GROUP, f"{a}-{b}"))
    ]
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


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"classifier: {report['classifier']}; {report['test_samples']} test samples",
        f"{'variant':<22} {'spans':<22} {'blocks':>6} {'accuracy':>9} {'agree':>7} "
        f"{'params':>10} {'MFLOPs':>9} {'img/s':>9}",
    ]
    for v in report["variants"]:
        spans = ",".join(f"{a}:{b}" for a, b in v["spans"]) or "-"
        acc = "-" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f}%"
        lines.append(
            f"{v['name']:<22} {spans:<22} {v['blocks']:>6} {acc:>9} {100 * v['agreement']:>6.1f}% "
            f"{v['params']:>10,} {v['flops'] / 1e6:>9.2f} {v['images_per_s']:>9,.0f}"
        )
    return "\n".join(lines)
