"""What a fit is asked for: spans, their names, the options (defaults follow the reference code)
and the fitted result."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rba_store.errors import UsageError
from rba_store.solve.normal_eq import Solution
from rba_store.store import SampleSelection, StoreLayout
from rba_store.store.layout import points_text

Span = tuple[int, int]
_SPAN = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_span(text: str) -> Span:
    """``"a:b"`` -> ``(a, b)``."""
    match = _SPAN.match(text)
    if not match:
        raise UsageError(f"--span {text!r} is not of the form a:b (e.g. 4:6, blocks 5 and 6)")
    return int(match.group(1)), int(match.group(2))


def check_spans(spans: list[Span], layout: StoreLayout, store: str) -> None:
    n_blocks = layout.n_blocks
    if not spans:
        raise UsageError("no span to fit; pass --span a:b (or --auto K)")
    for a, b in spans:
        if not 0 <= a < b <= n_blocks:
            raise UsageError(
                f"span {a}:{b} is out of range for {store!r} ({n_blocks} blocks): pass a:b with "
                f"0 <= a < b <= {n_blocks}"
            )
        missing = [k for k in (a, b) if k not in layout.stored_blocks]
        if missing:
            raise UsageError(
                f"span {a}:{b} maps h{a} to h{b}, but {store!r} keeps only "
                f"{points_text(layout.stored_blocks)} (extracted with --points): pass a span "
                "between stored points"
            )
        if layout.point(a).n_tokens != layout.point(b).n_tokens:
            raise UsageError(
                f"span {a}:{b} maps h{a} ({layout.point(a).n_tokens} tokens) to h{b} "
                f"({layout.point(b).n_tokens} tokens): a token-wise map needs equal token counts"
            )


@dataclass(frozen=True)
class FitOptions:
    """Everything ``rba-store fit`` can be asked for (defaults follow the reference code)."""

    spans: tuple[Span, ...] = ()
    tokens: str = "all"
    selection: SampleSelection = field(default_factory=SampleSelection)
    holdout: float | None = None
    holdout_seed: int = 0
    eval_store: str | None = None
    bias: bool = False
    ridge: float = 0.0
    backend: str = "auto"
    gemm_dtype: str = "float64"
    allow_incomplete: bool = False
    scheduler: str | None = None
    scheduler_file: str | None = None
    name: str | None = None
    overwrite: bool = False
    checkpoint: str | None = None
    checkpoint_every: float = 60.0
    # Where the products come from: saved joint moments when they cover the rows (auto), only
    # them (moments: never read the activations), or the activations (streamed).
    source: str = "auto"
    # Folded maps (issue 20): X = block a's MLP output, Y = h_b - r_a (see solve/fold.py).
    fold: bool = False

    def describe(self) -> dict[str, Any]:
        described = {
            "tokens": self.tokens,
            "selection": self.selection.describe(),
            "holdout": self.holdout,
            "holdout_seed": self.holdout_seed,
            "eval_store": self.eval_store,
            "bias": self.bias,
            "ridge": self.ridge,
            "backend": self.backend,
            "gemm_dtype": self.gemm_dtype,
            "allow_incomplete": self.allow_incomplete,
        }
        if self.source != "auto":  # fits saved before the option existed still match auto
            described["source"] = self.source
        if self.fold:  # likewise: unfolded fits saved before keep matching
            described["fold"] = True
        return described


@dataclass
class SpanFit:
    """A fitted span: the map, its diagnostics, and where it is saved."""

    name: str
    span: Span
    solution: Solution
    diagnostics: dict[str, Any]
    reused: bool = False  # read back from fits/<name>: same span, options and store

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "span": list(self.span), "reused": self.reused} | (
            self.diagnostics
        )


def fit_name(span: Span, options: FitOptions, n_spans: int) -> str:
    """``a-b`` plus what differs from the defaults; ``NAME`` (one span) or ``NAME-a-b``."""
    a, b = span
    if options.name:
        return options.name if n_spans == 1 else f"{options.name}-{a}-{b}"
    suffix = "".join(
        [
            f"-{options.tokens.replace(':', '')}" if options.tokens != "all" else "",
            "-bias" if options.bias else "",
            f"-ridge{options.ridge:g}" if options.ridge else "",
            "-gemm32" if options.gemm_dtype == "float32" else "",
            "-fold" if options.fold else "",
        ]
    )
    return f"{a}-{b}{suffix}"
