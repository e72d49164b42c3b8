"""The embedded default: a 12-block ViT trained by rba-store itself on the bundled digits.

timm's ``VisionTransformer`` with 8x8 single-channel inputs, 2x2 patches (16 patch tokens plus a
class token), width 64, 4 heads, MLP ratio 2. It is trained deterministically (seed 0, AdamW,
one-cycle schedule, 30 epochs, batch 32, no augmentation) on the digits training split, through
the same preprocessing the extractor uses, and cached as safetensors. It is registered with timm
as ``rba_digits_vit``, so it is built like any other timm model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rba_store.extract.torchvision_compat import import_timm

logger = logging.getLogger(__name__)

timm = import_timm()
from timm.models import register_model  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

MODEL_NAME = "rba_digits_vit"
ARCHITECTURE: dict[str, Any] = dict(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=12,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)
# Mean and std of the training split's pixels (8-bit images scaled to [0, 1]).
DATA_CONFIG: dict[str, Any] = dict(
    input_size=(1, 8, 8),
    interpolation="bicubic",
    mean=(0.305,),
    std=(0.376,),
    crop_pct=1.0,
    crop_mode="center",
)
TRAINING: dict[str, Any] = dict(
    seed=0, epochs=30, batch_size=32, lr=2e-3, weight_decay=0.05, schedule="one-cycle (10% warm-up)"
)
WEIGHTS_FILE = f"{MODEL_NAME}-seed{TRAINING['seed']}.safetensors"


@register_model
def rba_digits_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The embedded default architecture (weights come from :func:`ensure_default_weights`)."""
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    model = VisionTransformer(**(ARCHITECTURE | kwargs))
    model.pretrained_cfg = dict(
        DATA_CONFIG, architecture=MODEL_NAME, classifier="head", num_classes=model.num_classes
    )
    if pretrained:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ensure_default_weights()))
    return model


def cache_dir() -> Path:
    """Where trained weights are cached: ``$RBA_STORE_CACHE`` or ``~/.cache/rba-store``."""
    return Path(os.environ.get("RBA_STORE_CACHE", Path.home() / ".cache" / "rba-store"))


def _digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from rba_store.extract.data import DigitsSource, make_preprocess

    source = DigitsSource(split)
    x = source.load(0, len(source), make_preprocess(dict(DATA_CONFIG)))
    return x, torch.from_numpy(source.labels)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train_default_model() -> tuple[nn.Module, dict[str, Any]]:
    """Train the default model from scratch; returns it (eval mode) and a training report."""
    seed, epochs, batch = TRAINING["seed"], TRAINING["epochs"], TRAINING["batch_size"]
    torch.manual_seed(seed)
    model = rba_digits_vit()
    x_train, y_train = _digits_tensors("train")
    x_test, y_test = _digits_tensors("test")
    steps_per_epoch = -(-len(x_train) // batch)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=TRAINING["lr"], weight_decay=TRAINING["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=TRAINING["lr"], total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for first in range(0, len(order), batch):
            idx = order[first : first + batch]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.info("epoch %d/%d loss %.4f", epoch + 1, epochs, loss.item())
    report = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "torch_threads": torch.get_num_threads(),
        "training": TRAINING,
        "architecture": ARCHITECTURE,
    }
    return model.eval(), report


def ensure_default_weights() -> Path:
    """Path of the cached default weights, training and caching them on first use."""
    from safetensors.torch import save_file

    path = cache_dir() / WEIGHTS_FILE
    if path.is_file():
        return path
    logger.warning("training the embedded default model (once, about a minute)")
    model, report = train_default_model()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return path


def training_report() -> dict[str, Any] | None:
    """The report written when the cached weights were trained, if any."""
    report = cache_dir() / WEIGHTS_FILE
    report = report.with_suffix(".json")
    return json.loads(report.read_text()) if report.is_file() else None
