"""Language models: rebuilding the store's decoder and text, and evaluating variants on the test
windows: perplexity, next-token top-1 accuracy, agreement with the original's next-token
predictions, parameters, FLOPs per token and tokens/s.

Every position of a window but the last predicts the next token, so a window of T tokens gives
T - 1 predictions; perplexity is exp of the mean negative log-likelihood over all of them
(accumulated in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rba_store.approx.decoder import replace_decoder_spans
from rba_store.approx.surgery import (
    TIME_BUDGET_S,
    WorkProgress,
    count_flops,
    count_parameters,
    measure_throughput,
    timing_note,
)
from rba_store.errors import ModelError, NotFoundError, UsageError
from rba_store.extract.language_model import FAMILY_LANGUAGE, build_language_model
from rba_store.extract.models import LoadedModel
from rba_store.extract.text import TextSource


def is_language_store(description: dict[str, Any]) -> bool:
    return description["model"].get("family") == FAMILY_LANGUAGE


def rebuild_language_model(model: dict[str, Any], checkpoint: str | Path | None) -> LoadedModel:
    """The store's decoder from its folder (or ``checkpoint``, a folder it moved to), checked by
    the sha256 of its weight files."""
    weights = model["weights"]
    path = Path(checkpoint) if checkpoint else Path(weights["path"])
    if weights["source"] == "embedded" and not checkpoint and not (path / "config.json").is_file():
        from rba_store.extract.default_lm import ensure_default_lm

        path = ensure_default_lm()  # another install of the package: its shipped folder
    if not (path / "config.json").is_file():
        error = NotFoundError if checkpoint else ModelError
        raise error(
            f"the model folder {str(path)!r} of {model['name']!r} (weights sha256 "
            f"{weights['sha256'][:12]}…) is missing; pass --checkpoint DIR to point at it"
        )
    loaded = build_language_model(path)
    if loaded.weights["sha256"] != weights["sha256"]:
        raise ModelError(
            f"the weights in {str(path)!r} have sha256 {loaded.weights['sha256'][:12]}…, not "
            f"{weights['sha256'][:12]}… as when the store was extracted; pass --checkpoint with "
            "the original folder"
        )
    return loaded


def text_split(data: dict[str, Any], tokenizer: Any, split: str) -> TextSource:
    """Another split of the store's text (never the extracted one)."""
    if split == data.get("split"):
        raise UsageError(
            f"the store was extracted from the {split} split; evaluate and select use the val "
            "and test splits: extract the train split"
        )
    from rba_store.extract.default_lm import SHIPPED_CORPUS

    path = Path(data["path"])
    if not path.exists() and path.name == SHIPPED_CORPUS.name:  # the embedded corpus, moved
        path = SHIPPED_CORPUS
    return TextSource(path, tokenizer, int(data["seq_len"]), split)


class NextTokenScores:
    """Running sums over batches: negative log-likelihood, correct and agreeing predictions."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.correct = self.count = 0
        self.predictions: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
        logits, targets = logits[:, :-1].float(), input_ids[:, 1:]
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, targets[..., None])[..., 0]
        self.nll -= float(picked.double().sum())
        predicted = logits.argmax(-1)
        self.correct += int((predicted == targets).sum())
        self.count += targets.numel()
        self.predictions.append(predicted.flatten().cpu().numpy())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / max(self.count, 1)))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    def predicted(self) -> np.ndarray:
        return np.concatenate(self.predictions)


def build_variant(model: nn.Module, maps: list[Any], replace: Callable[..., nn.Module]) -> Any:
    """The folded model when a map is folded (:func:`rba_store.approx.fold.fold_model`), else
    ``replace(model, maps)`` (maps inserted in place of their spans)."""
    if any(m.folded for m in maps):
        from rba_store.approx.fold import fold_model

        return fold_model(model, maps)
    return replace(model, maps)


def evaluate_language_variants(
    store: Any,
    variants: list[Any],
    *,
    checkpoint: str | Path | None = None,
    batch_size: int = 32,
    source: TextSource | None = None,
    device: str = "cpu",
    limit: int | None = None,
    progress: WorkProgress | None = None,
    time_budget: float = TIME_BUDGET_S,
) -> dict[str, Any]:
    """The language counterpart of :func:`rba_store.approx.evaluate.evaluate_variants`
    (tokens/s timed within ``time_budget`` seconds per variant)."""
    from rba_store.approx.evaluate import EvaluationPasses

    description = store.description
    loaded = rebuild_language_model(description["model"], checkpoint)
    loaded.module.to(device)
    source = source or text_split(description["data"], loaded.tokenizer, "test")
    if limit is not None:
        if not 1 <= limit <= len(source):
            raise UsageError(f"--limit {limit} is out of range; pass 1..{len(source)} windows")
        source = source.limited(limit)  # type: ignore[assignment]
    models: list[tuple[str, nn.Module, list]] = [("original", loaded.module, [])] + [
        (v.name, build_variant(loaded.module, v.maps, replace_decoder_spans), v.spans)
        for v in variants
    ]
    scores = {name: NextTokenScores() for name, _, _ in models}
    passes = EvaluationPasses(models, len(source), batch_size, time_budget, progress)
    passes.tracker.report(f"{len(models)} models on {len(source)} windows")  # the rate's start
    first = None
    for start in range(0, len(source), batch_size):
        x = source.load(start, min(start + batch_size, len(source)), None).to(device)
        first = x if first is None else first
        for name, model, _ in models:
            with passes.timed(name, len(x)), torch.inference_mode():
                scores[name].add(model(input_ids=x, use_cache=False).logits, x)
    assert first is not None
    original = scores["original"].predicted()
    seq_len = first.shape[1]
    timing_x = first[: passes.timing_batch()]
    results = []
    for name, model, spans in models:
        score = scores[name]
        flops = count_flops(model, example=first[:1]) / seq_len
        throughput = measure_throughput(_Logits(model), timing_x, time_budget)
        passes.timed_model(name, throughput)
        windows_per_s = throughput.images_per_s
        results.append(
            {
                "name": name,
                "spans": spans,
                "blocks": int(model.config.num_hidden_layers),
                "perplexity": score.perplexity,
                "accuracy": score.accuracy,
                "agreement": float((score.predicted() == original).mean()),
                "params": count_parameters(model),
                "flops": flops,
                "tokens_per_s": None if windows_per_s is None else windows_per_s * seq_len,
            }
        )
    return {
        "task": "language",
        "test_windows": len(source),
        "seq_len": seq_len,
        "test_tokens": scores["original"].count,
        "device": device,
        "timing": passes.timing(len(timing_x), timing_note(time_budget, len(timing_x), "windows")),
        "variants": results,
    }


class _Logits(nn.Module):
    """A causal LM called on token ids without a cache (for timing)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def format_language_report(report: dict[str, Any]) -> str:
    lines = [
        f"next-token prediction on {report['test_windows']} test windows of {report['seq_len']} "
        f"tokens ({report['test_tokens']:,} predictions)",
        f"{'variant':<22} {'spans':<16} {'layers':>6} {'ppl':>9} {'accuracy':>9} {'agree':>7} "
        f"{'params':>11} {'MFLOP/tok':>9} {'tok/s':>9}",
    ]
    for v in report["variants"]:
        spans = ",".join(f"{a}:{b}" for a, b in v["spans"]) or "-"
        lines.append(
            f"{v['name']:<22} {spans:<16} {v['blocks']:>6} {v['perplexity']:>9.3f} "
            f"{100 * v['accuracy']:>8.2f}% {100 * v['agreement']:>6.1f}% {v['params']:>11,} "
            f"{v['flops'] / 1e6:>9.3f} {_rate(v['tokens_per_s']):>9}"
        )
    if report.get("timing"):
        lines.append(f"tok/s: {report['timing']['how']}")
    return "\n".join(lines)


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}" if rate >= 10 else f"{rate:.3g}"
