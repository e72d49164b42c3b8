"""Equal bytes, more images: the README's ``--tokens random:K`` table.

``python docs/token_budget.py`` rewrites the README block.

For each model, the maps of a few spans are fitted twice with the same number of stored token
vectors (equal bytes): from every token of N images, and from the prefix plus K random tokens of
(tokens / (1 + K)) * N images (``extract --tokens random:K``). Both are scored on the same
held-out store (other images, every token) with ``fit --eval-store``: held-out relative MSE,
‖XT - Y‖² / ‖Y - mean(Y)‖². Models: the embedded default (digits, 17 tokens) and a randomly
initialised ViT-S/16 at 224 px (197 tokens; digits upsampled, validation images held out).
``--check`` exits 1 when the committed block differs from a fresh one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from rba_store.cli.threads import cpu_threads, default_threads

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = (
    "<!-- token-budget:begin (python docs/token_budget.py) -->",
    "<!-- token-budget:end -->",
)

CASES: list[dict[str, Any]] = [
    {"label": "embedded default", "model": None, "tokens": 17, "n": 60, "k": 4, "eval": 180,
     "spans": [(2, 4), (5, 7), (9, 11)]},
    {"label": "ViT-S/16, random init, 224 px", "model": "vit_small_patch16_224", "tokens": 197,
     "n": 16, "k": 16, "eval": 24, "spans": [(3, 5), (6, 8)]},
]  # fmt: skip


def _extract(work: Path, name: str, case: dict[str, Any], **options: Any) -> Path:
    from rba_store.extract import ExtractOptions, plan_extraction, run_extraction

    out = work / f"{name}.zarr"
    plan = plan_extraction(ExtractOptions(model=case["model"], batch_size=16, **options))
    run_extraction(plan, out)
    return out


def measure(work: Path) -> list[dict[str, Any]]:
    from rba_store.solve import FitOptions, fit_spans

    rows = []
    for i, case in enumerate(CASES):
        n_sampled = case["tokens"] * case["n"] // (1 + case["k"])
        held = _extract(work, f"{i}-eval", case, split="val", limit=case["eval"])
        stores = {
            "all": (_extract(work, f"{i}-all", case, limit=case["n"]), "all", case["n"]),
            "random": (
                _extract(work, f"{i}-random", case, limit=n_sampled, tokens=f"random:{case['k']}"),
                f"random:{case['k']}",
                n_sampled,
            ),
        }
        for span in case["spans"]:
            row: dict[str, Any] = {"case": case, "span": span}
            for key, (path, tokens, n_images) in stores.items():
                options = FitOptions(
                    spans=(span,), tokens=tokens, eval_store=str(held), backend="numpy"
                )
                d = fit_spans(path, options)[0].diagnostics
                row[key] = (n_images, d["rows"], d["heldout"]["relative_mse"])
            rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        BEGIN,
        "",
        "| model | span | every token of N images: N, rows, held-out rel. MSE | prefix + K random "
        "tokens: K, images, rows, held-out rel. MSE | ratio |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        case, (a, b) = row["case"], row["span"]
        n_all, rows_all, mse_all = row["all"]
        n_rand, rows_rand, mse_rand = row["random"]
        lines.append(
            f"| {case['label']} | {a}:{b} | {n_all}, {rows_all:,}, {mse_all:.3g} | {case['k']}, "
            f"{n_rand}, {rows_rand:,}, {mse_rand:.3g} | {mse_rand / mse_all:.3f} |"
        )
    ratios = [row["random"][2] / row["all"][2] for row in rows]
    better = sum(r < 1 for r in ratios)
    lines += [
        "",
        f"At equal bytes, the maps fitted on K random tokens of more images have the lower "
        f"held-out error in {better} of {len(rows)} spans (ratio {min(ratios):.3f} to "
        f"{max(ratios):.3f})"
        + (
            ": more images carry more independent information than more tokens of the same "
            "images, whose tokens are correlated."
            if better == len(rows)
            else "."
        ),
        "",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work, cpu_threads(default_threads()):
        block = render(measure(Path(work)))
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    if args.check:
        same = text[start:end] == block
        print(block if not same else "README token-budget block is up to date")
        return 0 if same else 1
    README.write_text(text[:start] + block + text[end:])
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
