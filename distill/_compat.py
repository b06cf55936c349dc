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
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops
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
    if hasattr(torch.ops.torchvision, "nms"):  # someone else already declared them
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        library.define(schema)
    _shim_library = library
    shim_applied = True
