"""Evaluate the original model and approximated variants on the test split of a store's data.

The classifier is the model's own head when the model was trained for this data (the embedded
default), otherwise a linear probe (ridge regression on one-hot labels, with the project's own
solver) fitted on the stored ``features`` of the fit split and applied to every variant's features.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rba_store.approx.language_eval import (
    build_variant,
    evaluate_language_variants,
    format_language_report,
    is_language_store,
)
from rba_store.approx.network import SplitNetwork
from rba_store.approx.rebuild import rebuild_model, test_source
from rba_store.approx.surgery import (
    TIME_BUDGET_S,
    LinearReplacement,
    SpanMap,
    Throughput,
    WorkProgress,
    WorkTracker,
    block_cost,
    count_flops,
    count_parameters,
    expected_timing_seconds,
    measure_throughput,
    replace_spans,
    timing_batch,
    timing_note,
)
from rba_store.errors import UsageError
from rba_store.extract.data import DataSource, make_preprocess
from rba_store.solve import NormalEquations, load_fit, solve
from rba_store.store import FEATURES, LABEL, Store

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


def fit_variant(store: Store | str | Path, names: list[str]) -> Variant:
    """A variant made of saved fits."""
    store = Store.coerce(store)
    maps = []
    for name in names:
        ds = load_fit(store, name)
        a, b = ds.attrs["span"]
        folded = bool(ds.attrs.get("folded", False))
        maps.append(SpanMap((int(a), int(b)), ds["T"].values, ds["bias"].values, folded))
    return Variant("+".join(names), maps)


def identity_variant(spans: list[Span]) -> Variant:
    label = "+".join(f"{a}:{b}" for a, b in sorted(spans))
    return Variant(f"identity {label}", [SpanMap(s) for s in spans])


@dataclass
class Classifier:
    kind: str  # "head" or "probe"
    weight: np.ndarray | None = None  # (features, classes)
    bias: np.ndarray | None = None

    def predict_from(self, net: SplitNetwork, h_last: torch.Tensor) -> np.ndarray:
        """Predictions from the last point ``h_L`` of a (possibly approximated) network."""
        if self.kind == "head":
            return net.features(h_last, pre_logits=False).argmax(1).cpu().numpy()
        features = net.features(h_last, pre_logits=True).cpu().numpy()
        return np.argmax(features @ self.weight + self.bias, axis=1)

    def predict(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            if self.kind == "head":
                return model(x).argmax(1).cpu().numpy()
            features = model.forward_head(model.forward_features(x), pre_logits=True)
        return np.argmax(features.cpu().numpy() @ self.weight + self.bias, axis=1)

    def describe(self) -> str:
        if self.kind == "head":
            return "model head"
        return f"linear probe (ridge {PROBE_RIDGE} on stored features, one-hot labels)"

    def as_head(self) -> nn.Linear:
        """The probe as a ``nn.Linear`` that can replace the model's head."""
        assert self.weight is not None and self.bias is not None
        head = nn.Linear(*self.weight.shape)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(self.weight.T, dtype=torch.float32))
            head.bias.copy_(torch.as_tensor(self.bias, dtype=torch.float32))
        return head


CLASSIFIERS = ("auto", "head", "probe")


def choose_classifier(store: Store, kind: str = "auto") -> Classifier:
    """The model's head (``auto``: when the model was trained for the store's data, i.e. the
    embedded default) or a linear probe fitted on the stored features."""
    if kind not in CLASSIFIERS:
        raise UsageError(f"--classifier {kind!r} is not valid; use auto, head or probe")
    if kind == "auto":
        kind = "head" if store.description["model"]["weights"]["source"] == "embedded" else "probe"
    if kind == "head" and not store.description["model"].get("num_classes"):
        raise UsageError(
            f"--classifier head: the model of {str(store)!r} has no classifier head; use probe"
        )
    return Classifier("head") if kind == "head" else fit_probe(store)


def fit_probe(store: Store) -> Classifier:
    """Ridge regression from the stored features to one-hot labels (labelled samples only)."""
    labels = store.array(LABEL)[:]
    features = store.array(FEATURES)[:].astype(np.float64)
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


@dataclass(frozen=True)
class LaterVariants:
    """Variants made by ``make()`` once the model is loaded and its speed measured (e.g. the
    sweep's, whose maps may still need fitting), so that progress has an ETA first; each
    removes ``removed[i]`` blocks."""

    removed: list[int]
    make: Callable[[], list[Variant]]


def evaluate_variants(
    store: Store | str | Path,
    variants: list[Variant],
    *,
    later: LaterVariants | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 256,
    source: DataSource | None = None,
    classifier: str = "auto",
    device: str = "cpu",
    limit: int | None = None,
    progress: WorkProgress | None = None,
    time_budget: float = TIME_BUDGET_S,
) -> dict[str, Any]:
    """Accuracy, agreement with the original, parameters, FLOPs and images/s of each variant
    on the first ``limit`` (default: all) images of the test split.

    images/s is timed after the evaluation, within ``time_budget`` seconds per variant
    (:func:`rba_store.approx.surgery.measure_throughput`; 0: not timed, None in the report).
    ``progress`` receives the cost-weighted :class:`rba_store.approx.surgery.Work` done, from
    the start: the original is timed on one input as soon as it is loaded, for an ETA before
    the ``later`` variants are made and every model has run."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} is invalid; pass a positive number")
    check_time_budget(time_budget)
    store = Store.coerce(store)
    description = store.description
    if is_language_store(description):  # perplexity and next-token figures on text windows
        _check_device(device)
        return evaluate_language_variants(
            store,
            variants + (later.make() if later else []),
            checkpoint=checkpoint,
            batch_size=batch_size,
            source=source,  # type: ignore[arg-type]
            device=device,
            limit=limit,
            progress=progress,
            time_budget=time_budget,
        )
    _check_device(device)
    tracker = WorkTracker(progress)
    tracker.report("loading the model")
    chosen = choose_classifier(store, classifier)
    loaded = rebuild_model(description["model"], checkpoint, store)
    if chosen.kind == "probe":  # count and time what is evaluated (and what apply writes)
        loaded.module.head = chosen.as_head()
    loaded.module.to(device)
    source = source or test_source(description["data"])
    if limit is not None:
        if not 1 <= limit <= len(source):
            raise UsageError(f"--limit {limit} is out of range; pass 1..{len(source)}")
        source = source.limited(limit)
    preprocess = make_preprocess(loaded.data_config)
    first = source.load(0, min(batch_size, len(source)), preprocess).to(device)
    removed = [sum(b - a for a, b in v.spans) for v in variants] + (later.removed if later else [])
    n_blocks = block_cost(loaded.module) - 1
    tracker.cost_total = sum(n_blocks + 1 - r for r in [0, *removed]) * (len(source) + 1)
    tracker.seconds_left = time_budget * (1 + len(removed))
    took, seconds = _time_one_input(chosen, loaded.module, first[:1])
    tracker.unit_seconds = seconds / (n_blocks + 1)  # until the batches measure it
    tracker.report("the original timed on one image", seconds=took)
    if later is not None:
        tracker.report(f"the maps of {len(later.removed)} more variants")
        variants = variants + later.make()
    models, base = [("original", loaded.module, [])], tracker.seconds_left
    for v in variants:
        built = time.perf_counter()
        models.append((v.name, build_variant(loaded.module, v.maps, replace_spans), v.spans))
        built = time.perf_counter() - built
        tracker.seconds_left = base + built * (len(variants) + 1 - len(models))  # copies to come
        tracker.report(f"building model {len(models)}/{len(variants) + 1}", seconds=built)
    tracker.seconds_left = base
    passes = EvaluationPasses(models, len(source), batch_size, time_budget, progress, tracker)
    passes.tracker.report(f"{len(models)} models on {len(source)} images")
    predictions: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in models}
    first_batch = None
    for start in range(0, len(source), batch_size):
        end = min(start + batch_size, len(source))
        x = first if start == 0 else source.load(start, end, preprocess).to(device)
        first_batch = x if first_batch is None else first_batch
        for name, model, _ in models:
            with passes.timed(name, len(x)):
                predictions[name].append(chosen.predict(model, x))
    assert first_batch is not None
    labels = source.labels
    original = np.concatenate(predictions["original"])
    input_size = tuple(first_batch.shape[1:])
    timing_x = first_batch[: passes.timing_batch()]
    results = []
    for name, model, spans in models:
        predicted = np.concatenate(predictions[name])
        known = labels >= 0
        flops = count_flops(model, input_size)
        throughput = measure_throughput(model, timing_x, time_budget)
        passes.timed_model(name, throughput)
        results.append(
            {
                "name": name,
                "spans": spans,
                "blocks": len(model.blocks) - sum(1 for m in model.blocks if not _is_block(m)),
                "accuracy": float((predicted[known] == labels[known]).mean())
                if known.any()
                else None,
                "params": count_parameters(model),
                "flops": flops,
                "images_per_s": throughput.images_per_s,
                "agreement": float((predicted == original).mean()),
            }
        )
    return {
        "classifier": chosen.describe(),
        "test_samples": len(source),
        "device": device,
        "timing": passes.timing(len(timing_x), timing_note(time_budget, len(timing_x))),
        "variants": results,
    }


def check_time_budget(time_budget: float) -> None:
    if not time_budget >= 0:
        raise UsageError(
            f"--time-budget {time_budget} is invalid; pass seconds of timing per variant "
            "(0: no timing)"
        )


def _time_one_input(
    classifier: Classifier, model: nn.Module, x: torch.Tensor
) -> tuple[float, float]:
    """Seconds of a warm-up pass and a second pass of ``model`` on one input, and of the
    second."""
    start = time.perf_counter()
    classifier.predict(model, x)
    warm = time.perf_counter()
    classifier.predict(model, x)
    end = time.perf_counter()
    return end - start, end - warm


class EvaluationPasses:
    """Cost-weighted progress of an evaluation: every model on every batch (units: blocks run
    on one input), then each model's FLOP count (one input) and timing (a fixed budget).
    ``tracker``: one that counted the work before (else a new one)."""

    def __init__(
        self,
        models: list[tuple[str, nn.Module, Any]],
        n_inputs: int,
        batch_size: int,
        time_budget: float,
        progress: WorkProgress | None,
        tracker: WorkTracker | None = None,
    ) -> None:
        self.costs = {name: block_cost(model) for name, model, _ in models}
        self.n_inputs, self.budget = n_inputs, time_budget
        self.n_batches = -(-n_inputs // batch_size)
        self.seconds: dict[str, float] = dict.fromkeys(self.costs, 0.0)
        self.inputs: dict[str, int] = dict.fromkeys(self.costs, 0)
        self.batches: dict[str, int] = dict.fromkeys(self.costs, 0)
        self.untimed = list(self.costs)
        self.timing_s = 0.0
        cost = sum(self.costs.values()) * (n_inputs + 1)
        self.tracker = tracker or WorkTracker(progress)
        self.tracker.cost_total = self.tracker.cost_done + cost
        self.tracker.seconds_left = time_budget * len(self.costs)

    @contextlib.contextmanager
    def timed(self, name: str, n: int) -> Iterator[None]:
        """One model on one batch of ``n`` inputs."""
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start
        self.inputs[name] += n
        self.batches[name] += 1
        self._expect_timing()
        names = list(self.costs)
        what = f"model {names.index(name) + 1}/{len(names)}"
        if self.n_batches > 1:
            what += f", batch {self.batches[name]}/{self.n_batches}"
        self.tracker.report(what, cost=self.costs[name] * n)

    def seconds_per_input(self, name: str) -> float | None:
        return self.seconds[name] / self.inputs[name] if self.inputs[name] else None

    def timing_batch(self) -> int:
        """One batch size for every model, sized from the original (the slowest)."""
        per_input = self.seconds_per_input("original")
        return timing_batch(self.budget, per_input or 1.0, self.n_inputs)

    def _expect_timing(self) -> None:
        batch = self.timing_batch()
        self.tracker.seconds_left = sum(
            expected_timing_seconds(self.budget, batch, self.seconds_per_input(n))
            for n in self.untimed
        )

    def timing(self, batch: int, how: str) -> dict[str, Any]:
        """How the throughput was timed, and the seconds it took (all variants)."""
        return {"how": how, "budget_s": self.budget, "batch": batch, "seconds": self.timing_s}

    def timed_model(self, name: str, throughput: Throughput) -> None:
        """A model's FLOPs counted and its throughput measured."""
        self.timing_s += throughput.seconds
        self.untimed.remove(name)
        self._expect_timing()
        done = len(self.costs) - len(self.untimed)
        self.tracker.report(
            f"timing model {done}/{len(self.costs)}",
            cost=self.costs[name],
            seconds=throughput.seconds,
        )


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r} asked for, but no CUDA GPU is visible; use cpu")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a torch device; use cpu or cuda") from e


def _is_block(module: nn.Module) -> bool:
    return not isinstance(module, LinearReplacement | nn.Identity)


def format_report(report: dict[str, Any]) -> str:
    if report.get("task") == "language":
        return format_language_report(report)
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
            f"{v['params']:>10,} {v['flops'] / 1e6:>9.2f} {format_rate(v['images_per_s']):>9}"
        )
    if report.get("timing"):
        lines.append(f"img/s: {report['timing']['how']}")
    return "\n".join(lines)


def format_rate(rate: float | None) -> str:
    """A throughput for a table: ``-`` when not timed."""
    return "-" if rate is None else f"{rate:,.0f}" if rate >= 10 else f"{rate:.3g}"
