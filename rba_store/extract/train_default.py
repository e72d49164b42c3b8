"""How the embedded default's shipped weights were trained, and a command that re-trains them.

The recipe follows the ViTs users bring (DeiT, AugReg): AdamW (weight decay 0.05, none on biases,
norms, position embedding and class token), linear warm-up then cosine decay per step, label
smoothing 0.1, stochastic depth (``drop_path_rate`` 0.1), gradient clipping at norm 1, batch 32,
60 epochs, seed 0, no augmentation; on the digits train split (1,077 images), chosen among three
recipes by validation accuracy only (see the README). Training is not bit-reproducible across
thread counts (torch's CPU backward sums in thread-dependent order), which is why the weights
are shipped rather than trained on each machine.

    python -m rba_store.extract.train_default --out new.safetensors [--threads 2]

trains with this recipe and compares the result with the shipped weights (sha256, accuracies).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rba_store.extract.default_model import (
    ARCHITECTURE,
    DATA_CONFIG,
    SHIPPED_REPORT,
    SHIPPED_WEIGHTS,
    VisionTransformer,
)

RECIPE: dict[str, Any] = dict(
    seed=0,
    epochs=60,
    batch_size=32,
    lr=1e-3,
    min_lr=1e-5,
    warmup_epochs=5,
    weight_decay=0.05,
    betas=(0.9, 0.999),
    drop_path_rate=0.1,
    label_smoothing=0.1,
    clip_grad_norm=1.0,
    shift=0,  # augmentation: random shifts of up to this many pixels (0: none)
    schedule="per-step linear warm-up, then cosine to min_lr",
    no_weight_decay="biases, LayerNorm, pos_embed, cls_token",
)


def digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A digits split through the extractor's own preprocessing, and its labels."""
    from rba_store.extract.data import DigitsSource, make_preprocess

    source = DigitsSource(split)
    x = source.load(0, len(source), make_preprocess(dict(DATA_CONFIG)))
    return x, torch.from_numpy(source.labels)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = p.ndim <= 1 or name in ("pos_embed", "cls_token") or name.endswith(".bias")
        (no_decay if plain else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pixels`` in both directions, filling with the background."""
    if pixels <= 0:
        return x
    background = (0.0 - DATA_CONFIG["mean"][0]) / DATA_CONFIG["std"][0]
    padded = nn.functional.pad(x, (pixels,) * 4, value=background)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=generator)
    size = x.shape[-1]
    pairs = zip(padded, offsets.tolist(), strict=True)
    return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dy, dx) in pairs])


def train_default_model(recipe: dict[str, Any] = RECIPE) -> tuple[nn.Module, dict[str, Any]]:
    """Train the default from scratch; returns it (eval mode) and a report with accuracies."""
    r = recipe
    x_train, y_train = digits_tensors("train")
    torch.manual_seed(r["seed"])
    model = VisionTransformer(**ARCHITECTURE, drop_path_rate=r["drop_path_rate"])
    optimizer = torch.optim.AdamW(
        _param_groups(model, r["weight_decay"]), lr=r["lr"], betas=tuple(r["betas"])
    )
    per_epoch = math.ceil(len(x_train) / r["batch_size"])
    total, warm = r["epochs"] * per_epoch, r["warmup_epochs"] * per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return r["lr"] * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return r["min_lr"] + 0.5 * (r["lr"] - r["min_lr"]) * (1 + math.cos(math.pi * t))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=r["label_smoothing"])
    generator = torch.Generator().manual_seed(r["seed"])
    step, start = 0, time.perf_counter()
    for _ in range(r["epochs"]):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for first in range(0, len(order), r["batch_size"]):
            idx = order[first : first + r["batch_size"]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            inputs = random_shift(x_train[idx], r["shift"], generator)
            loss = loss_fn(model(inputs), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), r["clip_grad_norm"])
            optimizer.step()
            step += 1
    model.eval()
    report = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "recipe": r,
        "architecture": ARCHITECTURE,
    } | split_accuracies(model)
    return model, report


def split_accuracies(model: nn.Module) -> dict[str, float]:
    """Top-1 accuracy on the train, val and test splits."""
    return {f"{s}_accuracy": accuracy(model, *digits_tensors(s)) for s in ("train", "val", "test")}


def save_weights(model: nn.Module, path: Path) -> str:
    """Write the state dict as safetensors (no metadata: same weights, same bytes); its sha256."""
    from safetensors.torch import save_file

    from rba_store.extract.models import sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return sha256_file(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-train the embedded default; compare.")
    parser.add_argument("--out", type=Path, required=True, help="where the new weights go")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak learning rate")
    parser.add_argument("--shift", type=int, default=0, help="random-shift augmentation (px)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from rba_store.extract.models import sha256_file

    recipe = RECIPE | {"lr": args.lr, "shift": args.shift}
    model, report = train_default_model(recipe)
    report["sha256"] = save_weights(model, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    shipped = VisionTransformer(**ARCHITECTURE)
    shipped.load_state_dict(load_file(SHIPPED_WEIGHTS))
    ours = split_accuracies(shipped)
    same = report["sha256"] == sha256_file(SHIPPED_WEIGHTS)
    print(f"re-trained in {report['train_seconds']} s with {report['torch_threads']} threads")
    for split in ("train", "val", "test"):
        key = f"{split}_accuracy"
        print(f"  {split:<5} accuracy  re-trained {report[key]:.4f}   shipped {ours[key]:.4f}")
    shipped_report = json.loads(SHIPPED_REPORT.read_text())
    if same:
        print("  weights: identical to the shipped ones")
    elif recipe != RECIPE:
        print("  weights: differ from the shipped ones (another recipe: --lr/--shift)")
    else:
        print(
            "  weights: differ from the shipped ones (the shipped file was trained with torch "
            f"{shipped_report['torch']} and {shipped_report['torch_threads']} threads)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
