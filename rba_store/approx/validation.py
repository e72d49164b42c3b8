"""The validation split that ``select`` scores candidates on, for images and for text.

Both hold the split in batches and the original network's outputs on it, and score a network by
its last point ``h_L`` batch by batch: top-1 accuracy, agreement with the original's
predictions and, for language, perplexity (of the next-token predictions, float64 sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rba_store.approx.evaluate import Classifier, choose_classifier
from rba_store.approx.network import SplitNetwork
from rba_store.approx.rebuild import held_out_source
from rba_store.errors import DataSourceError
from rba_store.extract.data import DataSource, make_preprocess
from rba_store.extract.models import LoadedModel
from rba_store.store import Store


@dataclass(frozen=True)
class Score:
    accuracy: float
    agreement: float
    perplexity: float | None = None  # language models only


class ImageValidation:
    """Labelled images; predictions by the model's head or the linear probe."""

    def __init__(
        self, source: DataSource, preprocess: Any, batch_size: int, classifier: Classifier
    ) -> None:
        self.labels = np.asarray(source.labels)
        self.known = self.labels >= 0
        if not self.known.any():
            raise DataSourceError("the validation split has no labels; selection needs them")
        self.batches = [
            source.load(start, min(start + batch_size, len(source)), preprocess)
            for start in range(0, len(source), batch_size)
        ]
        self.classifier = classifier
        self.original: np.ndarray | None = None

    def predict(self, net: Any, h_last: torch.Tensor, batch: int) -> np.ndarray:
        return self.classifier.predict_from(net, h_last)

    def score(self, outputs: list[Any]) -> Score:
        predicted = np.concatenate(outputs)
        accuracy = float((predicted[self.known] == self.labels[self.known]).mean())
        agreement = 1.0 if self.original is None else float((predicted == self.original).mean())
        return Score(accuracy, agreement)

    def keep_original(self, outputs: list[Any]) -> Score:
        self.original = np.concatenate(outputs)
        return self.score(outputs)


class TextValidation:
    """Windows of token ids; each position but the last predicts the next token."""

    def __init__(self, source: DataSource, batch_size: int) -> None:
        self.batches = [
            source.load(start, min(start + batch_size, len(source)), None)
            for start in range(0, len(source), batch_size)
        ]
        self.original: np.ndarray | None = None

    def predict(self, net: Any, h_last: torch.Tensor, batch: int) -> tuple[np.ndarray, float]:
        """Next-token predictions (flat) and their summed negative log-likelihood."""
        logits = net.logits(h_last)[:, :-1].float()
        targets = self.batches[batch][:, 1:]
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = -float(log_probs.gather(-1, targets[..., None]).double().sum())
        return logits.argmax(-1).flatten().numpy(), nll

    def score(self, outputs: list[Any]) -> Score:
        predicted = np.concatenate([p for p, _ in outputs])
        targets = np.concatenate([b[:, 1:].flatten().numpy() for b in self.batches])
        nll = sum(n for _, n in outputs)
        agreement = 1.0 if self.original is None else float((predicted == self.original).mean())
        return Score(
            float((predicted == targets).mean()), agreement, float(np.exp(nll / len(targets)))
        )

    def keep_original(self, outputs: list[Any]) -> Score:
        self.original = np.concatenate([p for p, _ in outputs])
        return self.score(outputs)


def validation_for(
    store: Store, loaded: LoadedModel, classifier: str, batch_size: int
) -> tuple[Any, Any]:
    """The validation split and the network to score on it, for the store's kind of model."""
    description = store.description
    if loaded.family == "language":
        from rba_store.approx.decoder import DecoderNetwork
        from rba_store.approx.language_eval import text_split

        source = text_split(description["data"], loaded.tokenizer, "val")
        return TextValidation(source, batch_size), DecoderNetwork(loaded.module)
    head = choose_classifier(store, classifier)
    source = held_out_source(description["data"], "val")
    preprocess = make_preprocess(loaded.data_config)
    return ImageValidation(source, preprocess, batch_size, head), SplitNetwork(loaded.module)
