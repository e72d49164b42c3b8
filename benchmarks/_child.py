"""Run one measurement in a fresh Python process, so that its peak RSS is its own.

``run_in_child(fn, work, **kwargs)`` calls the module-level function ``fn(**kwargs)`` in
``python -m benchmarks._child SPEC``. ``fn`` returns a dict of numbers and NumPy arrays; the
numbers come back as they are, the arrays through ``.npy`` files, and ``peak_rss_mb`` is added.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_in_child(
    fn: Callable[..., dict[str, Any]],
    work: Path,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``fn(**kwargs)`` in a fresh interpreter (kwargs must be JSON-serialisable)."""
    target = f"{fn.__module__}:{fn.__qualname__}"
    spec = work / f"child-{uuid.uuid4().hex}.json"
    out = spec.with_suffix(".out.json")
    spec.write_text(json.dumps({"target": target, "kwargs": kwargs, "out": str(out)}))
    child_env = dict(os.environ) | dict(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._child", str(spec)],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{target} failed in a child process (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    for key, path in result.pop("arrays").items():
        result[key] = np.load(path)
        Path(path).unlink()
    spec.unlink()
    out.unlink()
    return result


def baseline() -> dict[str, Any]:
    """Nothing: a child's own cost (an interpreter and this module's imports)."""
    return {}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    On Linux, the high-water mark of this program's own memory (``VmHWM``). ``ru_maxrss`` is
    not that: it keeps the peak of the process image before ``exec``, i.e. the parent's resident
    size when it started the child (measured: a child of a parent holding 1 GiB reports 1,051 MB
    there and 13 MB in ``VmHWM``). Elsewhere ``ru_maxrss`` (KiB on Linux and BSD, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    module, _, name = spec["target"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    values = fn(**spec["kwargs"])
    out = Path(spec["out"])
    arrays = {}
    for key in [k for k, v in values.items() if isinstance(v, np.ndarray)]:
        path = out.with_name(f"{out.stem}-{key}.npy")
        np.save(path, values.pop(key))
        arrays[key] = str(path)
    values["peak_rss_mb"] = peak_rss_mb()
    out.write_text(json.dumps(values | {"arrays": arrays}))


if __name__ == "__main__":
    main(sys.argv[1])
