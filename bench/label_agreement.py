"""How far a model's logits agree with the masks, accumulated batch by batch on the valid pixels.

Shared by the studies that score a teacher's targets (``studies/teacher_confidence.py``,
``studies/target_accuracy.py``): one place for the resize to the mask, the confusion matrix and
the probability given to the mask's class.
"""

from __future__ import annotations

import torch

from distill.metrics import confusion_matrix, scores_from_confusion


class LabelAgreement:
    """Running agreement of logits with masks: argmax scores, p(label) at T=1 and T, entropy at T.

    Args:
        num_classes: the dataset's classes.
        ignore_index: the mask value of void pixels, left out of every figure.
        temperature: the softening temperature of ``label_prob_T``, ``other_mass_T`` and ``entropy_T``.
    """

    def __init__(self, num_classes: int, ignore_index: int, temperature: float = 1.0) -> None:
        self.num_classes, self.ignore_index, self.temperature = num_classes, ignore_index, temperature
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.pixels, self.label_prob_t1, self.label_prob_t, self.entropy_t = 0, 0.0, 0.0, 0.0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """Count one batch: ``logits`` (N, C, h, w) are resized bilinearly to ``mask``'s (N, H, W)."""
        logits = logits.float()
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits, size=mask.shape[-2:], mode="bilinear",
                                                     align_corners=False)
        valid = mask != self.ignore_index
        labels = mask.clamp(0, self.num_classes - 1).unsqueeze(1)
        self.confusion += confusion_matrix(logits.argmax(1), mask, self.num_classes, self.ignore_index)
        self.label_prob_t1 += float(torch.softmax(logits, 1).gather(1, labels).squeeze(1)[valid].sum())
        log_p = torch.log_softmax(logits / self.temperature, dim=1)
        self.label_prob_t += float(log_p.gather(1, labels).squeeze(1).exp()[valid].sum())
        self.entropy_t += float(-(log_p.exp() * log_p).sum(1)[valid].sum())
        self.pixels += int(valid.sum())

    def figures(self) -> dict:
        """Pixels counted, mIoU, per-class IoU, pixel accuracy, and the means over valid pixels."""
        count = max(self.pixels, 1)
        scores = scores_from_confusion(self.confusion)
        return {"pixels": self.pixels, "miou": scores.miou, "iou": scores.iou,
                "pixel_accuracy": scores.pixel_accuracy, "label_prob_T1": self.label_prob_t1 / count,
                "label_prob_T": self.label_prob_t / count, "other_mass_T": 1 - self.label_prob_t / count,
                "entropy_T": self.entropy_t / count}
