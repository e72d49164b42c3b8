"""Import timm on machines where torchvision does not match the installed torch.

On CPU-only machines the only torchvision wheel that matches a CPU build of torch is built
against CUDA torch; importing it raises ``RuntimeError: operator torchvision::nms does not
exist`` because its C++ extension cannot load, and timm (which imports ``torchvision.ops.misc``)
then fails to import as well. rba-store uses only torchvision's pure-Python parts (through timm's
transforms), so when, and only when, that exact error happens we declare the two operator schemas
the Python code registers fake kernels for, and import again. On a healthy install the first
import succeeds and this module changes nothing.

The fix itself lives in :mod:`rba_store._torchvision_hook`, which the installed package also
applies to every ``import torchvision`` of its environment (a ``.pth`` file), so that users'
own scripts can import timm too. Where that hook is active the first import here already
succeeds; this module is rba-store's own guarantee where it is not (``.pth`` files not read).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from rba_store import _torchvision_hook

_library: Any = None  # the torch.library.Library declaring the schemas, when this module made it
patched = False  # True when the workaround was needed here


def _drop_partial_imports() -> None:
    sys.modules.pop("torchvision", None)
    _torchvision_hook.drop_submodules()


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring its missing operator schemas if its extension is broken."""
    global _library, patched
    try:
        import torchvision
    except RuntimeError as e:
        if not _torchvision_hook.is_missing_operator_error(e):
            raise
        _drop_partial_imports()
        _library = _torchvision_hook.declare_missing_operators()
        patched = True
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """Import timm (after making torchvision importable); the only way rba-store imports timm."""
    import_torchvision()
    import timm

    return timm
