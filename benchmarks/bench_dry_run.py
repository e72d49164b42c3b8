"""``extract --dry-run --plan-samples N`` against a real run, scaled to N.

For each configuration: the dry run plans N samples that are not there (in its own process, as
the CLI runs it); then the real ``rba-store extract`` of the same configuration runs on the n
samples that are there, under ``/usr/bin/time -v`` (peak RSS), and its folder is measured with
``du`` (bytes on disk). The real size is scaled to N: the kept random weights (``model/``) once,
everything else times N/n. Memory does not grow with N (shard by shard), so the peaks compare as
they are. The targets: size, free disk and memory within 20 %.

    python -m benchmarks.bench_dry_run [--work DIR] [--plan N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from rba_store.cli import run; run()"]
# (label, extract arguments, images the real run uses): random weights, 224 px, 3 shards each
CONFIGS: list[tuple[str, list[str], int | None]] = [
    ("embedded default (digits)", ["--chunk-samples", "128", "--shard-samples", "256"], None),
    ("ViT-S/16 random, 224 px", ["--model", "vit_small_patch16_224"], 144),
    ("ViT-B/16 random, 224 px", ["--model", "vit_base_patch16_224"], 72),
]
QUICK = CONFIGS[:2]

_CHILD = """
import json, sys
import rba_store.extract.dry_run as dr
from rba_store.cli.main import main
seen = {}
inner = dr.dry_run
def spy(*args, **kwargs):
    seen["report"] = report = inner(*args, **kwargs)
    return report
dr.dry_run = spy
code = main(sys.argv[2:])
r = seen["report"]
json.dump({"code": code, "n": r.n_samples, "disk": r.disk.total, "free": r.disk.free,
           "weights": r.disk.weights, "ratio": r.disk.ratio, "peak": r.memory.peak,
           "process": r.memory.process, "forward": r.memory.forward,
           "buffers": r.memory.shard_buffers, "loader": r.memory.loader},
          open(sys.argv[1], "w"))
"""


def image_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG images of 256 px in 3 class folders: smooth blobs plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.kron(rng.normal(size=(8, 8, 3)), np.ones((32, 32, 1)))
        image += 0.3 * rng.normal(size=image.shape)
        image = (image - image.min()) / (image.max() - image.min()) * 255
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def du_bytes(path: Path) -> int:
    """Bytes on disk (``du -s --block-size=1``: allocated blocks, as a full disk counts them)."""
    out = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def estimate(args: list[str], work: Path) -> dict[str, Any]:
    result = work / "dry_run.json"
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(result), "extract", *args, "--dry-run"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return json.loads(result.read_text())


def real_run(args: list[str], out: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["/usr/bin/time", "-v", *CLI, "extract", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) * 1024
    weights = du_bytes(out / "model") if (out / "model").exists() else 0
    return {"disk": du_bytes(out), "weights": weights, "peak": peak}


def compare(label: str, args: list[str], n_real: int | None, plan: int, work: Path) -> dict:
    if n_real is not None:
        data = image_folder(work / f"images{n_real}", n_real)
        args = [*args, "--data", str(data)]
    out = work / "real.zarr"
    shutil.rmtree(out, ignore_errors=True)
    real = real_run(args, out)
    n = json.loads((out / "zarr.json").read_text())["attributes"]["rba_store"]["layout"][
        "n_samples"
    ]
    dry = estimate([*args, "--out", str(work / "planned.zarr"), "--plan-samples", str(plan)], work)
    scaled = real["weights"] + (real["disk"] - real["weights"]) * plan / n
    free = shutil.disk_usage(work).free + real["disk"]  # as the dry run saw it, before the store
    shutil.rmtree(out, ignore_errors=True)
    return {
        "config": label,
        "n_real": n,
        "n_planned": plan,
        "disk_planned": dry["disk"],
        "disk_real_scaled": scaled,
        "disk_ratio": dry["disk"] / scaled,
        "free_planned": dry["free"],
        "free_real": free,
        "free_ratio": dry["free"] / free,
        "peak_planned": dry["peak"],
        "peak_real": real["peak"],
        "peak_ratio": dry["peak"] / real["peak"],
        "compression": dry["ratio"],
        "parts": {k: dry[k] for k in ("process", "loader", "forward", "buffers", "weights")},
    }


def table(rows: list[dict]) -> str:
    def gib(n: float) -> str:
        return f"{n / 2**30:,.2f}"

    lines = [
        "| configuration | n real → N planned | disk planned / real x N/n (GiB) | ratio | "
        "free disk planned / measured (GiB) | peak RSS planned / real (GiB) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['n_real']} → {r['n_planned']:,} | {gib(r['disk_planned'])} / "
            f"{gib(r['disk_real_scaled'])} | {r['disk_ratio']:.3f} | {gib(r['free_planned'])} / "
            f"{gib(r['free_real'])} | {gib(r['peak_planned'])} / {gib(r['peak_real'])} | "
            f"{r['peak_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [a temp dir]")
    parser.add_argument("--plan", type=int, default=100_000, help="N to plan for [100000]")
    parser.add_argument("--quick", action="store_true", help="the default and ViT-S only")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for label, extra, n_real in QUICK if args.quick else CONFIGS:
            rows.append(compare(label, extra, n_real, args.plan, Path(work)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
