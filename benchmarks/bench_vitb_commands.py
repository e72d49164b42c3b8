"""What a ViT-B/16 user sees (issue 22, item 4): the share of ``evaluate --auto`` and ``select``
spent timing images/s, their ETA against the truth, and ``fit --from moments``'s peak RSS.

Random images (224 px, 2 classes) in ``WORK/data/{train,val,test}``; a store of the train
images (random weights, float16); default ``stats``; then, each in its own process:

- ``fit --span A:B --from moments`` and ``--from activations`` (streamed): peak RSS (wait4);
- ``evaluate --auto --max-blocks 3`` and ``select --max-blocks 3`` (``--json``): wall time,
  seconds spent timing (``timing.seconds`` of the report), and the ETA of the progress line
  last printed before 25 % and 50 % of the wall time, against the time that was really left
  (every stderr line, with the time it was printed: ``WORK/evaluate.log``, ``WORK/select.log``).

Maps fitted by an earlier run are kept in the store (``fits/``) and reused, as for a user; delete
them for a first-run figure.

    python -m benchmarks.bench_vitb_commands [--work /tmp/rba_vitb] [--train 96]
        [--commands evaluate select]   # only these (of fit, evaluate, select)

Takes 15-30 min for ViT-B on 2 cores. Figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

COMMANDS = ("fit", "evaluate", "select")
ETA = re.compile(r"(?<!step )ETA (at most )?((?:\d+ h )?(?:\d+ min )?(?:\d+ s)?)")


def make_images(root: Path, counts: dict[str, int], size: int = 224) -> None:
    """Random RGB images in ``root/<split>/c<k>/``, two classes alternating."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def parse_eta(line: str) -> float | None:
    """Seconds of the ETA of the whole command in a progress line (``ETA 3 min 05 s``; not
    select's ``step ETA``), None when unknown."""
    match = ETA.search(line)
    if match is None or not match.group(2):
        return None
    seconds = 0.0
    for value, unit in re.findall(r"(\d+) (h|min|s)", match.group(2)):
        seconds += int(value) * {"h": 3600, "min": 60, "s": 1}[unit]
    return seconds


def run(args: list[str], interval: float) -> dict[str, Any]:
    """Run ``rba-store ARGS`` in a child process: wall time, peak RSS, stdout, and every
    stderr line with the time it was printed."""
    env = os.environ | {"RBA_STORE_PROGRESS_SECONDS": str(interval), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "from rba_store.cli import run; run()", *args]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    lines = []
    assert child.stderr is not None and child.stdout is not None
    for raw in child.stderr:
        lines.append((time.perf_counter() - start, raw.decode().rstrip()))
    stdout = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"rba-store {' '.join(args)} failed:\n" + "\n".join(t for _, t in lines))
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": stdout, "lines": lines}


def eta_checks(result: dict[str, Any], at: tuple[float, ...] = (0.25, 0.5)) -> dict[str, Any]:
    """The last ETA printed before each share of the wall time against the time really left,
    the range of that ratio over the lines with an ETA in the first 90 % of the wall time, and
    when the first ETA came. Only the command's own progress lines count (``... so far, ETA``),
    not a phase's (the Dask lines of statistics and fits)."""
    wall = result["wall_s"]
    lines = [(t, line) for t, line in result["lines"] if " so far, " in line]  # the command's
    known = [(t, line, parse_eta(line)) for t, line in lines if "ETA" in line]  # not a phase's
    known = [(t, line, eta) for t, line, eta in known if eta is not None and t < wall]
    ratios = [eta / (wall - t) for t, _, eta in known if t <= 0.9 * wall]  # not the last s
    out: dict[str, Any] = {
        "first_eta_at_share": known[0][0] / wall if known else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios else None,
    }
    for share in at:
        before = [k for k in known if k[0] <= share * wall]
        if not before:
            out[f"at_{share:g}"] = None
            continue
        t, line, eta = before[-1]
        out[f"at_{share:g}"] = {
            "at_s": t,
            "eta_s": eta,
            "true_s": wall - t,
            "ratio": eta / (wall - t),
            "line": line.removeprefix("rba-store: "),
        }
    return out


def checks_from_log(log: Path, wall_s: float) -> dict[str, Any]:
    """:func:`eta_checks` again from a log this script wrote."""
    lines = []
    for text in log.read_text().splitlines():
        stamp, _, line = text.partition(" s  ")
        lines.append((float(stamp), line))
    return eta_checks({"wall_s": wall_s, "lines": lines})


def timed_command(
    args: list[str], interval: float, report_key: str | None, log: Path
) -> dict[str, Any]:
    """Run a command with ``--json``; its stderr lines, timed, go to ``log``."""
    result = run([*args, "--json"], interval)
    log.write_text("".join(f"{t:8.1f} s  {line}\n" for t, line in result["lines"]))
    report = json.loads(result["stdout"])
    report = report[report_key] if report_key else report
    timing = report["timing"]["seconds"]
    return {
        "command": "rba-store " + " ".join(args),
        "wall_s": result["wall_s"],
        "timing_s": timing,
        "timing_share": timing / result["wall_s"],
        "timing_how": report["timing"]["how"],
        "eta": eta_checks(result),
        "progress_lines": len([1 for _, line in result["lines"] if "ETA" in line]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rba_vitb"))
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--train", type=int, default=96, help="images in the store")
    parser.add_argument("--held-out", type=int, default=16, help="val and test images each")
    parser.add_argument("--span", default="8:10", help="span of the fit RSS comparison")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between lines")
    parser.add_argument(
        "--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS), help="run only these"
    )
    args = parser.parse_args()
    data, store = args.work / "data", args.work / "store.zarr"
    if not data.is_dir():
        make_images(data, {"train": args.train, "val": args.held_out, "test": args.held_out})
    if not store.is_dir():
        extract = ["extract", "--model", args.model, "--data", str(data), "--out", str(store)]
        run([*extract, "--dtype", "float16"], args.interval)
        run(["stats", str(store)], args.interval)
    out: dict[str, Any] = {"model": args.model, "train": args.train, "held_out": args.held_out}
    out["load_average"] = os.getloadavg()
    for source in ("moments", "activations") if "fit" in args.commands else ():
        fit = ["fit", str(store), "--span", args.span, "--from", source]
        result = run([*fit, "--name", f"rss-{source}", "--overwrite"], args.interval)
        out[f"fit_{source}"] = {"command": "rba-store " + " ".join(fit), **_rss(result)}
    if "fit" in args.commands:
        out["fit_rss_ratio"] = out["fit_moments"]["rss_mb"] / out["fit_activations"]["rss_mb"]
    if "evaluate" in args.commands:
        evaluate = ["evaluate", str(store), "--auto", "--max-blocks", "3"]
        out["evaluate"] = timed_command(evaluate, args.interval, None, args.work / "evaluate.log")
    if "select" in args.commands:
        selection = str(args.work / "select.json")
        select = ["select", str(store), "--max-blocks", "3", "--out", selection]
        out["select"] = timed_command(select, args.interval, "test", args.work / "select.log")
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


def _rss(result: dict[str, Any]) -> dict[str, float]:
    return {"wall_s": result["wall_s"], "rss_mb": result["rss_mb"]}


if __name__ == "__main__":
    main()
