"""What every benchmark hands back: figures with their targets, markdown, plots.

A :class:`Result` is one figure (``benchmark``, ``metric``, finite ``value``, ``unit``) and, when
one of the issue's targets applies to it, a :class:`Target` (a ``min`` or a ``max``). A benchmark's
``run(ctx)`` returns a :class:`Section`: its results, the markdown for ``RESULTS.md`` and the names
of the plots it wrote under ``ctx.plots``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

BENCHMARKS = (
    "solver",
    "scaling",
    "out_of_core",
    "extract",
    "stats",
    "moments",
    "modularity",
    "probe",
    "gpu",
)
SIZES = ("smoke", "quick", "full")
Size = Literal["smoke", "quick", "full"]
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """A bound a figure should respect: ``value >= bound`` (min) or ``value <= bound`` (max)."""

    kind: Literal["min", "max"]
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.kind == "min" else value <= self.bound

    def to_json(self) -> dict[str, float]:
        return {self.kind: self.bound}

    def __str__(self) -> str:
        return f"{'≥' if self.kind == 'min' else '≤'} {self.bound:g}"


def at_least(bound: float) -> Target:
    return Target("min", bound)


def at_most(bound: float) -> Target:
    return Target("max", bound)


@dataclass(frozen=True)
class Result:
    """One measured figure."""

    benchmark: str
    metric: str
    value: float
    unit: str
    target: Target | None = None

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark {self.benchmark!r} is not one of {BENCHMARKS}")
        if not math.isfinite(self.value):
            raise ValueError(f"{self.benchmark}/{self.metric} is not finite: {self.value}")

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "benchmark": self.benchmark,
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
        }
        if self.target is not None:
            out["target"] = self.target.to_json()
        return out


class Figures:
    """Collects one benchmark's results: ``figures.add("limit_ratio_d768", 0.8, "ratio", ...)``."""

    def __init__(self, benchmark: str) -> None:
        self.benchmark = benchmark
        self.results: list[Result] = []

    def add(self, metric: str, value: float, unit: str, target: Target | None = None) -> float:
        self.results.append(Result(self.benchmark, metric, float(value), unit, target))
        return float(value)


@dataclass
class Section:
    """A benchmark's output: figures, markdown body, plot file names, or why it was skipped."""

    benchmark: str
    results: list[Result] = field(default_factory=list)
    markdown: str = ""
    plots: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass(frozen=True)
class Context:
    """Where and how big a benchmark runs: ``size``, a scratch folder, the plots folder."""

    size: Size
    work: Path
    plots: Path
    repeats: int | None = None  # --repeats: overrides every benchmark's own number of repeats

    def pick(self, smoke: T, quick: T, full: T) -> T:
        """The value for this run's size."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.size]

    def pick_repeats(self, smoke: int, quick: int, full: int) -> int:
        """How many times to repeat a measurement: ``--repeats`` if given, else by size."""
        return self.repeats if self.repeats is not None else self.pick(smoke, quick, full)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are written as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A compact number for tables: ``—`` for None, scientific for tiny or huge values."""
    if value is None or not math.isfinite(value):
        return "—"
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e7:
        return f"{value:.1e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
