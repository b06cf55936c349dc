"""Joint transforms on numpy arrays: exact nearest resize for masks, PIL bilinear for images,
colour jitter for images alone. :class:`distill.data.SegmentationDataset` composes them; the
logit cache replays the same geometry on stored teacher maps."""

from __future__ import annotations

import numpy as np
from PIL import Image

_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL uses


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes to ``size`` (H, W).

    Output pixel ``i`` samples input pixel ``floor((i + 0.5) * in / out)``, computed exactly in
    integers (torch's ``nearest-exact`` computes the same in float32 and can differ by one pixel
    where the product lands exactly on a pixel border).
    """
    (in_h, in_w), (out_h, out_w) = array.shape[:2], size
    if (in_h, in_w) == (out_h, out_w):
        return array
    rows = (2 * np.arange(out_h) + 1) * in_h // (2 * out_h)
    cols = (2 * np.arange(out_w) + 1) * in_w // (2 * out_w)
    return array[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases.
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter of a float [0, 1] RGB image (in that order)."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    image = image * np.float32(brightness)
    mean = float((image @ _GREY).mean()) if image.size else 0.0
    image = (image - mean) * np.float32(contrast) + mean
    grey = (image @ _GREY)[..., None]
    image = grey + (image - grey) * np.float32(saturation)
    return np.clip(image, 0.0, 1.0)
