"""Recipes: YAML files and ``key=value`` overrides loaded into typed, validated objects.

A recipe has the sections ``data``, ``model`` (single-model training) or ``teacher`` + ``student``
(distillation), ``loss``, ``train``, ``teacher_train``, ``eval``, ``export``, ``run`` and the key
``output_dir``; their models live in :mod:`distill.config._schema` (re-exported here), every key
documented on its field. ``distill recipe RECIPE`` prints the resolved values.

This module loads and overrides, and turns pydantic's errors into one readable message that names
the key, the value and, for a misspelt key, the nearest valid one.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from distill._io import atomic_write_text  # re-exported: callers write run files through it
from distill.config._schema import (  # re-exported: the recipe's sections
    CacheConfig,
    EvalConfig,
    ExportConfig,
    LossConfig,
    ModelConfig,
    Recipe,
    RunConfig,
    TeacherConfig,
    TrainConfig,
)
from distill.config._base import IMAGENET_MEAN, IMAGENET_STD, RecipeError, changes, changes_output
from distill.config._data_schema import DataConfig, SyntheticConfig, UnlabelledSource

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "CacheConfig", "DataConfig", "EvalConfig", "ExportConfig",
    "LossConfig", "ModelConfig", "Recipe", "RecipeError", "RunConfig", "SyntheticConfig",
    "TeacherConfig", "TrainConfig", "UnlabelledSource", "atomic_write_text", "json_default", "load_recipe",
    "parse_overrides", "recipe_from_dict", "recipe_reference", "recipe_to_yaml",
    "save_resolved_recipe",
]


# --------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "data.root=/x"]`` into ``{"train.epochs": 3, ...}``.

    Values are parsed as YAML scalars/lists, so ``3`` is an int, ``[1, 2]`` a list, ``null`` None;
    the value of a path or text key is its text as written (``output_dir=2024``, ``runs/a #2``),
    unless quoted or null.
    """
    if isinstance(items, str):  # its characters would be taken for overrides, one by one
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {items!r}: "
                        f"pass [{items!r}]")
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override '{item}' must look like `section.key=value`")
        parts = tuple(key.split("."))
        listed = next((k for k in range(1, len(parts)) if _is_list_key(parts[:k])), None)
        if "[" in key or listed is not None:
            whole = tuple(parts[:listed]) if listed is not None else tuple(key.split("[", 1)[0].split("."))
            example = "[{...}, {...}]" if _holds_sections(whole) else "[..., ...]"
            raise RecipeError(f"override '{item}': the entries of a list cannot be set one by one; "
                              f"give the whole list, e.g. `{'.'.join(whole)}={example}`")
        if not raw.strip() and _is_text_key(parts):
            optional = type(None) in get_args(_field_at(parts).annotation)
            raise RecipeError(f"override '{item}': the value is empty; give one"
                              + (f", or `{key}=null` for none" if optional else ""))
        try:
            parsed[key] = raw.strip() if _is_text_key(parts) and _plain_text(raw) else _yaml_value(raw, item)
        except yaml.YAMLError as error:
            raise RecipeError(f"override '{item}': value is not valid YAML ({error})") from None
    return parsed


def _field_at(parts: tuple[str, ...]) -> Any:
    """The pydantic field at a dotted key (None: no such key, or inside a free-form mapping)."""
    owner = _model_at(parts[:-1])
    return owner.model_fields.get(parts[-1]) if owner is not None else None


def _is_list_key(parts: tuple[str, ...]) -> bool:
    """A list or fixed-length tuple key (`data.unlabelled`, `data.mean`): set whole, not by index."""
    field = _field_at(parts)
    return field is not None and any(get_origin(a) in (list, tuple) for a in (field.annotation, *get_args(field.annotation)))


def _holds_sections(parts: tuple[str, ...]) -> bool:
    """A list whose entries are sections (`data.unlabelled`), not values (`data.class_names`)."""
    field = _field_at(parts)
    members = [a for outer in (field.annotation, *get_args(field.annotation)) for a in get_args(outer)] if field else []
    return any(isinstance(a, type) and issubclass(a, BaseModel) for a in members)


def _is_text_key(parts: tuple[str, ...]) -> bool:
    """A key whose value is a path or free text (``str``/``Path``, or either ``| None``)."""
    field = _field_at(parts)
    if field is None:
        return False
    members = set(get_args(field.annotation) or (field.annotation,)) - {type(None)}
    return bool(members) and members <= {str, Path}


def _plain_text(raw: str) -> bool:
    """Whether an override value is taken as written: not empty, quoted, YAML's null or a list or
    mapping (refused as such, not taken for a folder named `[1, 2]`)."""
    return raw.strip() != "" and raw[:1] not in "'\"[{" and raw not in ("null", "Null", "NULL", "~")


def _apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"override '{dotted}': '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for suggestions)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = get_args(annotation) or (annotation,)  # unwraps `X | None`
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _tuple_size(loc: tuple[str, ...]) -> int | None:
    """How many values the fixed-length tuple key at ``loc`` holds (None: not such a key)."""
    owner = _model_at(loc[:-1])
    field = owner.model_fields.get(loc[-1]) if owner is not None else None
    if field is None:
        return None
    for candidate in (field.annotation, *get_args(field.annotation)):  # and inside `X | None`
        items = get_args(candidate)
        if get_origin(candidate) is tuple and items and Ellipsis not in items:
            return len(items)
    return None


def _sections_with_key(key: str) -> list[str]:
    """``data.batch_size`` for ``batch_size``: the sections that have ``key``."""
    found = []
    for name, field in Recipe.model_fields.items():
        owner = _model_at((name,))
        if owner is not None and key in owner.model_fields:
            found.append(f"{name}.{key}")
    return found


def _origin(loc: tuple[str, ...], origins: dict[str, str]) -> str:
    """Where the value at ``loc`` came from: the key itself, the override that set a whole
    section or list around it (`train={epochs: -1}`, `format=bogus` for `export.formats.0`), or
    one inside it (`train.epochs.sub=1` made `train.epochs` a mapping)."""
    dotted = ".".join(loc)
    around = [".".join(loc[:k]) for k in range(len(loc), 0, -1)]
    inside = [key for key in origins if key.startswith(dotted + ".")]
    return next((origins[key] for key in (*around, *inside) if key in origins), "")


def _describe(error: dict[str, Any], origins: dict[str, str]) -> str:
    loc = tuple(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    dotted = ".".join(loc)
    origin = _origin(loc, origins)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        valid = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else ""
        nested = _sections_with_key(loc[-1]) if len(loc) == 1 else []
        if nested:  # a section's key at the top level (`batch_size:`), not a misspelt section
            hint = f"; it is a key of a section: did you mean {' or '.join(repr(n) for n in nested)}?"
        known = f" Valid keys here: {', '.join(valid)}." if valid and not close else ""
        return f"unknown key '{dotted}'{origin}{hint}{known}"
    if error["type"] == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return message if not dotted else f"{dotted}: {message}"
    if error["type"] == "missing" and len(loc) > 1 and loc[-1].isdigit():  # a short (height, width)
        key = ".".join(loc[:-1])
        size = _tuple_size(loc[:-1])
        needed = f"{size} values" if size else "more values"
        return f"'{key}'{_origin(loc[:-1], origins)}: needs {needed}, got {error.get('input')!r}"
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"'{dotted}'{origin}: {_plain(error['msg'])}{shown}"


def _plain(message: str) -> str:
    """pydantic's message without Python type names (``<class 'pathlib.Path'>``, ``TrainConfig``)."""
    message = re.sub(r" for <class '[\w.]+'>", "", message)
    message = re.sub(r"a valid dictionary or instance of (?:\w+Config|Recipe)\b", "a section (a mapping of keys)", message)
    return message[:1].lower() + message[1:]


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``, reading ``1e-4`` as a number as YAML 1.2 does (1.1 wants ``1.0e-4``,
    and keeps the rest as a string that a free-form mapping such as ``arch_kwargs`` passes on)."""


_Loader.add_implicit_resolver(  # appended to (after) PyYAML's own float and int patterns
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _UniqueKeyLoader(_Loader):
    """:class:`_Loader` that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, not {type(key).__name__} {key!r}",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep the last", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_value(text: str, item: str) -> Any:
    """An override's value as YAML (a key given twice in a mapping refused), refusing text after
    it that YAML would drop as a comment (`runs/exp #2` is not `runs/exp`)."""
    if text == "":
        return ""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    if node is not None and text[node.end_mark.index:].strip():
        raise RecipeError(f"override '{item}': YAML reads '{text[node.end_mark.index:].strip()}' as a "
                          "comment, which an override cannot hold: leave it out")
    return value


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``key=value`` overrides and validate it.

    Raises:
        RecipeError: the file is missing or unreadable, or a key or value is invalid.
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe '{path}' is a folder, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file '{path}' does not exist") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{path}' is not a text file (not UTF-8): is it a YAML recipe?") from None
    except OSError as error:  # a symlink loop, no permission...
        raise RecipeError(f"recipe '{path}' cannot be read: {error.strerror or error}") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe '{path}' must be a mapping of sections, not {type(tree).__name__}")
    return recipe_from_dict(tree, overrides, source=str(path))


def recipe_from_dict(
    tree: dict[str, Any], overrides: list[str] | None = None, *, source: str = "<dict>"
) -> Recipe:
    """Validate a recipe given as a nested dict (plus overrides); see :func:`load_recipe`."""
    tree = _copied(tree)  # overrides must not leak into the caller's dict
    origins: dict[str, str] = {}
    for key, value in parse_overrides(overrides or []).items():
        _apply_override(tree, key, value)
        origins[key] = " (from override)"
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        problems = [_describe(e, origins) for e in _one_per_key(error.errors(include_url=False))]
        raise RecipeError(f"recipe '{source}':\n  - " + "\n  - ".join(problems)) from None


def _copied(tree: Any, inside: tuple[int, ...] = ()) -> Any:
    """A copy of a recipe's tree in which no two keys share a value: a YAML alias
    (`student: *net`) is a second copy, so an override of one section leaves the other alone
    (`copy.deepcopy` keeps shared objects shared). ``inside``: the containers above, whose
    reappearance below is an alias of itself."""
    if isinstance(tree, (dict, list, tuple)):
        if id(tree) in inside:
            raise RecipeError("the recipe holds a YAML alias inside its own anchor (`&a [*a]`): "
                              "a value that contains itself")
        inside = (*inside, id(tree))
        if isinstance(tree, dict):
            return {key: _copied(value, inside) for key, value in tree.items()}
        return [_copied(value, inside) for value in tree]
    return copy.copy(tree)


# pydantic names the member of a union that failed inside the location (`pairs.0.1.int`,
# `class_map.1.literal['decoder']`); the user's key is the location without it.
_UNION_MEMBER = re.compile(r"^(?:int|str|float|bool|none|[\w-]+\[.*\])$")


def _one_per_key(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors with union members dropped from their location, those of one key merged into one
    (a value that fits no member of ``int | 'decoder'`` is one mistake, not two)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for n, error in enumerate(errors):
        # An unknown key is the user's own word, whatever it looks like (`train.float`).
        kept = error["loc"][-1:] if error["type"] == "extra_forbidden" else ()
        loc = tuple(p for p in error["loc"][:len(error["loc"]) - len(kept)]
                    if not (isinstance(p, str) and _UNION_MEMBER.match(p))) + tuple(kept)
        error = {**error, "loc": loc}
        # Unknown keys and the validators' own messages stand alone; type errors of a key merge.
        key = (n,) if error["type"] in ("extra_forbidden", "value_error") else ("key", loc)
        if key in merged:
            merged[key]["msg"] += f"; or {_plain(error['msg'])}"
        else:
            merged[key] = error
    return list(merged.values())


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


RECIPE_FILE = "recipe.yaml"  # the resolved recipe beside what it made (distill.run_folder)


def save_resolved_recipe(recipe: Recipe, folder: Path) -> Path:
    """Write ``recipe.yaml`` (fully resolved) into ``folder`` and return its path."""
    target = Path(folder) / RECIPE_FILE
    atomic_write_text(target, recipe_to_yaml(recipe))
    return target


def recipe_reference() -> str:
    """A Markdown table of every recipe key, its default and meaning (the README embeds it)."""
    rows = ["| key | default | meaning | redoes |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str, readers: set[str] | None) -> None:
        for name, field in model.model_fields.items():
            nested = [a for a in (get_args(field.annotation) or (field.annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
            key = f"{prefix}{name}"
            # A model section's keys say "every stage"; only the stages that read it redo.
            section_readers = SECTION_READERS.get(key, readers) if not prefix else readers
            if nested:
                summary = (nested[0].__doc__ or "").strip().splitlines()[0].replace("``", "`")
                listed = get_origin(field.annotation) is list  # keys of each entry, e.g. data.unlabelled[].split
                shown = f" `{json_default(field.get_default(call_default_factory=True))}` " if listed else " "
                summary = f"a list, each entry: {summary[0].lower()}{summary[1:]}" if listed else summary
                rows.append(f"| **`{key}`** |{shown}| {summary} | {_redoes(field, section_readers)} |")
                walk(nested[0], f"{key}[]." if listed else f"{key}.", section_readers)
                continue
            default = field.get_default(call_default_factory=True)
            shown = json_default(default)
            rows.append(f"| `{key}` | `{shown}` | {field.description or ''} | {_redoes(field, section_readers)} |")

    walk(Recipe, "", None)
    return "\n".join(rows) + "\n"


# The training stages whose fingerprint reads each model section (distill/fingerprint.py): the
# teacher's stage and the distilled student read the teacher; the baseline and the student the
# student's model; the teacher's schedule only the teacher.
SECTION_READERS: dict[str, set[str]] = {
    "teacher": {"teacher", "student"}, "student": {"baseline", "student"},
    "model": {"baseline", "student"}, "teacher_train": {"teacher"},
}


def _redoes(field: Any, readers: set[str] | None = None) -> str:
    """The training stages a changed key redoes (``distill run``), from its fingerprint metadata
    (of ``readers`` alone when given: the stages that read its section)."""
    stages = changes(field)
    if stages is None:
        return ""
    stages = [stage for stage in stages if readers is None or stage in readers]
    return ", ".join(stages) if stages else "none"


def json_default(value: Any) -> str:
    """A default as it would be written in YAML (one line)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
