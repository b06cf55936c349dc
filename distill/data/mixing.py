"""CutMix for segmentation batches: a box of another image of the batch pasted in, its masks with it.

Why it matters to distillation: on its own training images a teacher that has nearly learnt
them by heart says little more than their masks do, so the KD term adds little beyond the CE.
A pasted box makes an image that no model was trained on; a streamed teacher, run on the mixed
batch itself, shows the student how it behaves there (function matching: Beyer et al. 2022,
"Knowledge distillation: a good teacher is patient and consistent"; CutMix as the perturbation
for segmentation: French et al. 2020). The masks are cut with the image, so the CE stays exact
and a baseline trains on the same mixed batches.

A cached teacher cannot follow: its logits are of the unmixed images (the recipe refuses it).
"""

from __future__ import annotations

from typing import Any

import torch

# Keys of distill's batch dict cut like the image: one value per pixel of the training crop.
_PIXEL_KEYS = ("image", "mask", "kd_mask")


def cutmix(batch: dict[str, Any], probability: float, generator: torch.Generator) -> dict[str, Any]:
    """A copy of ``batch`` where each image, with ``probability``, gets a box of another image.

    The box's area is a uniform fraction of the crop (CutMix's Beta(1, 1)), its aspect the
    crop's, its centre uniform (the box is clipped at the border); the partner is another image
    of the same batch. ``mask`` (and ``kd_mask``, with unlabelled images) are cut the same way,
    so a pasted piece of an unlabelled image stays unlabelled. Batches of one image pass as they are.

    Args:
        batch: distill's batch dict (:mod:`distill.data`); images and masks of the same size.
        probability: the chance that an image is mixed, in [0, 1].
        generator: the random source (CPU), so that a run can be repeated.
    """
    images = batch["image"]
    count, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    if count < 2 or probability <= 0:
        return batch
    for key in _PIXEL_KEYS[1:]:
        if key in batch and tuple(batch[key].shape[-2:]) != (height, width):
            raise ValueError(f"cutmix: batch['{key}'] is {tuple(batch[key].shape[-2:])}, its images "
                             f"{(height, width)}: training masks must match their crops")
    mixed = torch.rand(count, generator=generator) < probability
    if not mixed.any():
        return batch
    # A shift in [1, count - 1] of the batch order: every image's partner is another image.
    shift = int(torch.randint(1, count, (1,), generator=generator))
    side = torch.rand(count, generator=generator).sqrt()  # box side / crop side, area uniform
    centre_y = torch.rand(count, generator=generator) * height
    centre_x = torch.rand(count, generator=generator) * width
    out = {**batch, **{key: batch[key].clone() for key in _PIXEL_KEYS if key in batch}}
    for row in mixed.nonzero().flatten().tolist():
        partner = (row + shift) % count
        half_h, half_w = side[row] * height / 2, side[row] * width / 2
        top, bottom = int((centre_y[row] - half_h).clamp(0, height)), int((centre_y[row] + half_h).clamp(0, height))
        left, right = int((centre_x[row] - half_w).clamp(0, width)), int((centre_x[row] + half_w).clamp(0, width))
        for key in _PIXEL_KEYS:
            if key in batch:
                out[key][row, ..., top:bottom, left:right] = batch[key][partner, ..., top:bottom, left:right]
    return out
