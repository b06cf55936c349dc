"""Every local problem of a command's inputs, found before its first write or expensive step.

A run that would stop on its third problem after fixing the first two wastes the user's time,
and one that names a consequence (the teacher has no weights) instead of the cause (the data
folder does not exist) wastes more. :func:`check_inputs` tries each input that can be checked
on the disk alone (data folders and their file lists, weights files, checkpoints, output
folders) and reports them all at once. Nothing is downloaded or written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from distill.config import Recipe


class InputError(ValueError):
    """One or more inputs of a command cannot be used; the message lists each."""


def check_inputs(recipe: Recipe, stage: str | None = None, *, needs_teacher_weights: bool = True,
                 planned: Sequence[str] = ()) -> None:
    """Raise the problem found with the recipe's local inputs, or :class:`InputError` listing
    every one when there are several.

    Args:
        recipe: the resolved recipe.
        stage: the training stage about to run (``teacher``, ``baseline``, ``student``),
            ``cache`` for the teacher's logit store, or None for a command that trains nothing
            of its own.
        needs_teacher_weights: check that the teacher's weights exist (False for ``distill run``,
            which trains the teacher first).
        planned: ``distill run``'s stages: the splits and folders of each are checked too (a
            wrong ``eval.split`` must not be found after the students were retrained).
    """
    from distill.data import build_dataset
    from distill.models.weights import check_weights_file
    from distill.models.pretrained import is_local, locate
    from distill.run_folder import cache_dir, compare_dir, ensure_writable_folder, export_dir, stage_dir
    from distill.stage_weights import PATH_SOURCES, check_normalization, external_weights, trained_weights

    checks: list[Callable[[], object]] = []  # run together at the end (check_all)
    attempt = checks.append
    if stage == "cache":  # the store's splits and folder, and the teacher that fills it
        planned, stage, caching = ("cache",), None, True
    else:
        caching = False

    data = recipe.data
    attempt(lambda: build_dataset(data, data.train_split, train=False))
    if data.val_split != data.train_split:
        attempt(lambda: build_dataset(data, data.val_split, train=False))
    splits = {data.train_split, data.val_split}
    later = [*(recipe.cache.splits if "cache" in planned else ()),
             *([recipe.eval_split] if "compare" in planned else ())]
    for split in dict.fromkeys(later):
        if split not in splits:
            attempt(lambda split=split: build_dataset(data, split, train=False))
    folders = {"cache": (lambda: cache_dir(recipe), "logit cache"),
               "compare": (lambda: compare_dir(recipe), "comparison"),
               "export": (lambda: export_dir(recipe), "export")}
    for name in planned:
        folder, what = folders.get(name, (lambda name=name: stage_dir(recipe, name), f"{name} stage"))
        attempt(lambda folder=folder, what=what: ensure_writable_folder(folder(), what))
    if stage is not None:
        attempt(lambda: ensure_writable_folder(stage_dir(recipe, stage), f"{stage} stage"))
        if recipe.train.resume is not None and not Path(recipe.train.resume).is_dir():
            attempt(lambda: _not_a_checkpoint(recipe.train.resume))
    specs = []  # the models this command builds
    if stage in ("baseline", "student") or (stage is None and not caching):
        specs.append(recipe.student_model)
    if recipe.teacher is not None and (stage in ("teacher", None) or (stage == "student" and recipe.distills)):
        specs.append(recipe.teacher)
    trains_teacher = stage == "teacher" or "teacher" in planned
    for spec in specs:
        # Encoder weights are read only by a model trained from them: a teacher this command
        # does not train is built from its checkpoint or its stage's weights.
        reads_encoder = spec.checkpoint is None and (spec is not recipe.teacher or trains_teacher)
        if spec.encoder_weights is not None and is_local(spec.encoder_weights) and reads_encoder:
            attempt(lambda spec=spec: locate(spec.encoder_weights))
        if spec.checkpoint is not None:  # found and readable; read whole when the model is built
            attempt(lambda spec=spec: check_weights_file(spec.checkpoint))
        if getattr(spec, "source", None) in PATH_SOURCES and spec.path is not None:  # nothing downloaded
            attempt(lambda spec=spec: external_weights(spec.source, Path(str(spec.path)), download=False))
    if (stage == "student" or caching) and recipe.distills and needs_teacher_weights and recipe.teacher.checkpoint is None:
        attempt(lambda: trained_weights(recipe, "teacher"))
    if stage in ("student", None) and recipe.distills:
        # Before a student learns from a teacher fed otherwise normalized images than it knew
        # (a teacher given by its file: also before `distill run` trains the baseline).
        if recipe.teacher.checkpoint is not None:
            attempt(lambda: check_normalization(recipe, Path(recipe.teacher.checkpoint), "teacher"))
        elif needs_teacher_weights and recipe.teacher.source in ("smp", "factory"):  # the run folder's
            attempt(lambda: check_normalization(recipe, trained_weights(recipe, "teacher"), "teacher"))
    check_all(*checks)


def check_all(*checks: Callable[[], object]) -> None:
    """Run every check; raise the one problem found (its own type), or :class:`InputError`
    naming each when there are several (a command's own list of inputs, as ``distill eval``'s)."""
    problems: list[str] = []
    errors: list[Exception] = []
    for check in checks:
        try:
            check()
        except (ValueError, OSError, RuntimeError) as error:  # distill's errors and the disk's
            if str(error) not in problems:
                problems.append(str(error))
                errors.append(error)
    if len(errors) == 1:
        raise errors[0]  # one problem keeps its own type (DataError, ModelError...)
    if problems:
        raise InputError(f"{len(problems)} problems with the inputs:\n  - " + "\n  - ".join(problems))


def _not_a_checkpoint(path: Path) -> None:
    from distill.run_folder import not_a_checkpoint_folder

    raise InputError(not_a_checkpoint_folder(path))
