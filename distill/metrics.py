"""Segmentation metrics from a confusion matrix: IoU per class, mIoU, pixel accuracy.

IoU is computed over the whole split (intersection and union summed over every image first), not
averaged per image. mIoU is the mean over the classes that occur in the labels or the predictions;
a class absent from both has no IoU (NaN) and is left out rather than counted as 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.models import ModelError


def _valid_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    labels = target[valid]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
        raise ValueError(
            f"label values {bad} are outside 0..{num_classes - 1} and not ignore_index {ignore_index}"
        )
    return valid


def _check_predictions(prediction: torch.Tensor, num_classes: int) -> None:
    """A class id past the last would be counted in the next label's row (or sample's)."""
    if prediction.numel() and int(prediction.max()) >= num_classes:
        raise ModelError(f"the model predicts class {int(prediction.max())}, outside the dataset's "
                         f"{num_classes} classes (0..{num_classes - 1}): its head has more outputs than "
                         "the dataset has classes (data.class_names, or data.synthetic.num_classes)")


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Confusion matrix ``[num_classes, num_classes]`` (rows: label, columns: prediction)."""
    _check_predictions(prediction, num_classes)
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
    _check_predictions(prediction, num_classes)
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
