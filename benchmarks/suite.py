"""The benchmark suite: ``python -m benchmarks [--full | --smoke] [--only a,b] [--json PATH]``.

Runs each benchmark (``benchmarks/bench_<name>.py``, each with ``run(ctx) -> Section``) in turn,
prints where every target stands, rewrites the generated blocks of ``RESULTS.md`` and the plots
(under ``--results-dir``, by default this folder) and, with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks._machine import describe
from benchmarks._report import RunInfo, render_section, render_summary, update_results, write_json
from benchmarks._results import BENCHMARKS, Context, Section, Size

HERE = Path(__file__).resolve().parent


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number; pass e.g. 3")
    return int(text)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{','.join(BENCHMARKS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Throughput, scaling and memory of every stage of rba-store, side by side "
        "with the alternatives. Quick sizes by default (a few minutes on 2 cores).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="full sizes (tens of minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it all runs")
    parser.add_argument(
        "--only",
        type=_names,
        metavar="LIST",
        help=f"comma-separated benchmarks to run, from {','.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--repeats",
        type=_positive,
        metavar="N",
        help="repeat each measurement N times (default: by size, e.g. 1 quick, 3 full)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=HERE,
        metavar="DIR",
        help="where RESULTS.md and plots/ are written (default: the benchmarks folder)",
    )
    parser.add_argument(
        "--work", type=Path, metavar="DIR", help="scratch folder for stores (default: a temp dir)"
    )
    return parser.parse_args(argv)


def run_one(name: str, ctx: Context) -> Section:
    """One benchmark; a failure becomes a section saying so (and is printed in full)."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"benchmarks.bench_{name}")
    try:
        section: Section = module.run(ctx)
    except Exception as e:
        traceback.print_exc()
        return Section(name, skipped=f"failed: {type(e).__name__}: {e}".splitlines()[0])
    return section


def _print_section(section: Section, seconds: float) -> None:
    print(f"\n== {section.benchmark} ({seconds:.0f} s)", flush=True)
    if section.skipped:
        print(section.skipped)
    for r in section.results:
        if r.target is not None:
            print(
                f"  {r.metric} = {r.value:.4g} {r.unit}  target {r.target}: "
                f"{'met' if r.met else 'MISSED'}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    size: Size = "full" if args.full else "smoke" if args.smoke else "quick"
    names = args.only or list(BENCHMARKS)
    plots = args.results_dir / "plots"
    machine = describe()
    started = time.perf_counter()
    sections: list[Section] = []
    seconds: dict[str, float] = {}
    if args.work is not None:  # a scratch folder that does not exist yet is made
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rba-bench-", dir=args.work) as tmp:
        for name in names:
            print(f"running {name} ({size}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            section = run_one(name, Context(size, Path(tmp) / name, plots, args.repeats))
            seconds[name] = time.perf_counter() - t0
            sections.append(section)
            _print_section(section, seconds[name])
    run = RunInfo(
        date=time.strftime("%Y-%m-%d %H:%M"),
        command=shlex.join(["python", "-m", "benchmarks", *argv]),
        size=size,
        seconds=seconds,
        total_seconds=time.perf_counter() - started,
    )
    blocks = {s.benchmark: render_section(s, run, machine) for s in sections}
    blocks["summary"] = render_summary(sections, run, machine)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    update_results(args.results_dir / "RESULTS.md", blocks)
    if args.json is not None:
        write_json(args.json, sections, run, machine)
    print(f"\n{run.total_seconds:.0f} s in all; RESULTS.md in {args.results_dir}")
    failed = [s.benchmark for s in sections if s.skipped and s.skipped.startswith("failed")]
    return 1 if failed else 0
