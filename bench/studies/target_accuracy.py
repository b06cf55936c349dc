"""Benchmark: how right the distillation targets are on the student's own training crops, per class.

A student distilled from a logit store learns, pixel by pixel, the store's maps replayed through
its batch's geometry (scale, crop, flip). Those maps were made once, from the teacher's own frame
(``cache.teacher_resize``, with its test-time augmentation), and kept at ``1/cache.stride``: thin
classes (a pole a few pixels wide) may not survive that. This script runs the student's training
loader (its augmentation, every mask) and scores on the same crops, against their masks:

- ``store``: the replayed store (``teacher.mode: cache``), as the distilled student receives it;
- ``streamed``: the same teacher run on the student's crop itself (its view at the student's
  resolution, one view), as ``teacher.mode: stream`` would give it;

per class IoU, mIoU, pixel accuracy, and the mean probability of the mask's class (T=1).

Usage::

    python bench/studies/target_accuracy.py recipes/camvid/effl2_to_effl0_cpu.yaml \\
        teacher.checkpoint=runs/pretrained/teacher/teacher/last.safetensors \\
        cache.dir=runs/pretrained/cache "cache.teacher_resize=[360,480]" data.root=data/camvid

Results: ``bench/studies/results/target_accuracy.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib
from benchlib import markdown_table, save_json
from distill.cache import load_cached_teacher
from distill.config import load_recipe
from distill.data import build_loader, dataset_info
from distill.metrics import confusion_matrix, scores_from_confusion
from distill.teacher import teacher_from_recipe


@torch.no_grad()
def score_targets(teachers: dict, loader, num_classes: int, ignore_index: int,
                  batches: int | None = None) -> dict:
    """Per teacher: confusion-matrix scores and mean p(label) on the valid pixels of ``batches``."""
    confusion = {name: torch.zeros(num_classes, num_classes, dtype=torch.long) for name in teachers}
    label_prob = dict.fromkeys(teachers, 0.0)
    pixels = 0
    for step, batch in enumerate(loader):
        if batches is not None and step == batches:
            break
        mask = batch["mask"]
        valid = mask != ignore_index
        labels = mask.clamp(0, num_classes - 1).unsqueeze(1)
        for name, teacher in teachers.items():
            logits = teacher(batch).float()
            if logits.shape[-2:] != mask.shape[-2:]:
                logits = torch.nn.functional.interpolate(logits, size=mask.shape[-2:], mode="bilinear",
                                                         align_corners=False)
            confusion[name] += confusion_matrix(logits.argmax(1), mask, num_classes, ignore_index)
            probs = torch.softmax(logits, 1).gather(1, labels).squeeze(1)
            label_prob[name] += float(probs[valid].sum())
        pixels += int(valid.sum())
    results = {}
    for name in teachers:
        scores = scores_from_confusion(confusion[name])
        results[name] = {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy, "iou": scores.iou,
                         "label_prob_T1": label_prob[name] / max(pixels, 1)}
    return {"pixels": pixels, "targets": results}


def measure(recipe, batches: int | None = None) -> dict:
    """The recipe's store (replayed) and streamed teacher scored on its student's training crops."""
    # Every training mask, whatever the recipe's few-labels switch: the masks are the reference.
    data = recipe.data.model_copy(update={"labelled_fraction": 1.0})
    recipe = recipe.model_copy(update={"data": data})
    info = dataset_info(data)
    teachers = {"store": load_cached_teacher(recipe, info.num_classes),
                "streamed": teacher_from_recipe(recipe, info.num_classes, temperature=1.0)}
    loader = build_loader(data, data.train_split, train=True, seed=recipe.train.seed)
    start = time.perf_counter()
    figures = score_targets(teachers, loader, info.num_classes, info.ignore_index, batches)
    return {"class_names": list(info.class_names), "seconds": time.perf_counter() - start, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--batches", type=int, default=None,
                        help="training batches scored (default: one epoch)")
    parser.add_argument("--out", type=Path, default=Path("bench/studies/results/target_accuracy.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    if recipe.teacher is None:
        parser.error(f"{args.recipe} has no teacher section")
    figures = measure(recipe, args.batches)
    results = {"recipe": str(args.recipe), "overrides": args.overrides, "batches": args.batches,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", **figures}
    rows = []
    for name, row in figures["targets"].items():
        rows.append([name, f"{100 * row['miou']:.1f}", f"{100 * row['pixel_accuracy']:.1f}",
                     f"{row['label_prob_T1']:.3f}", *(f"{100 * v:.1f}" for v in row["iou"])])
    print(markdown_table(["targets", "mIoU", "pixel acc.", "p(label)", *figures["class_names"]], rows))
    save_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
