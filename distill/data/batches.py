"""Collating samples into distill's batch dict (its keys: see :mod:`distill.data`).

Distill's own items carry their augmentation's geometry; a user dataset's ``(image, mask)``
pairs or dicts get an identity geometry, so the same loop and cache replay take both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


def collate_batch(items: list[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Stack items into a batch dict; images of different sizes are padded at the bottom/right.

    Padding is 0 in the (normalised) image and ``ignore_index`` in the mask, so evaluation of
    datasets without ``data.resize`` (e.g. ADE20K) works; ``build_loader`` binds the recipe's value.
    """
    height = max(item["image"].shape[1] for item in items)
    width = max(item["image"].shape[2] for item in items)
    images = torch.zeros(len(items), 3, height, width, dtype=torch.float32)
    # Masks are padded on their own: at the label's resolution they need not match the image.
    mask_h = max(item["mask"].shape[0] for item in items)
    mask_w = max(item["mask"].shape[1] for item in items)
    masks = torch.full((len(items), mask_h, mask_w), ignore_index, dtype=torch.int64)
    for row, item in enumerate(items):
        _, h, w = item["image"].shape
        images[row, :, :h, :w] = item["image"]
        masks[row, : item["mask"].shape[0], : item["mask"].shape[1]] = item["mask"]
    geometry = {key: torch.stack([item["geometry"][key] for item in items])
                for key in items[0]["geometry"]}
    extra: dict[str, Any] = {}
    if any("kd_mask" in item for item in items):  # a batch with unlabelled images (else: the masks)
        extra["kd_mask"] = torch.full_like(masks, ignore_index)
        for row, item in enumerate(items):
            kd = item.get("kd_mask", item["mask"])
            extra["kd_mask"][row, : kd.shape[0], : kd.shape[1]] = kd
    return {
        "image": images,
        "mask": masks,
        "label_size": torch.stack([item["label_size"] for item in items]),
        **extra,
        "labelled": torch.tensor([bool(item.get("labelled", True)) for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
        "geometry": geometry,
    }


class Indexed(Dataset):
    """A dataset of the caller's whose items come with their index (``(index, item)``), so that
    a batch names its samples, as distill's own datasets do (a non-finite loss names them).
    Other attributes (``set_epoch``...) are the wrapped dataset's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # Not `dataset` before it is set (unpickling in a worker), nor protocol methods: a
        # `__getitems__` (torch's Subset, Hugging Face datasets) would hand back unindexed items.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _as_item(item: Any, index: int = -1) -> dict[str, Any]:
    """A user dataset's item as distill's: ``(image, mask)`` pairs or dicts without geometry
    (``index``: its place in the dataset, where the item does not say)."""
    if isinstance(item, (tuple, list)):
        item = {"image": item[0], "mask": item[1]}
    if "geometry" in item:
        return item
    image, mask = torch.as_tensor(item["image"]), torch.as_tensor(item["mask"]).long()
    frame = tuple(image.shape[-2:])
    return {"image": image, "mask": mask, "label_size": torch.tensor(mask.shape[-2:]),
            "index": int(item.get("index", index)),
            "geometry": {"base_size": torch.tensor(frame), "scaled_size": torch.tensor(frame),
                         "scale": torch.tensor(1.0), "crop_box": torch.tensor((0, 0, *frame)),
                         "flip": torch.tensor(False)}}


def collate_user_items(items: list[Any], ignore_index: int = 255, indexed: bool = True) -> dict[str, Any]:
    """A batch of a dataset of the caller's as distill's batches: :class:`Indexed` items
    (``indexed``), or a stream's items as they come."""
    pairs = items if indexed else [(-1, item) for item in items]
    return collate_batch([_as_item(item, index) for index, item in pairs], ignore_index)
