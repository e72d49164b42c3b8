"""RESULTS.md and the JSON file: rendering the sections and replacing only the generated parts.

``RESULTS.md`` holds one generated block per benchmark (plus a summary), each between
``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``. A run rewrites the blocks of the
benchmarks it ran and leaves everything else (the hand-written analysis, blocks of benchmarks
not run with ``--only``) as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._machine import summary
from benchmarks._results import BENCHMARKS, Result, Section, fmt, table

TITLES = {
    "summary": "Latest run",
    "solver": "Solver",
    "scaling": "Scaling",
    "out_of_core": "Out of core",
    "extract": "Extraction",
    "stats": "Statistics",
    "moments": "Joint moments during extraction",
    "modularity": "Modularity curves",
    "probe": "Diffused-redundancy probes",
    "gpu": "GPU",
}
ORDER = ("summary", *BENCHMARKS)
_ANY_START = re.compile(r"<!-- generated: \w+ -->")
HEADER = """# Benchmark results

Written by `python -m benchmarks` (see the README): the blocks between the `generated` markers
(HTML comments) are rewritten by each run; everything else is hand-written and left alone.
"""


@dataclass(frozen=True)
class RunInfo:
    """How the suite was run."""

    date: str
    command: str
    size: str
    seconds: dict[str, float]  # per benchmark
    total_seconds: float


def _start(name: str) -> str:
    return f"<!-- generated: {name} -->"


def _end(name: str) -> str:
    return f"<!-- end generated: {name} -->"


def _value(result: Result) -> str:
    return f"{result.value:.1e}" if 0 < abs(result.value) < 1e-3 else fmt(result.value)


def targets_table(results: Sequence[Result], with_benchmark: bool = False) -> str:
    """Every figure that has a target, its value, the target and whether it is met."""
    rows = []
    for r in results:
        if r.target is None:
            continue
        status = "met" if r.met else "**missed**"
        row = [r.metric, f"{_value(r)} {r.unit}", str(r.target), status]
        rows.append([r.benchmark, *row] if with_benchmark else row)
    header = ["figure", "value", "target", "status"]
    return table(["benchmark", *header] if with_benchmark else header, rows)


def render_section(section: Section, run: RunInfo, machine: dict[str, Any]) -> str:
    """The generated block of one benchmark."""
    seconds = run.seconds.get(section.benchmark, 0.0)
    lines = [
        f"## {TITLES[section.benchmark]}",
        "",
        f"*{run.date}, `{run.command}` ({run.size} sizes, this part {seconds:.0f} s) on "
        f"{machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'}.*",
        "",
    ]
    if section.skipped is not None:
        lines.append(f"**{section.skipped}**")
        return "\n".join(lines)
    lines.append(section.markdown)
    if any(r.target is not None for r in section.results):
        n_met = sum(bool(r.met) for r in section.results if r.target is not None)
        n_all = sum(r.target is not None for r in section.results)
        lines += ["", f"**Targets:** {n_met} of {n_all} met.", "", targets_table(section.results)]
    return "\n".join(lines)


def render_summary(sections: Sequence[Section], run: RunInfo, machine: dict[str, Any]) -> str:
    """The summary block: date, command, machine, wall time, every target of this run."""
    results = [r for s in sections for r in s.results]
    ran = ", ".join(
        f"{s.benchmark} ({run.seconds.get(s.benchmark, 0):.0f} s)"
        + (f": {s.skipped}" if s.skipped else "")
        for s in sections
    )
    lines = [
        f"## {TITLES['summary']}",
        "",
        f"- **Date:** {run.date}",
        f"- **Command:** `{run.command}` ({run.size} sizes), {run.total_seconds:.0f} s in all",
        f"- **Machine:** {summary(machine)}",
        f"- **Benchmarks:** {ran}",
    ]
    if len(sections) < len(BENCHMARKS):
        lines.append("- Blocks of benchmarks not in this run are from earlier runs (see each).")
    if any(r.target is not None for r in results):
        n_met = sum(bool(r.met) for r in results if r.target is not None)
        n_all = sum(r.target is not None for r in results)
        lines += [
            "",
            f"**Where the targets stand:** {n_met} of {n_all} met in this run.",
            "",
            targets_table(results, with_benchmark=True),
        ]
    return "\n".join(lines)


def update_results(path: Path, blocks: dict[str, str]) -> None:
    """Replace (or insert, in ``ORDER``) the generated blocks of ``path``; keep the rest."""
    text = path.read_text() if path.exists() else HEADER
    previous_end: str | None = None
    for name in ORDER:
        if name in blocks:
            block = f"{_start(name)}\n{blocks[name]}\n{_end(name)}"
            pattern = re.compile(re.escape(_start(name)) + ".*?" + re.escape(_end(name)), re.S)
            if pattern.search(text):
                text = pattern.sub(lambda _m, b=block: b, text, count=1)
            elif previous_end is not None:  # right after the block before it
                at = text.index(previous_end) + len(previous_end)
                text = text[:at] + "\n\n" + block + text[at:]
            elif first := _ANY_START.search(text):  # first in ORDER: before every other block
                text = text[: first.start()] + block + "\n\n" + text[first.start() :]
            else:
                text = text.rstrip("\n") + "\n\n" + block + "\n"
        if _end(name) in text:
            previous_end = _end(name)
    path.write_text(text)


def write_json(
    path: Path, sections: Sequence[Section], run: RunInfo, machine: dict[str, Any]
) -> None:
    """``{"machine": ..., "run": ..., "results": [...]}``."""
    payload = {
        "machine": machine,
        "run": {
            "date": run.date,
            "command": run.command,
            "size": run.size,
            "seconds": run.seconds,
            "total_seconds": run.total_seconds,
            "skipped": {s.benchmark: s.skipped for s in sections if s.skipped},
        },
        "results": [r.to_json() for s in sections for r in s.results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
