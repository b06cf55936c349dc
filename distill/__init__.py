"""distill: knowledge distillation for semantic segmentation."""

from distill._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
