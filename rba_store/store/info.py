"""What a store holds: shapes, dtype, codec, bytes stored vs raw, completeness, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rba_store.store.analyses import FITS, STATS
from rba_store.store.handle import Store
from rba_store.store.layout import (
    DTYPE_ATTR,
    FEATURES,
    INPUT_IDS,
    LABEL,
    SAMPLE_ID,
    TOKEN_POSITIONS,
    WEIGHTS_PATH,
    points_label,
)
from rba_store.store.selection import how_to_finish

# Every kind of saved analysis (modularity and probe: rba_store/readings)
ANALYSIS_KINDS = (STATS, FITS, "modularity", "probe")


def store_info(store: Store | str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a store (what ``rba-store info --json`` prints)."""
    store = Store.coerce(store)
    description, layout = store.description, store.layout
    arrays: dict[str, dict[str, Any]] = {}
    stored_total = raw_total = 0
    names = store.activation_names
    extra = [INPUT_IDS] if layout.seq_len is not None else []
    extra += [TOKEN_POSITIONS] if TOKEN_POSITIONS in store.group else []
    for name in [*names, FEATURES, *extra, LABEL, SAMPLE_ID]:
        array = store.array(name)
        stored = int(array.nbytes_stored())
        raw = int(array.nbytes) if name != SAMPLE_ID else 0
        arrays[name] = {
            "shape": list(array.shape),
            "dims": list(array.metadata.dimension_names or ()),
            "dtype": str(array.attrs.get(DTYPE_ATTR, array.dtype)),  # bfloat16 kept as bits
            "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "bytes_stored": stored,
        }
        if name in names or name == FEATURES:
            stored_total += stored
            raw_total += raw
    complete = store.completed_shards()
    samples_complete = sum(
        stop - start
        for start, stop in (layout.shard_rows(i) for i in range(layout.n_shards) if complete[i])
    )
    # Only completed shards count towards the ratio: unwritten ones take no space yet.
    raw_complete = raw_total * samples_complete // max(layout.n_samples, 1)
    return {
        "path": str(store.path),
        "format_version": description["format_version"],
        "fingerprint": description["fingerprint"],
        "n_samples": layout.n_samples,
        "n_blocks": layout.n_blocks,
        "stored_points": list(layout.stored_blocks),  # h_k stored (all unless extract --points)
        "tokens": description["tokens"],
        "dtype": layout.dtype,
        "codec": description["codec"],
        "chunk_samples": layout.chunk_samples,
        "shard_samples": layout.shard_samples,
        "complete": bool(complete.all()),
        "shards_complete": int(complete.sum()),
        "n_shards": layout.n_shards,
        "samples_complete": samples_complete,
        "bytes_raw": raw_complete,
        "bytes_stored": stored_total,
        "compression_ratio": round(raw_complete / stored_total, 4) if stored_total else None,
        "arrays": arrays,
        "model": description["model"],
        "data": description["data"],
        "preprocessing": description["preprocessing"],
        "versions": description["versions"],
        "run": description.get("run", {}),
        "analyses": {kind: store.list_analyses(kind) for kind in ANALYSIS_KINDS},
        "bytes_analyses": _bytes_below(store.root, ANALYSIS_KINDS),
        # Everything in the folder, as a disk counts it: activations, features, labels and ids,
        # the kept weights, the saved analyses, partial statistics, ledger and metadata.
        "bytes_on_disk": _bytes_on_disk(store.root),
        "bytes_weights": _bytes_below(store.root, (WEIGHTS_PATH,)),
        "activations": store.holds_activations,
        "how_to_finish": None if complete.all() else how_to_finish(store),
    }


def _bytes_below(root: Path, folders: tuple[str, ...]) -> int:
    """Bytes on disk of the files below ``root/<folder>`` (the saved analyses)."""
    return sum(
        f.stat().st_size for name in folders for f in (root / name).rglob("*") if f.is_file()
    )


def _bytes_on_disk(root: Path) -> int:
    """Bytes the folder takes on disk: allocated blocks where the system says (``du``), else
    the files' sizes."""
    total = 0
    for f in root.rglob("*"):
        st = f.lstat()
        if f.is_file() and not f.is_symlink():
            blocks = getattr(st, "st_blocks", None)
            total += blocks * 512 if blocks is not None else st.st_size
    return total


def size_text(n: float) -> str:
    """Bytes in binary units (MiB, GiB)."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`store_info`."""
    model, data = info["model"], info["data"]
    weights = model["weights"]
    stored = info.get("stored_points") or list(range(info["n_blocks"] + 1))
    h0 = info["arrays"].get(f"h{stored[0]}")
    label = points_label(stored, info["n_blocks"])
    ratio = info["compression_ratio"]
    lines = [
        f"store      {info['path']} (format v{info['format_version']}, "
        f"fingerprint {info['fingerprint'][:12]})",
        f"model      {model['name']}: {model['n_blocks']} blocks, weights {weights['source']}"
        + (f" {weights['path']}" if "path" in weights else "")
        + (f" sha256 {weights['sha256'][:12]}" if "sha256" in weights else ""),
        f"data       {data['source']} {data.get('path', '')}"
        + (f" split={data['split']}" if data.get("split") else "")
        + f" samples={info['n_samples']}"
        + (f" (limit {data['limit']})" if data.get("limit") else ""),
        (
            f"arrays     {label}"
            + (f" and m1..m{info['n_blocks']} (MLP outputs)" if "m1" in info["arrays"] else "")
            + f" {tuple(h0['shape'])} {h0['dims']} "
            f"{info['dtype']}, tokens={info['tokens']}; "
            if h0
            else f"arrays     NO activations (extracted with --no-activations: h0..h"
            f"{info['n_blocks']} were never stored; statistics only); "
        )
        + f"features {tuple(info['arrays']['features']['shape'])}",
        f"chunks     {info['chunk_samples']} samples/chunk, {info['shard_samples']} samples/shard, "
        f"codec {info['codec']['name']} (level {info['codec']['clevel']})",
        f"size       {size_text(info['bytes_on_disk'])} on disk in all: activations and features "
        f"{size_text(info['bytes_stored'])} stored of {size_text(info['bytes_raw'])} raw"
        + (f" (ratio {ratio:.3f})" if ratio else "")
        + f", saved analyses {size_text(info['bytes_analyses'])}"
        + (f", kept weights {size_text(info['bytes_weights'])}" if info["bytes_weights"] else "")
        + ", labels, ids, ledger and metadata the rest",
        f"complete   {'yes' if info['complete'] else 'NO'}: {info['shards_complete']}/"
        f"{info['n_shards']} shards, {info['samples_complete']}/{info['n_samples']} samples",
    ]
    if not info["complete"]:
        lines.append(f"           finish it by {info['how_to_finish']}")
    for kind, names in info["analyses"].items():
        shown = ", ".join(names) if names else "none"
        lines.append(f"{kind:<10} {shown}")
    return "\n".join(lines)
