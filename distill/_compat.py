"""Let torchvision's pure-Python parts import when its C++ extension cannot load.

Why this exists: on CPU-only machines the only torchvision wheel that matches torch 2.13 is a
CUDA build. Its ``_C.so`` links ``libtorch_cuda.so``, which the CPU torch does not ship, so the
extension fails to load (torchvision only warns) and ``import torchvision`` then dies in
``_meta_registrations.py`` with ``operator torchvision::nms does not exist``. timm and
segmentation-models-pytorch import torchvision, so nothing works.

The fix is narrow: if, and only if, the extension cannot be loaded, declare the schemas of the two
ops that file needs (``nms`` and ``qnms``) before torchvision is imported. Models, transforms and
the pure-Python ops then work; C++-only ops (``nms``, ``torchvision.io`` decoders) still raise
their own errors when called, which distill never does (images are decoded with PIL).
Where torchvision is healthy, or already imported, this does nothing.

``import distill`` only installs :class:`_BeforeTorchvision`, an import hook that runs the check
the first time anything imports torchvision, so that ``import distill`` itself (and ``distill
predict``, which needs only onnxruntime) imports no torch.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library: Any = None  # a torch.library.Library, kept alive: dropping it unregisters the ops
shim_applied = False


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    package_dir = Path(spec.origin).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.exists():
            return candidate
    return None


def _extension_loads(path: Path) -> bool:
    try:
        ctypes.CDLL(str(path))  # the same call torch.ops.load_library makes; harmless if it works
    except OSError:
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Declare torchvision's ``nms``/``qnms`` schemas when its C++ extension cannot load."""
    global _shim_library, shim_applied
    if "torchvision" in sys.modules or shim_applied:
        return
    path = _extension_path()
    if path is None or _extension_loads(path):
        return
    import torch

    if hasattr(torch.ops.torchvision, "nms"):  # someone else already declared them
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        library.define(schema)
    _shim_library = library
    shim_applied = True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_importable` just before the first ``import torchvision``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)  # first: the check itself looks torchvision up
            ensure_torchvision_importable()
        return None  # the normal finders import it


PTH_NAME = "distill-torchvision-compat.pth"
# A .pth line that starts with `import` runs at every interpreter start-up: it installs the hook
# (cheap: no torch import) so that programs that import timm before distill, such as the
# `accelerate` console script, import torchvision too. Silent where distill is not importable;
# DISTILL_NO_STARTUP_HOOK=1 turns it off (a process that must not import distill at all).
PTH_LINE = ('import os; exec("try:\\n from distill._compat import install_torchvision_hook as h; h()'
            '\\nexcept Exception:\\n pass") if not os.environ.get("DISTILL_NO_STARTUP_HOOK") else None\n')


def needs_hook() -> bool:
    """True where torchvision is installed but its C++ extension cannot load."""
    path = _extension_path()
    return path is not None and not _extension_loads(path)


def install_pth(site_packages: Path) -> Path:
    """Write the start-up hook's ``.pth`` file into ``site_packages`` and return its path."""
    target = Path(site_packages) / PTH_NAME
    target.write_text(PTH_LINE)
    return target


def install_torchvision_hook() -> None:
    """Arrange for the check to run before torchvision is first imported (no torch import now)."""
    if "torchvision" in sys.modules or any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())



def install_startup_hook_if_needed() -> str:
    """What ``make`` runs after installing: the ``.pth`` hook where torchvision needs it."""
    import sysconfig

    if not needs_hook():
        return "torchvision imports normally here: no start-up hook needed"
    return f"torchvision's extension cannot load here: wrote {install_pth(Path(sysconfig.get_paths()['purelib']))}"

