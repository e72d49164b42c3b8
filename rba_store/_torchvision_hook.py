"""Make ``import torchvision`` work where its compiled operators do not match torch (CPU machines).

On CPU-only machines the only torchvision wheel that matches a CPU build of torch 2.13
(torchvision 0.28.0) is built against CUDA torch: its C++ extension cannot load, and importing
it raises ``RuntimeError: operator torchvision::nms does not exist`` (its Python code registers
fake kernels for operators the extension should have declared). timm imports
``torchvision.ops.misc`` at module level, so ``import timm`` fails too.

The fix, applied when, and only when, that exact error happens: drop the half-imported
``torchvision*`` modules, declare the two missing operator schemas (``torchvision::nms`` and
``torchvision::qnms``) with ``torch.library.Library("torchvision", "DEF")``, and run torchvision's
``__init__`` again. torchvision's pure-Python parts (transforms, ``ops.misc``) and timm then work;
the compiled operators themselves (``torchvision.ops.nms`` ...) still do not. On a healthy install
the first import succeeds and nothing is declared.

The package installs this for every interpreter of its environment, so that a user's own
``import timm`` or ``import torchvision`` works as well as rba-store's: the wheel (and the
editable install, ``pip install -e .``) puts ``rba_store_torchvision_hook.pth`` into
site-packages, whose one line calls :func:`install`. :func:`install` imports nothing but the
standard library: it puts a finder at the front of ``sys.meta_path`` that does nothing until
``torchvision`` itself is imported, then wraps that one import and removes itself. torch is
imported only if torchvision's import fails with the error above. Where ``.pth`` files are not
read (a folder on ``PYTHONPATH``, e.g. from ``pip install --target``) there is no hook; rba-store
itself does not rely on it (:mod:`rba_store.extract.torchvision_compat` applies the same fix to
its own imports).
"""

from __future__ import annotations

import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

# Imported at every interpreter start-up (the .pth file): only modules Python has loaded already
# (importlib.abc and typing would add ~20 ms), hence duck-typed classes below.

MISSING_OPERATOR = "operator torchvision::nms does not exist"
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: object = None  # the torch.library.Library declaring SCHEMAS, kept alive for the process
# Module attributes the import system sets; everything else is torchvision's own and is cleared
# before its __init__ runs again.
_IMPORT_ATTRS = frozenset(
    {"__name__", "__doc__", "__package__", "__loader__", "__spec__", "__path__", "__file__"}
    | {"__cached__", "__builtins__"}
)


def is_missing_operator_error(error: BaseException) -> bool:
    """Whether ``error`` is the failure this module works around (and nothing else)."""
    return isinstance(error, RuntimeError) and MISSING_OPERATOR in str(error)


def declare_missing_operators() -> object:
    """Declare the operator schemas the broken extension should have declared (once a process)."""
    global _library
    if _library is None:
        import torch

        library = torch.library.Library("torchvision", "DEF")
        for schema in SCHEMAS:
            library.define(schema)
        _library = library
    return _library


def drop_submodules() -> None:
    """Forget the ``torchvision.*`` submodules a failed import left in ``sys.modules``."""
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]


class _RetryingLoader:
    """torchvision's own loader, run once more after declaring the operators if it fails so."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        uninstall()  # the import is happening: later imports are Python's own
        try:
            self.loader.exec_module(module)
        except RuntimeError as e:
            if not is_missing_operator_error(e):
                raise
            drop_submodules()
            for name in [k for k in module.__dict__ if k not in _IMPORT_ATTRS]:
                del module.__dict__[name]
            declare_missing_operators()
            self.loader.exec_module(module)

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


class TorchvisionFinder:
    """A ``sys.meta_path`` finder that acts on the import of ``torchvision`` only: it wraps
    torchvision's loader, which steps the finder aside when the import runs. A mere look-up
    (``importlib.util.find_spec("torchvision")``, as transformers does before importing it)
    leaves the finder in place for the import that follows."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if isinstance(finder, TorchvisionFinder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None  # not installed: the usual ModuleNotFoundError
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RetryingLoader(spec.loader)  # type: ignore[assignment]
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` unless torchvision is imported already."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionFinder())


def uninstall() -> None:
    """Remove the finder (the next ``import torchvision`` is Python's own)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TorchvisionFinder)]
