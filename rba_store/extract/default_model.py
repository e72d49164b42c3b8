"""The embedded default: a 12-block ViT trained by rba-store on the bundled digits, shipped.

timm's ``VisionTransformer`` with 8x8 single-channel inputs, 2x2 patches (16 patch tokens plus a
class token), width 64, 4 heads, MLP ratio 2. Its weights ship inside the package
(``weights/rba_digits_vit.safetensors``), so every machine extracts from the same bits; the
training code that made them is :mod:`rba_store.extract.train_default`. It is registered with
timm as ``rba_digits_vit``, so it is built like any other timm model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rba_store.extract.torchvision_compat import import_timm

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
SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_NAME}.safetensors"
SHIPPED_REPORT = SHIPPED_WEIGHTS.with_suffix(".json")


@register_model
def rba_digits_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The embedded default architecture (``pretrained=True``: the shipped weights)."""
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


def ensure_default_weights() -> Path:
    """Path of the shipped default weights (installed with the package)."""
    from rba_store.errors import ModelError

    if not SHIPPED_WEIGHTS.is_file():
        raise ModelError(
            f"the embedded default's weights {str(SHIPPED_WEIGHTS)!r} are missing from this "
            "install; reinstall rba-store, or re-train them with "
            "'python -m rba_store.extract.train_default --out FILE' and pass --checkpoint FILE"
        )
    return SHIPPED_WEIGHTS
