"""Descriptions of an extraction: canonical JSON, fingerprints and readable differences."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# Keys of the attributes that describe a run rather than the extraction: not fingerprinted.
_UNFINGERPRINTED = ("fingerprint", "run")


def normalize(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so stored and fresh descriptions compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def normalize_json(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars become numbers, non-finite floats the strings inf/-inf/nan."""
    if isinstance(obj, dict):
        return {str(k): normalize_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [normalize_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def fingerprint(description: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a description, without its run-specific keys."""
    body = {k: v for k, v in description.items() if k not in _UNFINGERPRINTED}
    canonical = json.dumps(normalize(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 3) -> str:
    """Human-readable list of the leaves that differ between two descriptions."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in _UNFINGERPRINTED:
                    walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            diffs.append(f"{path}: {a!r} in the store, {b!r} now")

    walk(normalize(old), normalize(new), "")
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more
