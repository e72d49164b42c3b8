"""Replacing spans of blocks with fitted linear maps (or the identity); sizes and costs.

Span ``(a, b]`` means blocks a+1..b in the method's 1-based numbering, i.e. ``model.blocks[a:b]``
in timm's 0-based list; they are replaced by one module that maps ``h_a`` to ``h_b`` token by
token. The rest of the network (earlier and later blocks, final norm, pooling, head) is unchanged.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rba_store.errors import ModelError, UsageError

Span = tuple[int, int]


class LinearReplacement(nn.Module):
    """``y = x @ T + bias`` on every token vector: the fitted stand-in for a span of blocks."""

    def __init__(self, t: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None = None):
        super().__init__()
        t = torch.as_tensor(np.asarray(t), dtype=torch.float32)
        self.weight = nn.Parameter(t.T.contiguous(), requires_grad=False)  # (out, in), as nn.Linear
        b = torch.zeros(t.shape[1]) if bias is None else torch.as_tensor(np.asarray(bias))
        self.bias = nn.Parameter(b.to(torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}"


@dataclass(frozen=True)
class SpanMap:
    """What replaces one span: a fitted map (``t``, ``bias``) or, with ``t=None``, the identity.

    A ``folded`` map of span (a, b] with a >= 1 acts on block a's MLP output, inside block a
    (:mod:`rba_store.approx.fold_site`): it occupies blocks a..b, though it removes a+1..b.
    """

    span: Span
    t: np.ndarray | None = None
    bias: np.ndarray | None = None
    folded: bool = False

    @property
    def occupied(self) -> Span:
        """The points this map needs untouched: (a-1, b] when it lives in block a."""
        a, b = self.span
        return (a - 1, b) if self.folded and self.t is not None and a >= 1 else (a, b)

    def module(self) -> nn.Module:
        return nn.Identity() if self.t is None else LinearReplacement(self.t, self.bias)


def check_span_maps(maps: Sequence[SpanMap], n_blocks: int, width: int) -> None:
    """Spans inside the model, not overlapping, maps of the model's width."""
    ordered = sorted(maps, key=lambda m: m.span)
    for m in ordered:
        a, b = m.span
        if not 0 <= a < b <= n_blocks:
            raise UsageError(
                f"span {a}:{b} is out of range for a model of {n_blocks} blocks; pass a:b with "
                f"0 <= a < b <= {n_blocks}"
            )
        if m.t is not None and tuple(m.t.shape) != (width, width):
            raise UsageError(
                f"the map for span {a}:{b} is {m.t.shape[0]}x{m.t.shape[1]}, but the model's "
                f"blocks are {width} wide; fit it on a store of this model"
            )
    for left, right in itertools.pairwise(sorted(maps, key=lambda m: m.occupied)):
        if right.occupied[0] < left.occupied[1]:
            raise UsageError(
                f"spans {left.span[0]}:{left.span[1]} and {right.span[0]}:{right.span[1]} "
                "overlap; replace non-overlapping spans"
            )


def replace_spans(model: nn.Module, maps: Sequence[SpanMap]) -> nn.Module:
    """A copy of a ViT-family model with each span's blocks replaced by its map."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ModelError(
            "span replacement needs a model with a sequential .blocks (timm ViT family)"
        )
    width = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))
    check_span_maps(maps, len(blocks), width)
    new = copy.deepcopy(model)
    modules = list(new.blocks)
    for m in sorted(maps, key=lambda m: m.span, reverse=True):  # right to left: indices stay valid
        a, b = m.span
        modules[a:b] = [m.module()]
    new.blocks = nn.Sequential(*modules)
    return new.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *_: object,
    **__: object,
) -> int:
    """The two attention products (Q·Kᵀ and A·V) of the CPU's fused attention kernel."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def count_flops(
    model: nn.Module, input_shape: Sequence[int] = (), example: torch.Tensor | None = None
) -> int:
    """FLOPs of one forward pass on one input (zeros of ``input_shape``, or ``example``, e.g.
    token ids), counted by ``torch.utils.flop_counter``.

    The counter convention: 2 per multiply-add of matrix products and convolutions (norms,
    softmax and activations are not counted). torch's counter has no formula for the CPU's fused
    attention kernel and would count its two products as 0: it is given one here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device) if example is None else example.to(device)
    mapping = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        mapping[cpu_attention] = _cpu_attention_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.inference_mode():
        model(x)
    return int(counter.get_total_flops())


def images_per_second(
    model: nn.Module, x: torch.Tensor, repeats: int = 3, min_seconds: float = 0.05
) -> float:
    """Throughput on a batch: the median of ``repeats`` timings, each of as many forward passes
    as fill ``min_seconds``, after two untimed warm-up passes (CUDA synchronised)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        once = max(time.perf_counter() - start, 1e-6)
        passes = max(1, int(min_seconds / once))
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(passes):
                model(x)
            sync()
            timings.append((time.perf_counter() - start) / passes)
    return len(x) / float(np.median(timings))


TIME_BUDGET_S = 1.0  # default seconds of timing per variant (evaluate, select's test table)
TIMED_PASSES = 5  # at most this many timed passes (after one warm-up pass), within the budget


@dataclass(frozen=True)
class Throughput:
    """How fast a model ran: ``images_per_s`` (None when not timed), the median of ``passes``
    timed passes of ``batch`` inputs after one warm-up pass, in ``seconds`` of wall time."""

    images_per_s: float | None
    batch: int
    passes: int
    seconds: float


def timing_note(budget_s: float, batch: int, noun: str = "images") -> str:
    """How the throughput column of a table was measured (its footer)."""
    if budget_s <= 0 or batch < 1:
        return "not timed (--time-budget 0)"
    return (
        f"timed after the evaluation, the median of up to {TIMED_PASSES} passes over {batch} of "
        f"the test {noun} after a warm-up pass, at most {budget_s:g} s per variant "
        "(--time-budget; 0: no timing)"
    )


def timing_batch(budget_s: float, seconds_per_input: float, n_inputs: int) -> int:
    """Inputs per timing pass: as many as let a warm-up and ``TIMED_PASSES`` passes fit in the
    budget (at least 1, at most ``n_inputs``)."""
    per_pass = budget_s / (TIMED_PASSES + 1)
    return max(1, min(n_inputs, int(per_pass / max(seconds_per_input, 1e-9))))


def measure_throughput(
    model: nn.Module, x: torch.Tensor, budget_s: float = TIME_BUDGET_S
) -> Throughput:
    """Inputs per second of ``model`` on the batch ``x`` within a wall-clock budget
    (``budget_s <= 0``: not timed): a warm-up pass, then up to ``TIMED_PASSES`` timed passes
    while the next one fits in the budget (size ``x`` with :func:`timing_batch`). When only one
    pass fits, that pass is the figure."""
    if budget_s <= 0:
        return Throughput(None, 0, 0, 0.0)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    begin = time.perf_counter()
    with torch.inference_mode():
        timings = [_timed(model, x, sync)]  # the warm-up pass
        while len(timings) <= TIMED_PASSES:
            if time.perf_counter() - begin + float(np.median(timings)) > budget_s:
                break
            timings.append(_timed(model, x, sync))
    timed = timings[1:] or timings
    seconds = time.perf_counter() - begin
    return Throughput(len(x) / float(np.median(timed)), len(x), len(timed), seconds)


def _timed(model: nn.Module, x: torch.Tensor, sync: Callable[[], object]) -> float:
    start = time.perf_counter()
    model(x)
    sync()
    return max(time.perf_counter() - start, 1e-9)


@dataclass(frozen=True)
class Work:
    """Where a long evaluation stands, for progress lines: ``what`` was just done, and the work
    weighted by its expected cost: ``cost_done`` of ``cost_total`` units (one unit: one block run
    on one input), plus work of known duration (timing budgets): ``seconds_done`` spent and
    ``seconds_left`` expected. ``assumed``: what ``cost_total`` assumes when it is an estimate
    ("" when it is known); then ``stage_left``: the cost left in the current stage (select's
    step), known exactly. ``unit_seconds``: the seconds a unit is expected to take before a
    rate is measured (from a first pass; None: unknown)."""

    what: str
    cost_done: float
    cost_total: float
    seconds_done: float = 0.0
    seconds_left: float = 0.0
    assumed: str = ""
    stage_left: float | None = None
    unit_seconds: float | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.cost_done / self.cost_total) if self.cost_total > 0 else 0.0


WorkProgress = Callable[[Work], None]


class WorkTracker:
    """Counts cost-weighted work and reports it to ``progress`` (when given) as :class:`Work`."""

    def __init__(self, progress: WorkProgress | None, cost_total: float = 0.0) -> None:
        self.progress = progress
        self.cost_done, self.cost_total = 0.0, float(cost_total)
        self.seconds_done = self.seconds_left = 0.0
        self.assumed = ""
        self.stage_end: float | None = None  # cost_done when the current stage ends
        self.unit_seconds: float | None = None

    def report(self, what: str, cost: float = 0.0, seconds: float = 0.0) -> None:
        """``cost`` units (and ``seconds`` of fixed-duration work) were just done."""
        self.cost_done += cost
        self.seconds_done += seconds
        if self.progress is not None:
            self.progress(
                Work(
                    what,
                    self.cost_done,
                    max(self.cost_total, self.cost_done),
                    self.seconds_done,
                    self.seconds_left,
                    self.assumed,
                    None if self.stage_end is None else max(0.0, self.stage_end - self.cost_done),
                    self.unit_seconds,
                )
            )


def block_cost(model: nn.Module) -> int:
    """Cost units per input of a forward pass: the blocks it runs, plus one for stem and head."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:  # a decoder: its layers
        config = getattr(model, "config", None)
        return int(getattr(config, "num_hidden_layers", 1)) + 1
    return sum(1 for m in blocks if not isinstance(m, LinearReplacement | nn.Identity)) + 1


def expected_timing_seconds(budget_s: float, batch: int, seconds_per_input: float | None) -> float:
    """What :func:`measure_throughput` is expected to take on ``batch`` inputs: the budget, or
    less when a warm-up and all timed passes fit in it."""
    if budget_s <= 0:
        return 0.0
    if seconds_per_input is None:
        return budget_s
    return min(budget_s, (TIMED_PASSES + 1) * batch * seconds_per_input)
