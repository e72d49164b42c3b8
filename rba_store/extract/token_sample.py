"""``extract --tokens random:K``: the prefix tokens plus K of the other tokens of each sample.

Storing every token of every block costs 13 x 197 x 768 values per ViT-B image; the same bytes
spent on K tokens of (197/K) times as many images give the fit more independent samples. The K
tokens of sample ``i`` are drawn without replacement by ``numpy.random.default_rng([seed, i])``
and kept in their order, so they depend on nothing but the seed and the sample's index: a
resumed run and parallel workers draw the very same positions. The positions (into the model's
own token sequence, prefix tokens first) are stored as ``token_positions`` beside the
activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from rba_store.errors import UsageError

TOKEN_SEED = 0
_RANDOM = re.compile(r"^random:(\d+)$")


def random_tokens(tokens: str) -> int | None:
    """K of ``random:K`` (None for every other token choice)."""
    match = _RANDOM.match(tokens)
    if match is None:
        if tokens.startswith("random"):
            raise UsageError(f"--tokens {tokens!r} is not valid; write random:K, e.g. random:16")
        return None
    k = int(match.group(1))
    if k < 1:
        raise UsageError(f"--tokens {tokens!r}: K must be at least 1")
    return k


@dataclass(frozen=True)
class TokenSampler:
    """Which tokens of each sample are kept: the ``prefix`` first ones and ``k`` of the rest."""

    prefix: int
    n_tokens: int  # tokens of a sample, prefix included
    k: int
    seed: int = TOKEN_SEED

    def __post_init__(self) -> None:
        available = self.n_tokens - self.prefix
        if self.k > available:
            raise UsageError(
                f"--tokens random:{self.k} asks for more tokens than a sample has besides its "
                f"{self.prefix} prefix token(s) ({available}); pass K <= {available}"
            )

    def positions(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start, prefix + k)`` token positions of samples ``[start, stop)``."""
        head = np.arange(self.prefix)
        rows = []
        for index in range(start, stop):
            rng = np.random.default_rng([self.seed, index])
            drawn = rng.choice(self.n_tokens - self.prefix, size=self.k, replace=False)
            rows.append(np.concatenate([head, np.sort(drawn) + self.prefix]))
        return np.stack(rows).astype(np.int64)

    def take(self, points: list[torch.Tensor], positions: np.ndarray) -> list[torch.Tensor]:
        """The kept tokens of every capture point of a batch."""
        index = torch.from_numpy(positions).to(points[0].device)
        rows = torch.arange(len(index), device=index.device)[:, None]
        return [p[rows, index] for p in points]

    def describe(self) -> dict[str, object]:
        return {
            "k": self.k,
            "prefix": self.prefix,
            "seed": self.seed,
            "rule": "numpy.random.default_rng([seed, sample index]).choice(tokens - prefix, k, "
            "replace=False), sorted, after the prefix tokens",
        }
