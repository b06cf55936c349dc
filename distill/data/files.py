"""Image and mask files: reading, pairing by name, and the errors that name the file.

The lowest layer of the data path: :mod:`distill.data.layouts` lists a layout's pairs with these,
:mod:`distill.data.unlabelled` reads plain image folders with them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Palette = list[tuple[int, int, int]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset folder, file or label is unusable; the message names the file and the value."""


class BadFileError(DataError):
    """An image or mask file cannot be decoded (corrupt or truncated); skippable."""

    def __init__(self, message: str, path: str = "") -> None:
        # One positional argument, so DataLoader workers can re-raise it with its own type.
        super().__init__(message)
        self.path = path


def label_colormap(count: int) -> Palette:
    """The Pascal VOC bit-interleaving colour map: ``count`` distinct, deterministic colours."""
    colours = []
    for index in range(count):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((red, green, blue))
    return colours


def unmatched_message(kind: str, names: Sequence[str], folder: Path) -> str:
    shown = ", ".join(sorted(names)[:5])
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return f"{len(names)} {kind} in '{folder}': {shown}{more}"


def list_files(folder: Path, suffixes: Sequence[str], what: str) -> list[Path]:
    """Sorted files of ``folder`` (recursively) ending in one of ``suffixes``; never empty."""
    if not folder.is_dir():
        raise DataError(f"{what} folder '{folder}' does not exist")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not found:
        raise DataError(f"{what} folder '{folder}' has no {'/'.join(suffixes)} files")
    return found


def _stem_key(folder: Path, suffix: str = "") -> Callable[[Path], str]:
    """Key of a file: its path under ``folder`` without the extension (and without ``suffix``)."""

    def key(path: Path) -> str:
        relative = path.relative_to(folder).as_posix()
        if suffix and relative.endswith(suffix):
            return relative[: -len(suffix)]
        return relative.rsplit(".", 1)[0]

    return key


def pair_by_key(
    images: list[Path], masks: list[Path], image_dir: Path, mask_dir: Path,
    image_suffix: str = "", mask_suffix: str = "",
) -> list[tuple[Path, Path]]:
    """Pair image and mask files by relative path stem; any file left alone is an error."""
    image_key, mask_key = _stem_key(image_dir, image_suffix), _stem_key(mask_dir, mask_suffix)
    repeated = [k for k, n in Counter(map(image_key, images)).items() if n > 1]
    if repeated:
        raise DataError(unmatched_message("names with several images (e.g. .jpg and .png)", repeated,
                                   image_dir))
    by_image = {image_key(p): p for p in images}
    by_mask = {mask_key(p): p for p in masks}
    lonely_images = [by_image[k].name for k in by_image.keys() - by_mask.keys()]
    lonely_masks = [by_mask[k].name for k in by_mask.keys() - by_image.keys()]
    problems = []
    if lonely_images:
        problems.append(unmatched_message(f"images without a mask (looked in '{mask_dir}')",
                                   lonely_images, image_dir))
    if lonely_masks:
        problems.append(unmatched_message(f"masks without an image (looked in '{image_dir}')",
                                   lonely_masks, mask_dir))
    if problems:
        raise DataError("; ".join(problems))
    return [(by_image[key], by_mask[key]) for key in sorted(by_image)]


def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` as uint8 RGB [H, W, 3] exactly as ``distill predict`` reads images: EXIF
    orientation applied (as viewers and annotation tools show the photo), grey, palette and
    alpha images converted, 16-bit and float grayscale scaled by their range, not clipped."""
    return read_oriented_image(path)[0]


def read_oriented_image(path: Path) -> tuple[np.ndarray, bool]:
    """:func:`read_image`, and whether an EXIF orientation turned or mirrored the photo."""
    # The deployed student must see what it trained on: one decoder for both. predict.py
    # imports nothing from distill (it runs beside an export, without torch), so it is the owner.
    from distill.export.predict import PredictError
    from distill.export.predict import read_oriented_image as read_as_viewers_show

    try:
        image, turned = read_as_viewers_show(path)
    except PredictError as error:
        reason = str(error).replace(f"image '{path}' ", "", 1).replace("predict ", "distill ")
        raise BadFileError(f"cannot read '{path}': {reason}", str(path)) from None
    return np.asarray(image, dtype=np.uint8), turned


def read_label(path: Path) -> np.ndarray:
    """Decode a single-channel label map (modes L, P, 1, I;16, I) as an integer array."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mode, array = mask.mode, np.asarray(mask)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadFileError(f"cannot read '{path}' (corrupt or truncated?): {error}",
                           str(path)) from None
    if array.ndim != 2:
        raise DataError(f"mask '{path}' has mode {mode}; expected one channel of class indices "
                        "(PIL mode L, P or 16-bit), not colours")
    return array if array.dtype == np.uint8 else array.astype(np.int64)
