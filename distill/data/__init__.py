"""Datasets, joint transforms and loaders: recipe ``data`` section -> batches.

A batch is a dict ``{image, mask, index, geometry}``:

- ``image`` float32 [B, 3, H, W], RGB in [0, 1] normalised with ``data.mean``/``data.std``;
- ``mask`` int64 [B, H, W], classes ``0..num_classes-1`` and ``data.ignore_index``; for
  evaluation at the label's resolution (``eval.resolution: label``) each mask keeps its file's
  size, padded with ``ignore_index`` to the batch's largest, and ``label_size`` [B, 2] gives it;
- ``index`` int64 [B], each sample's index in its dataset;
- ``geometry`` the joint geometric transform of every sample, so that teacher logits stored for
  the un-augmented image can be replayed onto the batch:
  ``base_size`` [B, 2] (H, W after ``data.resize``: the un-augmented frame), ``scaled_size``
  [B, 2] (after the random rescale by ``scale`` [B]), ``crop_box`` [B, 4] (top, left, height,
  width in the scaled frame; it may run past the bottom/right edge, where image pixels are 0
  and labels ``ignore_index``) and ``flip`` [B] (horizontal flip, applied after the crop).
  Items of different sizes are padded into a batch at the bottom/right (eval without resize).

Replaying the geometry on an array ``x`` of the base frame: resize to ``scaled_size``, take
``x[top:top+height, left:left+width]`` padding where the box leaves the array, then flip. Masks
use exact "nearest-exact" sampling (source ``floor((i + 0.5) * in / out)``, see
:func:`resize_nearest`); images are resized by PIL bilinear with antialiasing.

Augmentation randomness is a pure function of ``(seed, epoch, index)``, so a resumed run sees the
same augmentations whatever the number of workers. Call ``dataset.set_epoch(epoch)`` before each
epoch: the epoch lives in shared memory, so the loader's persistent workers (kept alive between
epochs, which saves seconds of worker start-up per epoch) see it. After ``accelerator.prepare``
call it on ``loader.dataset`` directly: Accelerate's ``loader.set_epoch`` skips the dataset when
its sampler has a ``set_epoch`` of its own.
"""

# The public names load on first use: the recipe's schema (distill.config) reads this package's
# layouts and selectors, which need neither torch nor the loaders, and `distill predict` imports
# distill.config without torch.
from __future__ import annotations

from distill._lazy import lazy_attributes

_PUBLIC = {
    "SegmentationDataset": "distill.data.loaders",
    "build_dataset": "distill.data.loaders",
    "build_loader": "distill.data.loaders",
    "loader_for_dataset": "distill.data.loaders",
    "collate_batch": "distill.data.loaders",
    "resize_image": "distill.data.loaders",
    "resize_nearest": "distill.data.loaders",
    "DataError": "distill.data.files",
    "DatasetInfo": "distill.data.labels",
    "dataset_info": "distill.data.labels",
}
__all__ = list(_PUBLIC)

__getattr__ = lazy_attributes("distill.data", _PUBLIC)
