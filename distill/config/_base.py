"""What every recipe section shares: strict pydantic models, and the recipe's error type."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message says which key and why."""


class Section(BaseModel):
    # allow_inf_nan=False: `loss.temperature=.inf` is refused here, naming the key, not mid-run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, values: Any) -> Any:
        # pydantic reads `epochs: true` as 1; a boolean where a number belongs is a mistake.
        if isinstance(values, dict):
            for name, value in values.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and is_number(field.annotation):
                    raise ValueError(f"'{name}' is {value!r}, a boolean, not a number")
                if (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)
                        and field is not None and _holds_numbers(field.annotation)):
                    raise ValueError(f"'{name}' is {list(value)!r}: a boolean is not a number")
                if field is not None and _is_path(field.annotation):
                    values = {**values, name: _path_value(name, value, field.annotation)}
        return values


def _is_path(annotation: Any) -> bool:
    return Path in (annotation, *get_args(annotation))


def _path_value(name: str, value: Any, annotation: Any) -> Any:
    """A path key's value: ``~`` expanded (no shell expands it inside `key=~/runs`), and an
    empty path (the working directory, by accident: `cache.dir=`) or a number refused (YAML
    read `007` as 7: its text is gone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"'{name}' is the number {value!r}: quote a folder or file name made of "
                         "digits (YAML reads `007` as 7)")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if not value.strip():
            optional = type(None) in get_args(annotation)
            raise ValueError(f"'{name}' is empty: give a path" + (", or null for none" if optional else "")
                             + " (an empty path is the working directory)")
        value = expand_home(value)
    return value


def expand_home(value: str) -> str:
    """A leading ``~`` or ``~user`` expanded, as a shell would (not inside `key=~/x`)."""
    return os.path.expanduser(value) if value.startswith("~") else value


def is_number(annotation: Any) -> bool:
    args = get_args(annotation) or (annotation,)
    return bool(set(args) & {int, float}) and bool not in args


def _holds_numbers(annotation: Any) -> bool:
    """``tuple[int, int]``, ``list[float]`` (or either ``| None``): a sequence of numbers."""
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) in (tuple, list):
            items = [a for a in get_args(candidate) if a is not Ellipsis]
            return bool(items) and all(is_number(a) for a in items)
    return False


# Which training stages' results a recipe key changes: field metadata that the one fingerprint
# (distill.fingerprint) reads. A key that changes no result (RUN_ONLY) may differ between a
# finished stage and now, and between a checkpoint and its resume; any other difference redoes
# the stage, or refuses the resume. Every key of a section that a stage reads says which it is
# (tests/test_fingerprint.py).
EVERY_STAGE: dict[str, Any] = {"changes": ["teacher", "baseline", "student"]}
STUDENTS: dict[str, Any] = {"changes": ["baseline", "student"]}  # not the teacher's training
DISTILLED: dict[str, Any] = {"changes": ["student"]}  # the distilled student's alone
RUN_ONLY: dict[str, Any] = {"changes": []}  # how a run goes, not what it computes


def shapes_output(tags: dict[str, Any]) -> dict[str, Any]:
    """``tags`` for a model key that also changes what the model outputs for a given image: a
    logit store written from a teacher with another value is stale (``distill.cache.reader``)."""
    return {**tags, "output": True}


def changes_output(field: Any) -> bool:
    """Whether a field's metadata marks it with :func:`shapes_output`."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("output"))


def changes(field: Any) -> list[str] | None:
    """The stages a field's metadata names (None when it has none)."""
    extra = field.json_schema_extra
    return list(extra["changes"]) if isinstance(extra, dict) and "changes" in extra else None
