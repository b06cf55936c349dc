"""What a dataset's labels are: class names, the void value and a palette, from the layout alone.

Below :mod:`distill.config` (which checks class counts against it) and :mod:`distill.data`
(which re-exports it): it reads no image and knows no recipe beyond the ``data`` section's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from distill.data.layouts import (
    ADE20K,
    CamVid,
    Cityscapes,
    DataError,
    FileSource,
    ImageFolder,
    PascalVOC,
    label_colormap,
)
from distill.data.synthetic import SyntheticShapes



class DataValues(Protocol):
    """What :func:`dataset_info` reads of a recipe's ``data`` section (a ``DataConfig``)."""

    dataset: str
    class_names: list[str] | None
    ignore_index: int
    synthetic: Any  # .num_classes

FILE_SOURCES: dict[str, type[FileSource]] = {
    "camvid": CamVid, "cityscapes": Cityscapes, "ade20k": ADE20K, "voc": PascalVOC,
    "folder": ImageFolder,
}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset's labels."""

    num_classes: int
    class_names: list[str]
    ignore_index: int
    palette: list[tuple[int, int, int]]  # one RGB colour per class


def dataset_info(data: DataValues) -> DatasetInfo:
    """Classes, ignore value and palette of ``data.dataset``, without reading any image.

    Raises:
        DataError: ``data.class_names`` has the wrong length for the dataset.
    """
    if data.dataset == "synthetic":
        names = SyntheticShapes.class_names(data.synthetic.num_classes)
        palette = SyntheticShapes.palette(data.synthetic.num_classes)
    elif data.dataset == "folder":
        if not data.class_names:
            raise DataError("dataset 'folder' needs data.class_names")
        names = list(data.class_names)
        palette = label_colormap(len(names))
    else:
        source = FILE_SOURCES[data.dataset]
        names, palette = list(source.CLASS_NAMES), list(source.PALETTE)
    if data.class_names is not None and len(data.class_names) != len(names):
        raise DataError(
            f"data.class_names has {len(data.class_names)} names but dataset '{data.dataset}' "
            f"has {len(names)} classes"
        )
    if data.class_names is not None:
        names = list(data.class_names)
    if data.ignore_index < len(names):
        raise DataError(
            f"data.ignore_index {data.ignore_index} is a class of dataset '{data.dataset}' "
            f"(classes 0..{len(names) - 1}); choose a value outside, e.g. 255"
        )
    return DatasetInfo(len(names), names, data.ignore_index, palette)
