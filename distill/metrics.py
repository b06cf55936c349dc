"""Segmentation metrics from a confusion matrix: IoU per class, mIoU, pixel accuracy.

IoU is computed over the whole split (intersection and union summed over every image first), not
averaged per image. mIoU is the mean over the classes that occur in the labels or the predictions;
a class absent from both has no IoU (NaN) and is left out rather than counted as 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _valid_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    labels = target[valid]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
        raise ValueError(
            f"label values {bad} are outside 0..{num_classes - 1} and not ignore_index {ignore_index}"
        )
    return valid


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Confusion matrix ``[num_classes, num_classes]`` (rows: label, columns: prediction)."""
    valid = _valid_labels(target, num_classes, ignore_index)
    codes = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(codes, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_sample_confusion(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """One flattened confusion matrix per sample, ``[B, num_classes**2]``.

    Why per sample: Accelerate pads the last evaluation batch with duplicated samples, and only
    ``gather_for_metrics`` knows which to drop. Gathering small per-sample matrices (instead of
    full-resolution predictions, or a per-process sum that would count duplicates twice) keeps the
    multi-process result exactly equal to the single-process one.
    """
    batch = target.shape[0]
    valid = _valid_labels(target, num_classes, ignore_index)
    sample = torch.arange(batch, device=target.device).view(batch, *([1] * (target.dim() - 1)))
    sample = sample.expand_as(target)
    codes = (sample * num_classes + target.clamp(min=0)) * num_classes + prediction
    counts = torch.bincount(codes[valid].long(), minlength=batch * num_classes**2)
    return counts.reshape(batch, num_classes**2)


@dataclass
class SegmentationScores:
    """Scores of one evaluation."""

    miou: float
    pixel_accuracy: float
    iou: list[float]  # per class; NaN where the class is absent from labels and predictions
    confusion: torch.Tensor

    def as_dict(self, class_names: list[str] | None = None) -> dict[str, object]:
        names = class_names or [str(i) for i in range(len(self.iou))]
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "iou": {n: (None if v != v else v) for n, v in zip(names, self.iou)},
            "confusion": self.confusion.tolist(),
        }


def scores_from_confusion(confusion: torch.Tensor) -> SegmentationScores:
    """IoU per class, mIoU (over classes present) and pixel accuracy from a confusion matrix."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)
    present = union > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = confusion.sum()
    pixel_accuracy = float(true_positive.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(miou, pixel_accuracy, iou.tolist(), confusion.long())


def _predict_at_label_size(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Argmax of the logits at each mask's own size, in a tensor shaped like the padded masks.

    Each sample's logits are first cut to its frame (the batch pads smaller images at the
    bottom/right; a model with an output stride pads proportionally less), then resized.
    """
    mask = batch["mask"]
    sizes = batch.get("label_size", torch.tensor([mask.shape[-2:]] * mask.shape[0]))
    frames = batch["geometry"]["base_size"] if "geometry" in batch else sizes
    if bool((frames == frames[0]).all()) and bool((sizes == sizes[0]).all()):
        rows = [slice(None)]  # one frame and one label size: the whole batch at once
    else:
        rows = [slice(row, row + 1) for row in range(mask.shape[0])]
    prediction = torch.zeros_like(mask)
    in_h, in_w = batch["image"].shape[-2:] if "image" in batch else logits.shape[-2:]
    for row in rows:
        first = row.start or 0
        h, w = (int(v) for v in frames[first])
        lh, lw = (int(v) for v in sizes[first])
        part = logits[row, :, : -(-h * logits.shape[-2] // in_h), : -(-w * logits.shape[-1] // in_w)]
        if part.shape[-2:] != (lh, lw):
            part = torch.nn.functional.interpolate(part.float(), size=(lh, lw), mode="bilinear",
                                                   align_corners=False)
        prediction[row, :lh, :lw] = part.argmax(1)
    return prediction


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator,
    *,
    num_classes: int,
    ignore_index: int,
    progress_label: str | None = None,
) -> SegmentationScores:
    """Evaluate ``model`` on a prepared loader, summing confusion matrices across processes.

    Logits are resized (bilinear) to each label's own size before the argmax when they differ,
    so a model is scored at the label's resolution whatever its input size or output stride.
    """
    from distill.models import forward_padded
    from distill.progress import track  # late import: rich is only needed here for the bar

    was_training = model.training
    model.eval()
    total = torch.zeros(num_classes**2, dtype=torch.long, device=accelerator.device)
    for batch in track(loader, progress_label, enabled=accelerator.is_main_process):
        with accelerator.autocast():
            logits = forward_padded(model, batch["image"])
        mask = batch["mask"]
        counts = per_sample_confusion(_predict_at_label_size(logits, batch), mask, num_classes,
                                      ignore_index)
        total += accelerator.gather_for_metrics(counts).sum(0)
    model.train(was_training)
    return scores_from_confusion(total.cpu().reshape(num_classes, num_classes))
