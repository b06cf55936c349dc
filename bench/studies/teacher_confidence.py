"""Benchmark: how much a teacher's soft labels say beyond the masks, on the frames it trained on
and on the frames held out from training.

Distillation teaches through the mass a teacher puts on other classes than the label. A teacher
that had fitted its training frames would put almost none there: its softened targets on those
frames would be nearly the one-hot masks, teaching little that CE on the same masks does not.
This script measures whether that is so, per split, on valid pixels (the eval transform):

- pixel accuracy and mIoU of the teacher's argmax against the mask;
- the mean probability of the mask's class at T=1 and at the loss's temperature T (one-hot: 1);
- the mean mass on other classes than the mask's at T, and the mean entropy at T in nats
  (one-hot: 0).

Usage::

    python bench/studies/teacher_confidence.py recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml \\
        teacher.checkpoint=runs/xseq/teacher/last.safetensors data.root=data/camvid

The splits are the recipe's ``data.train_split`` (without the held-out group, every mask kept, as
the teacher stage trains) and ``data.val_split``. Results: ``bench/studies/results/teacher_confidence.json`` and a table on stdout.
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
from distill.config import load_recipe
from distill.data import build_loader, dataset_info
from distill.teacher import teacher_from_recipe


@torch.no_grad()
def split_confidence(teacher: torch.nn.Module, loader, num_classes: int, ignore_index: int,
                     temperature: float) -> dict:
    """The figures of the module docstring over every valid pixel of ``loader``'s batches."""
    agreement = LabelAgreement(num_classes, ignore_index, temperature)
    for batch in loader:
        agreement.add(teacher(batch), batch["mask"])
    figures = agreement.figures()
    del figures["iou"]
    return {"images": len(loader.dataset), **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--temperature", type=float, default=None,
                        help="the softening temperature (default: the recipe's loss.temperature)")
    parser.add_argument("--out", type=Path, default=Path("bench/studies/results/teacher_confidence.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()  # options may stand between the recipe and the overrides
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    if recipe.teacher is None:
        parser.error(f"{args.recipe} has no teacher section")
    temperature = args.temperature or recipe.loss.temperature
    info = dataset_info(recipe.data)
    teacher = teacher_from_recipe(recipe, info.num_classes, temperature=1.0)
    # Every training image with its mask, as the teacher stage trains (the few-labels switch is
    # the students'); images without masks have nothing to compare with.
    data = recipe.data.model_copy(update={"labelled_fraction": 1.0})
    splits = {"train": data.train_split, "held_out": data.val_split}
    results: dict = {"recipe": str(args.recipe), "overrides": args.overrides, "temperature": temperature,
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "splits": {}}
    for name, split in splits.items():
        start = time.perf_counter()
        loader = build_loader(data, split, train=False, seed=recipe.train.seed)
        figures = split_confidence(teacher, loader, info.num_classes, info.ignore_index, temperature)
        results["splits"][name] = {"split": split, **figures, "seconds": time.perf_counter() - start}
        print(f"{name} ({split}): {figures['images']} images, {time.perf_counter() - start:.0f} s", flush=True)
    rows = [[name, s["split"], s["images"], f"{100 * s['miou']:.1f}", f"{100 * s['pixel_accuracy']:.1f}",
             f"{s['label_prob_T1']:.3f}", f"{s['label_prob_T']:.3f}", f"{s['other_mass_T']:.3f}",
             f"{s['entropy_T']:.3f}"] for name, s in results["splits"].items()]
    print()
    print(markdown_table(["frames", "split", "images", "mIoU", "pixel acc.", "p(label), T=1",
                          f"p(label), T={temperature:g}", f"mass on other classes, T={temperature:g}",
                          f"entropy (nats), T={temperature:g}"], rows))
    save_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
