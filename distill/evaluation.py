"""``distill eval``: score a trained checkpoint on a split, print a table, write JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from distill._splits import file_safe
from distill.config import Recipe, atomic_write_text
from distill.data import build_loader, dataset_info
from distill.metrics import SegmentationScores, evaluate
from distill.models import build_model, stage_weights
from distill.progress import console
from distill.teacher import with_teacher_normalization
from distill.train import Stage, make_accelerator, stage_model


def default_checkpoint(recipe: Recipe, stage: Stage) -> Path:
    """``eval.checkpoint`` (``checkpoint=PATH``), else the stage's trained weights."""
    if recipe.eval.checkpoint is not None:
        return Path(recipe.eval.checkpoint)
    return stage_weights(recipe, stage)


def evaluate_checkpoint(recipe: Recipe, stage: Stage = "student") -> tuple[SegmentationScores, Path]:
    """Evaluate a stage's checkpoint on ``recipe.eval_split``; returns the scores and JSON path."""
    checkpoint = default_checkpoint(recipe, stage)
    accelerator = make_accelerator(recipe)
    info = dataset_info(recipe.data)
    spec = stage_model(recipe, stage).model_copy(update={"checkpoint": checkpoint, "encoder_weights": None})
    model = build_model(spec, info.num_classes)
    if stage == "teacher":  # an external teacher may expect its own mean/std (teacher.mean/std)
        model = with_teacher_normalization(model, recipe)
    loader = build_loader(recipe.data, recipe.eval_split, train=False, seed=recipe.train.seed,
                          label_resolution=recipe.eval.resolution == "label")
    model, loader = accelerator.prepare(model, loader)
    scores = evaluate(
        model, loader, accelerator, num_classes=info.num_classes, ignore_index=info.ignore_index,
        progress_label=f"eval {stage} on {recipe.eval_split}",
    )
    out = Path(recipe.output_dir) / stage / f"eval_{file_safe(recipe.eval_split)}.json"
    if accelerator.is_main_process:
        report = {"stage": stage, "split": recipe.eval_split, "checkpoint": str(checkpoint),
                  **scores.as_dict(info.class_names)}
        atomic_write_text(out, json.dumps(report, indent=2))
        console.print(scores_table(scores, info.class_names, f"{stage} on {recipe.eval_split}"))
        console.print(f"wrote {out}")
    return scores, out


def scores_table(scores: SegmentationScores, class_names: list[str], title: str) -> Table:
    """A rich table: IoU per class, then mIoU and pixel accuracy."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in zip(class_names, scores.iou):
        table.add_row(name, "absent" if value != value else f"{100 * value:.1f}")
    table.add_section()
    table.add_row("[bold]mIoU", f"[bold]{100 * scores.miou:.1f}")
    table.add_row("pixel accuracy", f"{100 * scores.pixel_accuracy:.1f}")
    return table
