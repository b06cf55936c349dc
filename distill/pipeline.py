"""``distill run``: every stage a recipe asks for, in order, skipping what is already done.

Stages: ``teacher`` (when the recipe gives no teacher checkpoint), ``baseline`` (the student
without a teacher, when ``run.baseline``), ``student`` (distilled). A stage is done when its
folder holds ``done.json`` whose fingerprint matches what the stage would be made from now (its
part of the recipe, and for the student the teacher's weights); otherwise it is run again, and
resumed from its last checkpoint when one exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from distill._io import atomic_write_text, file_digest
from distill.config import Recipe
from distill.progress import console
from distill.teacher import teacher_checkpoint
from distill.train import Stage, train


@dataclass
class StageOutcome:
    stage: str
    status: str  # "trained", "resumed" or "up to date"
    seconds: float
    best_miou: float
    run_dir: Path


def stage_fingerprint(recipe: Recipe, stage: Stage) -> str:
    """Hash of everything a stage's result depends on."""
    parts: dict[str, object] = {
        "data": recipe.data.model_dump(mode="json"),
        "train": recipe.train.model_dump(mode="json", exclude={"resume", "log_every_steps", "trackers"}),
    }
    if stage == "teacher":
        parts["model"] = recipe.teacher.model_dump(mode="json") if recipe.teacher else None
    else:
        parts["model"] = recipe.student_model.model_dump(mode="json")
    if stage == "student" and recipe.distills:
        parts["loss"] = recipe.loss.model_dump(mode="json")
        parts["teacher"] = file_digest(teacher_checkpoint(recipe))
    elif stage != "teacher":
        parts["loss"] = recipe.loss.model_dump(mode="json", include={"ce_weight", "class_weights"})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def planned_stages(recipe: Recipe) -> list[Stage]:
    """The stages ``distill run`` goes through for this recipe."""
    stages: list[Stage] = []
    if recipe.teacher is not None and recipe.teacher.checkpoint is None and recipe.distills:
        stages.append("teacher")
    if recipe.run.baseline and recipe.distills:
        stages.append("baseline")
    stages.append("student")
    return stages


def run_pipeline(recipe: Recipe) -> list[StageOutcome]:
    """Run (or skip, or resume) each planned stage, then print a summary."""
    outcomes = []
    main = int(os.environ.get("RANK", "0")) == 0  # before any Accelerator exists
    for stage in planned_stages(recipe):
        run_dir = Path(recipe.output_dir) / stage
        fingerprint = stage_fingerprint(recipe, stage)
        done_file = run_dir / "done.json"
        if done_file.is_file():
            done = json.loads(done_file.read_text())
            if done.get("fingerprint") == fingerprint:
                outcomes.append(StageOutcome(stage, "up to date", 0.0, done["best_miou"], run_dir))
                continue
        latest = run_dir / "checkpoints" / "latest"
        resumable = latest.is_dir() and _checkpoint_fingerprint(latest) == fingerprint
        stage_recipe = recipe.model_copy(deep=True)
        stage_recipe.train.resume = latest if resumable else None
        if not resumable and main:
            for stale in ("metrics.jsonl", "best.json", "done.json"):
                (run_dir / stale).unlink(missing_ok=True)
        start = time.perf_counter()
        result = train(stage_recipe, stage, fingerprint=fingerprint)
        seconds = time.perf_counter() - start
        if main:
            atomic_write_text(done_file, json.dumps(
                {"fingerprint": fingerprint, "best_miou": result.best_miou, "steps": result.steps,
                 "seconds": seconds}, indent=2))
        outcomes.append(StageOutcome(stage, "resumed" if resumable else "trained", seconds,
                                     result.best_miou, run_dir))
    if main:
        console.print(summary_table(outcomes))
    return outcomes


def _checkpoint_fingerprint(folder: Path) -> str | None:
    progress = folder / "progress.json"
    if not progress.is_file():
        return None
    return json.loads(progress.read_text()).get("fingerprint")


def summary_table(outcomes: list[StageOutcome]) -> Table:
    """Stages with their time, best val mIoU and folder; plus the share of the gap KD recovered."""
    table = Table(title="distill run")
    for column in ("stage", "status", "time", "best val mIoU", "outputs"):
        table.add_column(column, justify="right" if column in ("time", "best val mIoU") else "left")
    for o in outcomes:
        table.add_row(o.stage, o.status, f"{o.seconds:.0f} s", f"{100 * o.best_miou:.1f}", str(o.run_dir))
    by_stage = {o.stage: o.best_miou for o in outcomes}
    if {"teacher", "baseline", "student"} <= by_stage.keys():
        gap = by_stage["teacher"] - by_stage["baseline"]
        gain = by_stage["student"] - by_stage["baseline"]
        recovered = f"{100 * gain / gap:.0f}% of the teacher/baseline gap" if gap > 0 else "no gap to recover"
        table.caption = f"distillation gain {100 * gain:+.1f} mIoU points: {recovered}"
    return table
