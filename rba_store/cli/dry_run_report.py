"""What ``extract --dry-run`` prints, and the note when ``--limit`` exceeds the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def note_limit(limit: int | None, n_samples: int, dry_run: bool) -> None:
    """Say when --limit asks for more samples than the data holds (it means "at most")."""
    if limit is not None and limit > n_samples:
        typer.echo(
            f"rba-store: note: --limit {limit:,} is more than the {n_samples:,} samples the data "
            f"holds; {'planning' if dry_run else 'extracting'} all {n_samples:,}"
            + (
                f" (to plan for {limit:,}, pass --plan-samples {limit})"
                if dry_run
                else f" (to plan for {limit:,}, use --dry-run --plan-samples {limit})"
            ),
            err=True,
        )


def dry_run_report(plan: Any, out: Path, plan_samples: int | None) -> str:
    """What ``extract --dry-run`` prints: what would be written, its size on disk against the
    free disk, and the peak memory of the run (see :mod:`rba_store.extract.dry_run`)."""
    from rba_store.extract.dry_run import binary_size as size
    from rba_store.extract.dry_run import dry_run

    options = plan.options
    report = dry_run(plan, out, plan_samples)
    layout, disk, memory = report.layout, report.disk, report.memory
    point = layout.points[0]
    shape = f"{layout.n_samples:,} x {point.n_tokens} tokens x {point.n_channels} channels"
    kind = "images" if plan.loaded.family != "language" else "text windows"
    counted = (
        f"{report.n_samples:,} planned (--plan-samples); the data holds {report.n_available:,}"
        if plan_samples is not None
        else f"{report.n_samples:,} (all the data holds"
        + (f", --limit {options.limit:,}" if options.limit else "")
        + ")"
    )
    if plan.description["data"].get("source") == "folder":
        counted += f"; {kind} counted, not decoded (the run refuses or skips unreadable ones)"
    arrays = (
        f"  arrays      {layout.points_label()}"
        + (f" and m1..m{layout.n_blocks} (MLP outputs)" if layout.mlp_points else "")
        + f": {shape}, {layout.dtype}, tokens={options.tokens}"
        if options.store_activations
        else f"  arrays      none of {layout.points_label()} ({shape}): --no-activations keeps "
        "only the statistics, features, labels and ids"
    )
    if not options.store_activations:
        activations = "no activations"
    elif disk.ratio is None:
        activations = f"activations {size(disk.activations_raw)} (compression not measured)"
    else:
        activations = (
            f"activations {size(disk.activations_raw)} raw -> {size(disk.activations)} with "
            f"{layout.codec} (ratio {disk.ratio:.3f}, measured on the first {disk.sample_size} "
            "samples)"
        )
    parts = [activations, f"features, labels and ids {size(disk.other)}"]
    if disk.weights:
        parts.append(f"random weights kept in the store {size(disk.weights)}")
    if disk.moments:
        sets = " x 2 (--holdout)" if options.stats_holdout else ""
        p = sum(point.n_channels for point in layout.points)
        parts.append(
            f"joint moments of {p:,} channels in float64{sets}, {disk.moments_pairs[0]} of "
            f"{disk.moments_pairs[1]} pairs of points: {size(disk.moments)} saved in the store"
        )
    lines = [
        f"dry run: {plan.loaded.name} on {plan.description['data']['source']} -> {out}",
        f"  samples     {counted}",
        arrays,
        f"  layout      {layout.chunk_samples} samples/chunk, {layout.shard_samples} "
        f"samples/shard, {layout.n_shards:,} shards, codec {layout.codec} "
        f"(level {layout.clevel})",
        f"  disk        about {size(disk.total)}: " + "; ".join(parts),
    ]
    if disk.later_stats:
        lines.append(
            f"              a later 'rba-store stats' saves about {size(disk.later_stats)} more "
            "(joint moments in float64)"
        )
    if disk.free is None:
        lines.append(f"  free disk   unknown at {disk.free_path}")
    else:
        fits = disk.total <= disk.free
        lines.append(
            f"  free disk   {size(disk.free)} at {disk.free_path}: "
            + (
                "enough"
                + (
                    ""
                    if not disk.later_stats or disk.total + disk.later_stats <= disk.free
                    else ", but not for the statistics of a later 'rba-store stats' as well"
                )
                if fits
                else f"NOT ENOUGH, {size(disk.total - disk.free)} short"
            )
        )
        if not fits:
            typer.echo(
                f"rba-store: warning: the store needs about {size(disk.total)} and "
                f"{size(disk.free)} is free at {disk.free_path}; free space, choose another "
                "--out, or store less (--dtype float16, --tokens cls or random:K, "
                "--no-activations with --stats)",
                err=True,
            )
    stats = f", folding the moments {size(memory.stats)}" if memory.stats else ""
    lines.append(
        f"  memory      peak about {size(memory.peak)}: this process now {size(memory.process)} "
        "(libraries, model"
        + (", weights kept for the store" if plan.weights_payload else "")
        + f"), inputs {size(memory.loader)} (2 batches of {report.batch}), forward pass "
        f"{size(memory.forward)} (a batch of every point in float32 and the largest step), "
        f"shard buffers {size(memory.shard_buffers)} ({memory.n_shard_buffers} x "
        f"{layout.shard_samples} samples){stats}"
        + (f"; {size(memory.available)} available" if memory.available is not None else "")
    )
    if memory.available is not None and memory.peak > memory.available:
        lines.append(
            "              more than is available: lower --batch-size, --shard-mb or "
            "--shard-samples"
        )
    lines.append("  nothing was written")
    return "\n".join(lines)
