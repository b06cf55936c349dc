"""What a training stage is made from: one function, read off the schema's field metadata.

Each key of the sections a stage reads says which stages' results it changes (``EVERY_STAGE``,
``STUDENTS``, ``DISTILLED`` or ``RUN_ONLY`` in ``distill/config/_base.py``). :func:`stage_inputs`
keeps the keys that change this stage's result, with the bytes it reads (teacher weights, a
logit store, local encoder weights) by their sha256. ``distill run`` skips a stage whose
``done.json`` holds the same digest, and a resume is refused when a checkpoint's inputs differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from distill._io import file_digest
from distill.config import changes
from distill.config import Recipe
from distill.data.splits import parse_split
from distill.models import model_identity, stage_model
from distill.run_folder import cache_dir
from distill.stage_weights import teacher_digest


def keys_for(section: BaseModel, stage: str) -> dict[str, Any]:
    """The keys of ``section`` whose metadata says they change ``stage``'s result."""
    names = {name for name, field in type(section).model_fields.items() if stage in (changes(field) or [])}
    return section.model_dump(mode="json", include=names)


def stage_inputs(recipe: Recipe, stage: str, *, teacher_module: bool = False) -> dict[str, Any]:
    """Everything a training stage's result depends on, as a nested dict of plain values.

    ``teacher_module``: the caller distils from a module of its own (``train(teacher=...)``),
    not from the recipe's teacher, whose section and weights then say nothing.
    """
    distilling = stage == "student" and recipe.distills
    reads = stage if stage != "student" or distilling else "baseline"  # a student alone is a baseline
    schedule = recipe.teacher_schedule() if stage == "teacher" else recipe.train
    model = stage_model(recipe, stage)  # type: ignore[arg-type]
    inputs: dict[str, Any] = {
        "data": keys_for(recipe.data, reads),
        "train": keys_for(schedule, reads),
        "loss": keys_for(recipe.loss, reads),
        "model": {**keys_for(model, reads), **_weights(model, reads)},
    }
    # Class names are labels for ids: a rename changes no training, only a class map that names
    # classes (the distilled student's teacher.class_map). Their count stays (a folder layout's).
    mapper = recipe.teacher if distilling and recipe.teacher is not None else None
    names = inputs["data"].get("class_names")
    if names is not None and not (mapper is not None and mapper.map_names("student")):
        inputs["data"]["class_names"] = f"{len(names)} classes"
    # A key added to data.unlabelled's entries counts only where set, so that other runs keep
    # their digest (as the keys below).
    for source in inputs["data"].get("unlabelled") or []:
        if source.get("repeat") == 1:
            del source["repeat"]
    # Keys whose bytes are elsewhere, added only when used, so that other runs keep their digest.
    lists = _split_lists(inputs["data"])
    if lists:
        inputs["split_lists"] = lists  # a `:list=FILE` selector keeps what the file names
    if recipe.eval.resolution != "label":  # validation picks best.safetensors at this resolution
        inputs["eval_resolution"] = recipe.eval.resolution
    if distilling and teacher_module:
        inputs["teacher"] = "a module given to train()"
    elif distilling:
        assert recipe.teacher is not None
        teacher = keys_for(recipe.teacher, "student")
        if teacher.get("class_names") is not None and not recipe.teacher.map_names("teacher"):
            teacher["class_names"] = f"{len(teacher['class_names'])} classes"  # labels of ids
        inputs["teacher"] = {**teacher, **_weights(recipe.teacher, "student"),
                             "weights": teacher_digest(recipe)}
        if recipe.teacher.mode == "cache":
            inputs["cache"] = {**keys_for(recipe.cache, "student"), "store": _store_entry(recipe)}
    return inputs


def _store_entry(recipe: Recipe) -> str | None:
    """The digest of the store's record of the training split, the one split a student reads
    (its unlabelled images included): caching another split leaves the student up to date."""
    manifest = cache_dir(recipe) / "manifest.json"
    try:
        entry = json.loads(manifest.read_text())["splits"][recipe.data.train_split]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not a store's: never up to date
        return None
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _split_lists(data: dict[str, Any]) -> dict[str, str | None]:
    """The sha256 of each list file that a split selector among ``data``'s keys reads."""
    selectors = [data.get("train_split"), data.get("val_split"),
                 *(source.get("split") for source in data.get("unlabelled") or [])]
    files = {parse_split(text).list_file for text in selectors if text}
    return {str(path): f"sha256:{file_digest(path)}" if path.is_file() else None
            for path in sorted(f for f in files if f is not None)}


def _weights(model: BaseModel, stage: str) -> dict[str, Any]:
    """Weights files a model starts from, by their sha256 rather than their path."""
    keys = keys_for(model, stage)
    found: dict[str, Any] = {}
    if "encoder_weights" in keys:
        found["encoder_weights"] = model_identity(model)["encoder_weights"]  # type: ignore[arg-type]
    checkpoint = getattr(model, "checkpoint", None)
    if "checkpoint" in keys and checkpoint is not None and checkpoint.is_file():
        found["checkpoint"] = f"sha256:{file_digest(checkpoint)}"
    return found


def digest(parts: dict[str, Any]) -> str:
    """A short, stable hash of a nested dict of plain values."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
