"""``distill run``: every stage a recipe asks for, in order, skipping what is already done.

Stages: ``teacher`` (when the recipe gives no teacher checkpoint), ``cache`` (when
``teacher.mode`` is ``cache``), ``baseline`` (the student without a teacher, when
``run.baseline``), ``student`` (distilled), ``compare`` and ``export`` (when ``run.compare`` /
``run.export``; export first when it writes an INT8 student, which compare then scores). A stage is done when its folder holds ``done.json`` whose fingerprint matches
what the stage would be made from now (its part of the recipe and the weights it reads);
otherwise it runs again, and a training stage resumes from its last checkpoint of the same inputs.
The logit store keeps its own fingerprint: ``write_cache`` skips a store that is up to date and
resumes one that was interrupted. Before the first stage runs, every local input and every
planned training stage's own refusals (a batch its data cannot fill, a warm-up that never ends)
are checked, so that a refusal never comes after an earlier stage was redone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from distill._checkpoint import CheckpointMismatch, CheckpointUnreadable
from distill._io import atomic_write_text, file_digest
from distill.config import Recipe, changes_output
from distill.data import DataError
from distill.launch import TrainingError, is_launch_main
from distill.models import STAGES, ModelError
from distill.fingerprint import digest, stage_inputs
from distill.preflight import InputError, check_inputs
from distill.progress import console
from distill.run_folder import PROGRESS_FILE, StageFiles, cache_dir, stage_dir, stage_files
from distill.stage_weights import teacher_digest
from distill.training import check_models, check_schedule, train

TRAINING_STAGES = STAGES


@dataclass
class StageOutcome:
    """One stage of a ``distill run``: what happened, how long it took, what it produced."""

    stage: str
    status: str  # "trained", "resumed", "done" or "up to date"
    seconds: float
    best_miou: float | None
    outputs: Path


def stage_fingerprint(recipe: Recipe, stage: str) -> str:
    """Hash of everything a stage's result depends on (and nothing that only changes the run)."""
    if stage in TRAINING_STAGES:
        return digest(stage_inputs(recipe, stage))
    # compare and export read trained weights: their fingerprint is those weights' bytes. The
    # export reads the student's alone (a recipe that does not distil has no teacher weights to
    # hash); the comparison every model it scores.
    reads = TRAINING_STAGES if stage == "compare" else ("student",)
    weights = {name: file_digest(stage_files(recipe, name).best)
               for name in reads if stage_files(recipe, name).best.is_file()}
    if stage == "compare" and recipe.teacher is not None:
        weights["teacher"] = teacher_digest(recipe)
    if recipe.eval.checkpoint is not None:
        weights["eval.checkpoint"] = file_digest(recipe.eval.checkpoint)
    # With an INT8 export the comparison scores the export's ONNX students too.
    reads_export = stage == "export" or "onnx_int8" in recipe.export.formats
    sections = ("data", "eval", "export") if reads_export else ("data", "eval")
    parts = {"weights": weights, "mixed_precision": recipe.train.mixed_precision,
             **{k: getattr(recipe, k).model_dump(mode="json") for k in sections}}
    if stage == "compare" and recipe.teacher is not None:  # how the teacher is run and read
        parts["teacher"] = recipe.teacher.model_dump(mode="json", include={
            name for name, field in type(recipe.teacher).model_fields.items() if changes_output(field)})
    return digest(parts)


def planned_stages(recipe: Recipe) -> list[str]:
    """The stages ``distill run`` goes through for this recipe, in order."""
    stages: list[str] = []
    if recipe.distills and not recipe.teacher.external:
        stages.append("teacher")
    if recipe.distills and recipe.teacher.mode == "cache":
        stages.append("cache")
    if recipe.run.baseline and recipe.distills:
        stages.append("baseline")
    stages.append("student")
    teacher_weights = recipe.teacher is not None and (recipe.teacher.external or "teacher" in stages)
    if recipe.run.compare and teacher_weights:
        stages.append("compare")
    if recipe.run.export:
        # An INT8 export comes first: the comparison then sets it beside the FP32 student.
        stages.insert(len(stages) - 1 if "onnx_int8" in recipe.export.formats and "compare" in stages
                      else len(stages), "export")
    return stages


def run_pipeline(recipe: Recipe) -> list[StageOutcome]:
    """Run (or skip, or resume) each planned stage, then print a summary table."""
    for key, resume in (("train.resume", recipe.train.resume), ("teacher_train.resume", recipe.teacher_train.get("resume"))):
        if resume is not None:
            raise InputError(f"{key} is for `distill train`: `distill run` resumes each stage from its "
                             "own checkpoints (<output_dir>/<stage>/checkpoints/latest); leave it unset")
    if recipe.eval.checkpoint is not None:  # compare and export would score and ship that file
        raise InputError("eval.checkpoint is for `distill eval`, `compare` and `export` of other weights: "
                         "`distill run` scores and exports the student it trains; leave it unset")
    stages = planned_stages(recipe)
    # Every local problem now, not stage by stage.
    check_inputs(recipe, needs_teacher_weights=False, planned=stages)
    # Every stage's own refusals too, before the first one (re)trains anything: a refusal of the
    # students must not come after the teacher was redone.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # The baseline too when only compare reads it (run.baseline false): its weights must be there.
    read = [s for s in TRAINING_STAGES if s in stages or (s == "baseline" and "compare" in stages)]
    _recover_killed_runs(recipe, read, trained=[s for s in stages if s in TRAINING_STAGES])
    for stage in stages:
        if stage in TRAINING_STAGES:
            try:
                check_schedule(recipe, stage, processes)  # type: ignore[arg-type]
                if not _up_to_date(recipe, stage):  # (a given teacher is loaded to be checked)
                    check_models(recipe, stage)  # type: ignore[arg-type]
            except (DataError, ModelError, TrainingError) as error:
                raise type(error)(f"the {stage} stage: {error}") from None
        elif stage == "cache":  # cache.dir onto a folder of other files: before the teacher is redone
            from distill.cache.store import check_store_folder

            check_store_folder(cache_dir(recipe), recipe.cache.splits)
    main = is_launch_main()
    outcomes = []
    for stage in stages:
        start = time.perf_counter()
        if stage == "cache":
            from distill.cache import write_cache

            manifest = cache_dir(recipe) / "manifest.json"  # what the store holds, split by split
            before = manifest.read_bytes() if manifest.is_file() else None
            store = write_cache(recipe)  # up-to-date stores are skipped, interrupted ones resumed
            status = "up to date" if before is not None and manifest.read_bytes() == before else "done"
            outcomes.append(StageOutcome(stage, status, time.perf_counter() - start, None, store))
            continue
        folder = stage_dir(recipe, stage)
        fingerprint = stage_fingerprint(recipe, stage)
        if _up_to_date(recipe, stage, fingerprint):
            done = _read_done(StageFiles(folder).done)
            outcomes.append(StageOutcome(stage, "up to date", 0.0, done.get("best_miou"), folder))
            continue
        if stage in TRAINING_STAGES:
            status, best_miou = _train_stage(recipe, stage, fingerprint, main)
        else:
            status, best_miou = "done", _report_stage(recipe, stage, main)
        seconds = time.perf_counter() - start
        # Decided alike on every process (each has best_miou), so that none goes on alone.
        no_best = best_miou is None or not best_miou >= 0
        if stage in TRAINING_STAGES and (no_best or (main and _weights_digest(folder) is None)):
            raise TrainingError(f"the {stage} stage ended without {StageFiles(folder).best}: "
                                "not recorded as done (no validation scored a finite mIoU?)")
        if main:
            # The weights' hash too: a later `distill train` into the same folder makes it stale.
            atomic_write_text(StageFiles(folder).done, json.dumps(
                {"fingerprint": fingerprint, "weights": _weights_digest(folder), "best_miou": best_miou,
                 "seconds": seconds}, indent=2))
        outcomes.append(StageOutcome(stage, status, seconds, best_miou, folder))
    if main:
        console.print(summary_table(outcomes))
    return outcomes


def _resumable(recipe: Recipe, stage: str, files: StageFiles) -> bool:
    """Whether ``files`` holds a checkpoint made from the stage's current inputs."""
    checkpoint = files.resumable_checkpoint()
    if checkpoint is None:
        return False
    try:
        return _read_done(checkpoint / PROGRESS_FILE).get("fingerprint") == stage_fingerprint(recipe, stage)
    except (DataError, ModelError, TrainingError, OSError):  # e.g. the teacher's weights are missing
        return False


def _recover_killed_runs(recipe: Recipe, stages: list[str], trained: list[str]) -> None:
    """Give back the finished run that a run killed before its first validation set aside, so that
    a stage it had finished is up to date again (and compare and export find its weights).

    The main process does it under each folder's lock; no Accelerator (and so no barrier)
    exists yet, so the others wait until the folders show no such leftovers.
    """
    from distill.run_folder import exclusive_folder

    # A killed run of a stage this run trains, checkpointed with the stage's inputs, is resumed by
    # _train_stage (and drops the finished run once validated); any other gives the finished run back.
    leftovers = [files for stage, files in ((stage, stage_files(recipe, stage)) for stage in stages)
                 if files.killed_run_left() and not (stage in trained and _resumable(recipe, stage, files))]
    if not leftovers:
        return
    if is_launch_main():
        for files in leftovers:
            with exclusive_folder(files.folder):
                if files.recover_killed_run():
                    console.print(f"[yellow]{files.folder}: a run killed before its first validation had set "
                                  "the last finished run aside; it is back in place")
        return
    deadline = time.monotonic() + 120
    while not all(files.settled() for files in leftovers) and time.monotonic() < deadline:
        time.sleep(0.2)


def _read_done(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _up_to_date(recipe: Recipe, stage: str, fingerprint: str | None = None) -> bool:
    """Whether ``done.json`` records this stage as made from the same inputs, with the weights
    now in its folder (a stage whose inputs are not there yet, a teacher to train, is not)."""
    folder = stage_dir(recipe, stage)
    done = _read_done(StageFiles(folder).done)
    if not done:
        return False
    try:
        fingerprint = fingerprint or stage_fingerprint(recipe, stage)
    except ModelError:  # e.g. the teacher's weights, which an earlier stage writes
        return False
    return done.get("fingerprint") == fingerprint and done.get("weights") == _weights_digest(folder)


def _train_stage(recipe: Recipe, stage: str, fingerprint: str, main: bool) -> tuple[str, float]:
    folder = stage_dir(recipe, stage)
    checkpoint = StageFiles(folder).resumable_checkpoint()
    progress = _read_done(checkpoint / PROGRESS_FILE) if checkpoint else {}
    resumable = progress.get("fingerprint") == fingerprint
    stage_recipe = recipe.model_copy(deep=True)
    stage_recipe.train.resume = checkpoint if resumable else None
    # A fresh start drops what an older run of other inputs left, once its first step has run.
    try:
        result = train(stage_recipe, stage, fingerprint=fingerprint)  # type: ignore[arg-type]
    except CheckpointMismatch as error:
        # Inputs the fingerprint does not hold changed since the kill (the images in an
        # unlabelled folder, the number of processes): nothing was written; start the stage anew.
        if not resumable:
            raise
        lines = str(error).split("\n  - ")
        why = lines[1] if len(lines) > 1 else lines[0].split("' ", 1)[-1][:300]  # after train.resume 'PATH'
        if main:
            console.print(f"[yellow]the {stage} stage's checkpoint was made from other inputs "
                          f"({why}): it trains from the start")
        stage_recipe.train.resume, resumable = None, False
        result = train(stage_recipe, stage, fingerprint=fingerprint)  # type: ignore[arg-type]
    except CheckpointUnreadable as error:
        # Damaged files are not retrained over unasked (a disk or network share may come back);
        # `distill run` takes no train.resume, so say what to delete.
        if not resumable:
            raise
        raise TrainingError(f"the {stage} stage's checkpoint '{error.folder}' cannot be read ({error.reason}): "
                            "restore it, or delete it and `distill run` trains the stage from the start") from None
    return ("resumed" if resumable else "trained"), result.best_miou


def _weights_digest(folder: Path) -> str | None:
    best = StageFiles(folder).best
    return file_digest(best) if best.is_file() else None


def _report_stage(recipe: Recipe, stage: str, main: bool) -> float | None:
    if stage == "compare":  # collective: every process evaluates its share
        from distill.comparison import compare

        report = compare(recipe, recipe.eval_split)
        return report.get("models", {}).get("student", {}).get("miou")
    if main:  # one export, not one per process
        from distill.export import export_student

        export_student(recipe)
    return None


def summary_table(outcomes: list[StageOutcome]) -> Table:
    """Stages with their time, best val mIoU and outputs, plus the share of the gap KD recovered."""
    table = Table(title="distill run")
    for column in ("stage", "status", "time", "best val mIoU", "outputs"):
        table.add_column(column, justify="right" if column in ("time", "best val mIoU") else "left")
    for o in outcomes:
        miou = "" if o.best_miou is None else f"{100 * o.best_miou:.1f}"
        table.add_row(o.stage, o.status, f"{o.seconds:.0f} s", miou, str(o.outputs))
    by_stage = {o.stage: o.best_miou for o in outcomes if o.stage in TRAINING_STAGES}
    if {"teacher", "baseline", "student"} <= by_stage.keys():
        gap = by_stage["teacher"] - by_stage["baseline"]
        gain = by_stage["student"] - by_stage["baseline"]
        recovered = f"{100 * gain / gap:.0f}% of the teacher/baseline gap" if gap > 0 else "no gap to recover"
        table.caption = (f"student with distillation {100 * by_stage['student']:.1f} vs baseline "
                         f"{100 * by_stage['baseline']:.1f} mIoU: {100 * gain:+.1f} points, {recovered}")
    return table
