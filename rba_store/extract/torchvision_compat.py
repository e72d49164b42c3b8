"""Import timm on machines where torchvision does not match the installed torch.

On CPU-only machines the only torchvision wheel that matches a CPU build of torch is built
against CUDA torch; importing it raises ``RuntimeError: operator torchvision::nms does not
exist`` because its C++ extension cannot load, and timm (which imports ``torchvision.ops.misc``)
then fails to import as well. rba-store uses only torchvision's pure-Python parts (through timm's
transforms), so when, and only when, that exact error happens we declare the two operator schemas
the Python code registers fake kernels for, and import again. On a healthy install the first
import succeeds and this module changes nothing.
"""

from __future__ import annotations

import sys
from types import ModuleType

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive for the life of the process
patched = False  # True when the workaround was needed


def _drop_partial_imports() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring its missing operator schemas if its extension is broken."""
    global _library, patched
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        import torch

        _drop_partial_imports()
        if _library is None:
            _library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                _library.define(schema)
        patched = True
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """Import timm (after making torchvision importable); the only way rba-store imports timm."""
    import_torchvision()
    import timm

    return timm
