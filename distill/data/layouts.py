"""Dataset layouts behind :mod:`distill.data`: where files live, how labels map, class metadata.

Each *source* lists its samples once (sorted, paired, checked) and loads one sample as raw arrays:
``image`` uint8 [H, W, 3] RGB and ``mask`` int64 [H, W] already mapped to train ids, with void
pixels set to ``ignore_index``. Augmentation and batching live in :mod:`distill.data`; the public
names here (``DataError`` and the source classes) are re-exported from there. Reading and pairing
files is :mod:`distill.data.files`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill.data.files import (
    IMAGE_SUFFIXES,
    BadFileError,
    DataError,
    Palette,
    label_colormap,
    list_files,
    pair_by_key,
    read_oriented_image,
    read_label,
    unmatched_message,
)

__all__ = ["ADE20K", "BadFileError", "CamVid", "Cityscapes", "DataError", "FileSource", "ImageFolder",
           "PascalVOC", "Palette", "label_colormap"]

logger = logging.getLogger(__name__)


class FileSource:
    """Base class of the on-disk datasets: a sorted list of (image, mask) file pairs.

    Subclasses set ``CLASS_NAMES``/``PALETTE``, list their pairs in ``_pairs`` and describe their
    label encoding in ``_label_table`` (raw value -> train id, ignore_index, or -1 = invalid).
    ``class_names`` is used by :class:`ImageFolder` only (elsewhere names are renamed by
    :func:`distill.data.dataset_info`, which needs no files).
    """

    CLASS_NAMES: tuple[str, ...] = ()
    PALETTE: Palette = []

    def __init__(self, root: Path, split: str, *, ignore_index: int,
                 max_samples: int | None = None, class_names: Sequence[str] | None = None):
        self.root = Path(root)
        self.split = split
        self.ignore_index = ignore_index
        if not self.root.is_dir():
            tried = "" if self.root.is_absolute() else f" (tried '{self.root.absolute()}')"
            raise DataError(f"data.root '{self.root}' does not exist or is not a folder{tried}")
        self.pairs = self._pairs()[:max_samples]
        self._table = self._label_table(ignore_index)

    def _pairs(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def _label_table(self, ignore_index: int) -> np.ndarray:
        raise NotImplementedError

    def _valid_description(self) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_id(self, index: int) -> str:
        """A stable name for sample ``index`` (its image path relative to the root)."""
        return self.pairs[index][0].relative_to(self.root).as_posix()

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw sample: uint8 RGB image [H, W, 3] and int64 train-id mask [H, W]."""
        image_path, mask_path = self.pairs[index]
        image, turned = read_oriented_image(image_path)
        raw = read_label(mask_path)
        if raw.shape != image.shape[:2]:
            after = " (after its EXIF orientation, which distill applies)" if turned else ""
            raise DataError(
                f"image '{image_path}' is {image.shape[1]}x{image.shape[0]} (WxH){after} but its "
                f"mask '{mask_path}' is {raw.shape[1]}x{raw.shape[0]}"
            )
        if turned and not _warned_about_orientation:
            _warn_about_orientation(image_path, mask_path)
        return image, self._map(raw, mask_path)

    def _map(self, raw: np.ndarray, path: Path) -> np.ndarray:
        # One table lookup maps and validates at once: invalid raw values become -1, so two cheap
        # reductions (max of the raw values, min of the mapped ones) catch every bad pixel.
        table = self._table
        low, high = int(raw.min()), int(raw.max())
        if low >= 0 and high < len(table):
            mapped = table[raw]
            if int(mapped.min()) >= 0:
                return mapped
        values = np.unique(raw)
        bad = [int(v) for v in values if not (0 <= v < len(table)) or table[v] < 0]
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"mask '{path}' has label values [{shown}] that are {self._valid_description()}"
        )


class CamVid(FileSource):
    """CamVid in the SegNet layout (11 classes; label 11 is void).

    Layout::

        root/{split}/*.png          RGB images
        root/{split}annot/*.png     8-bit label maps of the same file names (0..10 classes, 11 void)
    """

    CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence",
                   "car", "pedestrian", "bicyclist")
    PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
               (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
               (0, 128, 192)]

    def _pairs(self) -> list[tuple[Path, Path]]:
        image_dir, mask_dir = self.root / self.split, self.root / f"{self.split}annot"
        images = list_files(image_dir, IMAGE_SUFFIXES, f"CamVid split '{self.split}' image")
        masks = list_files(mask_dir, (".png",), f"CamVid split '{self.split}' annotation")
        return pair_by_key(images, masks, image_dir, mask_dir)

    def _label_table(self, ignore_index: int) -> np.ndarray:
        table = np.full(256, -1, dtype=np.int64)
        table[:11] = np.arange(11)
        table[11] = ignore_index
        return table

    def _valid_description(self) -> str:
        return "neither classes 0..10 nor the void value 11"


# Cityscapes labelId -> trainId (the 19 evaluated classes); every other id 0..33 is void.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


class Cityscapes(FileSource):
    """Cityscapes fine annotations, labelIds mapped to the 19 train ids.

    Layout::

        root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
        root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png

    Label ids 0..33 are valid; those outside the 19 train classes become ``ignore_index``.
    """

    CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
                   "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                   "truck", "bus", "train", "motorcycle", "bicycle")
    PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
               (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
               (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
               (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]

    def _pairs(self) -> list[tuple[Path, Path]]:
        image_dir = self.root / "leftImg8bit" / self.split
        mask_dir = self.root / "gtFine" / self.split
        images = [p for p in list_files(image_dir, (".png",), "Cityscapes image")
                  if p.name.endswith("_leftImg8bit.png")]
        masks = [p for p in list_files(mask_dir, (".png",), "Cityscapes annotation")
                 if p.name.endswith("_gtFine_labelIds.png")]
        if not images:
            raise DataError(f"Cityscapes image folder '{image_dir}' has no *_leftImg8bit.png files")
        if not masks:
            raise DataError(f"Cityscapes annotation folder '{mask_dir}' has no "
                            "*_gtFine_labelIds.png files")
        return pair_by_key(images, masks, image_dir, mask_dir,
                           "_leftImg8bit.png", "_gtFine_labelIds.png")

    def _label_table(self, ignore_index: int) -> np.ndarray:
        table = np.full(256, -1, dtype=np.int64)
        table[:34] = ignore_index
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            table[label_id] = train_id
        return table

    def _valid_description(self) -> str:
        return "not Cityscapes label ids (0..33)"


# The 150 SceneParsing classes in label order (label k+1 is class k), as in the ADE20K
# benchmark's objectInfo150 short names used by mmsegmentation and most codebases.
ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
assert len(ADE20K_CLASS_NAMES) == 150


class ADE20K(FileSource):
    """ADE20K SceneParsing (150 classes; label 0 is "other" and ignored, k -> class k-1).

    Layout (``root`` may be ``ADEChallengeData2016`` itself or the folder that contains it)::

        root/ADEChallengeData2016/images/{training,validation}/*.jpg
        root/ADEChallengeData2016/annotations/{training,validation}/*.png

    Split names ``train``/``val`` mean ``training``/``validation``.
    """

    CLASS_NAMES = ADE20K_CLASS_NAMES
    PALETTE = label_colormap(151)[1:]  # deterministic; skips black, which reads as "unlabelled"
    SPLITS = {"train": "training", "val": "validation"}

    def _pairs(self) -> list[tuple[Path, Path]]:
        base = self.root / "ADEChallengeData2016"
        base = base if base.is_dir() else self.root
        split = self.SPLITS.get(self.split, self.split)
        image_dir, mask_dir = base / "images" / split, base / "annotations" / split
        images = list_files(image_dir, IMAGE_SUFFIXES, f"ADE20K split '{split}' image")
        masks = list_files(mask_dir, (".png",), f"ADE20K split '{split}' annotation")
        return pair_by_key(images, masks, image_dir, mask_dir)

    def _label_table(self, ignore_index: int) -> np.ndarray:
        table = np.full(256, -1, dtype=np.int64)
        table[0] = ignore_index
        table[1:151] = np.arange(150)
        return table

    def _valid_description(self) -> str:
        return "outside 0..150 (0 = unlabelled, 1..150 = classes)"


class PascalVOC(FileSource):
    """Pascal VOC 2012 segmentation (21 classes incl. background; 255 = void).

    Layout (``root`` is ``VOC2012``, or contains ``VOCdevkit/VOC2012`` or ``VOC2012``)::

        root/JPEGImages/{id}.jpg
        root/SegmentationClass/{id}.png        palette PNGs; the palette indices are the labels
        root/ImageSets/Segmentation/{split}.txt one id per line
    """

    CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
                   "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
                   "pottedplant", "sheep", "sofa", "train", "tvmonitor")
    PALETTE = label_colormap(21)

    def _base(self) -> Path:
        for candidate in (self.root / "VOCdevkit" / "VOC2012", self.root / "VOC2012"):
            if candidate.is_dir():
                return candidate
        return self.root

    def _pairs(self) -> list[tuple[Path, Path]]:
        base = self._base()
        listing = base / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not listing.is_file():
            raise DataError(f"VOC split list '{listing}' does not exist")
        ids = sorted({line.split()[0] for line in listing.read_text().splitlines() if line.strip()})
        if not ids:
            raise DataError(f"VOC split list '{listing}' is empty")
        image_dir, mask_dir = base / "JPEGImages", base / "SegmentationClass"
        pairs = [(image_dir / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
        no_image = [p.name for p, _ in pairs if not p.is_file()]
        no_mask = [m.name for _, m in pairs if not m.is_file()]
        problems = []
        if no_image:
            problems.append(unmatched_message(f"ids of '{listing.name}' without an image", no_image,
                                       image_dir))
        if no_mask:
            problems.append(unmatched_message(f"ids of '{listing.name}' without a mask", no_mask,
                                       mask_dir))
        if problems:
            raise DataError("; ".join(problems))
        return pairs

    def _label_table(self, ignore_index: int) -> np.ndarray:
        table = np.full(256, -1, dtype=np.int64)
        table[:21] = np.arange(21)
        table[255] = ignore_index
        return table

    def _valid_description(self) -> str:
        return "neither classes 0..20 nor the void value 255"


class ImageFolder(FileSource):
    """Any image/mask folder pair; classes come from ``data.class_names``.

    Layout::

        root/images/{split}/{stem}.{png,jpg,jpeg,bmp,tif,webp}
        root/masks/{split}/{stem}.png     one class index per pixel (8- or 16-bit)

    Mask values are 0..num_classes-1 or ``ignore_index``; anything else is an error.
    """

    def __init__(self, root: Path, split: str, *, ignore_index: int,
                 max_samples: int | None = None, class_names: Sequence[str] | None = None):
        if not class_names:
            raise DataError("dataset 'folder' needs data.class_names")
        self.CLASS_NAMES = tuple(class_names)
        self.PALETTE = label_colormap(len(class_names))
        super().__init__(root, split, ignore_index=ignore_index, max_samples=max_samples)

    def _pairs(self) -> list[tuple[Path, Path]]:
        image_dir, mask_dir = self.root / "images" / self.split, self.root / "masks" / self.split
        images = list_files(image_dir, IMAGE_SUFFIXES, f"split '{self.split}' image")
        masks = list_files(mask_dir, (".png",), f"split '{self.split}' mask")
        return pair_by_key(images, masks, image_dir, mask_dir)

    def _label_table(self, ignore_index: int) -> np.ndarray:
        size = min(max(256, ignore_index + 1, len(self.CLASS_NAMES)), 1 << 16)
        table = np.full(size, -1, dtype=np.int64)
        table[: len(self.CLASS_NAMES)] = np.arange(len(self.CLASS_NAMES))
        if ignore_index < size:
            table[ignore_index] = ignore_index
        return table

    def _valid_description(self) -> str:
        return (f"neither classes 0..{len(self.CLASS_NAMES) - 1} nor ignore_index "
                f"{self.ignore_index}")


_warned_about_orientation = False


def _warn_about_orientation(image_path: Path, mask_path: Path) -> None:
    """Once per process (each loader worker is one): a mirrored or upside-down photo keeps its
    size, so a mask drawn on the stored pixels instead of the photo as viewers show it cannot be
    told from a right one."""
    global _warned_about_orientation
    _warned_about_orientation = True
    logger.warning("image '%s' carries an EXIF orientation, which distill applies as viewers do; "
                   "its mask '%s' (and those of other such images) must be drawn on the image as "
                   "viewers show it, not on the stored pixels", image_path, mask_path)
