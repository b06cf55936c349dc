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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib and label_agreement
from benchlib import markdown_table, save_json
from label_agreement import LabelAgreement
from distill.cache import load_cached_teacher
from distill.config import load_recipe
from distill.data import build_loader, dataset_info
from distill.teacher import teacher_from_recipe


@torch.no_grad()
def score_targets(teachers: dict, loader, num_classes: int, ignore_index: int,
                  batches: int | None = None) -> dict:
    """Per teacher: its agreement with the masks (``LabelAgreement``) over the first ``batches``."""
    agreement = {name: LabelAgreement(num_classes, ignore_index) for name in teachers}
    for step, batch in enumerate(loader):
        if batches is not None and step == batches:
            break
        for name, teacher in teachers.items():
            agreement[name].add(teacher(batch), batch["mask"])
    figures = {name: a.figures() for name, a in agreement.items()}
    targets = {name: {key: f[key] for key in ("miou", "pixel_accuracy", "iou", "label_prob_T1")}
               for name, f in figures.items()}
    return {"pixels": next(iter(figures.values()))["pixels"] if figures else 0, "targets": targets}


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
