"""Which weights a stage reads: a stage's own trained weights, a checkpoint the recipe names, or a
teacher trained elsewhere (a local folder, a file, or a hub id downloaded once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from distill._io import file_digest
from distill.config import RECIPE_FILE
from distill.models import ModelError, stage_model
from distill.run_folder import stage_files


# Teachers that teacher.path gives whole (architecture and weights): no other weights file fits them.
PATH_SOURCES = ("transformers", "smp_hub", "onnx")


_FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Beside a model folder's weights, the files that decide what the teacher computes from them:
# its classes and architecture, and the normalization and channel order of its input.
_FOLDER_SETTINGS = ("config.json", "preprocessor_config.json")


def external_weights(source: str, path: Path, *, download: bool = True) -> Path | None:
    """The weights file of a teacher given by ``teacher.path`` (what fingerprints hash); a hub
    id is downloaded (once, into the Hugging Face cache) and its folder's weights used, or, with
    ``download=False`` (checking the inputs), left for later: None."""
    if source == "onnx":
        if not path.is_file():
            raise ModelError(f"teacher.path '{path}' is not an ONNX file (tried '{path.absolute()}')")
        return path
    if not download and not path.is_dir() and is_hub_id(str(path)):
        return None
    folder = path if path.is_dir() else hub_folder(str(path))
    for name in _FOLDER_WEIGHTS:
        if (folder / name).is_file():  # (the index of sharded weights: weights_digest reads its shards)
            return folder / name
    what = "smp save_pretrained" if source == "smp_hub" else "Hugging Face model"
    raise ModelError(f"teacher.path '{path}' is not a {what} folder (no model.safetensors)")


def teacher_digest(recipe: Any) -> str:
    """What fingerprints record of the teacher's weights (:func:`weights_digest`); for a teacher
    that ``teacher.path`` gives as a model folder, with the folder's ``config.json`` and
    ``preprocessor_config.json``, which decide what it computes from them (its classes, its
    input's normalization and channel order)."""
    path = trained_weights(recipe, "teacher")
    return weights_digest(path, folder_settings=recipe.teacher.source in PATH_SOURCES)


def weights_files(path: Path) -> list[Path]:
    """The files a weights file stands for: itself, for the index of sharded weights every
    shard it names too, and for an ONNX graph the files its external data is in."""
    path = Path(path)
    if path.suffix == ".onnx":
        return [path, *_onnx_external_files(path)]
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
    except (OSError, ValueError, AttributeError) as error:
        raise ModelError(f"sharded weights '{path}' cannot be read whole: {error}") from None
    return [path, *(path.parent / shard for shard in shards)]


def _onnx_external_files(path: Path) -> list[Path]:
    """The files beside an ONNX graph that hold its initializers (external data: large models,
    and torch's dynamo exporter by default); new weights may leave the graph file unchanged."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # onnx raises DecodeError, ValueError...: the file is not a graph
        raise ModelError(f"'{path}' cannot be read as an ONNX graph: {error}") from None
    locations = {entry.value for tensor in graph.initializer
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [path.parent / location for location in sorted(locations)]


def weights_digest(path: Path, *, folder_settings: bool = False) -> str:
    """SHA-256 of a weights file; for the index of sharded weights, of the index and every shard
    it names (new shards under the same index are other weights); with ``folder_settings``,
    also of the model folder's settings files beside it (:func:`teacher_digest`)."""
    path = Path(path)
    try:
        parts = [file_digest(file) for file in weights_files(path)]
    except OSError as error:  # a shard the index names, or an ONNX graph's data file, is missing
        raise ModelError(f"weights '{path}' cannot be read whole: {error}") from None
    if folder_settings and path.name in _FOLDER_WEIGHTS:
        parts += [f"{name} {file_digest(path.parent / name)}" for name in _FOLDER_SETTINGS
                  if (path.parent / name).is_file()]
    return parts[0] if len(parts) == 1 else hashlib.sha256("\n".join(parts).encode()).hexdigest()


def is_hub_id(repo_id: str) -> bool:
    """``owner/name``, and not a path on this machine."""
    return repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~")) and not Path(repo_id).exists()


def hub_folder(repo_id: str) -> Path:
    """The local folder of a hub model, downloaded if needed; a clear error without a network."""
    if not is_hub_id(repo_id):
        raise ModelError(f"teacher.path '{repo_id}' is not a model folder (tried "
                         f"'{Path(repo_id).absolute()}'), nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id))
    except Exception as error:  # offline, unknown id, gated model...
        raise ModelError(f"teacher.path '{repo_id}' is no folder here, and as a hub id it cannot be "
                         f"downloaded ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
                         "Without a network, download it elsewhere and set teacher.path to its folder") from None


def checkpoint_to_score(recipe: Any, stage: str) -> Path:
    """What ``distill eval --stage S`` scores: ``eval.checkpoint``, else the stage's trained weights.

    Raises:
        ModelError: the stage has no model in the recipe, the file is missing, or the teacher is
            one that ``teacher.path`` gives (its weights cannot be swapped for another file).
    """
    stage_model(recipe, stage)  # a recipe without a teacher section has no teacher to score
    teacher = recipe.teacher if stage == "teacher" else None
    if recipe.eval.checkpoint is not None and teacher is not None and teacher.source in PATH_SOURCES:
        raise ModelError(f"eval.checkpoint: a teacher of source '{teacher.source}' is the model in "
                         f"teacher.path ('{teacher.path}'); to score another one, set teacher.path to it")
    if recipe.eval.checkpoint is not None:
        if not Path(recipe.eval.checkpoint).is_file():
            raise ModelError(f"eval.checkpoint '{recipe.eval.checkpoint}' does not exist or is not a file")
        return Path(recipe.eval.checkpoint)
    return trained_weights(recipe, stage)


def baseline_weights(recipe: Any) -> Path | None:
    """The baseline's best weights when it was trained, else None (compare's optional row); a
    finished baseline set aside by a run killed or under way is not left out silently
    (:func:`trained_weights` says which)."""
    files = stage_files(recipe, "baseline")
    if files.best.is_file():
        return files.best
    if files.set_aside.is_dir():  # trained, but set aside by a run killed or under way: said
        return trained_weights(recipe, "baseline")
    return None


def trained_weights(recipe: Any, stage: str) -> Path:
    """Where a stage's trained weights are; :class:`ModelError` naming the command if missing.

    The teacher's are ``teacher.checkpoint`` when given; the student's ``eval.checkpoint`` when
    given (what compare and export use); otherwise ``<output_dir>/<stage>/best.safetensors``.
    """
    teacher = recipe.teacher if stage == "teacher" else None
    if teacher is not None and teacher.source in PATH_SOURCES:
        weights = external_weights(teacher.source, Path(str(teacher.path)))
        assert weights is not None  # downloaded when it is a hub id
        return weights
    given = {"teacher": teacher.checkpoint if teacher is not None else None,
             "student": recipe.eval.checkpoint}.get(stage)
    if given is not None:
        if not Path(given).is_file():
            key = "teacher.checkpoint" if stage == "teacher" else "eval.checkpoint"
            raise ModelError(f"{key} '{given}' does not exist or is not a file")
        return Path(given)
    files = stage_files(recipe, stage)
    best = files.best
    if not best.is_file():
        flag = "" if stage == "student" else f" --stage {stage}"
        writer = files.writer()
        if writer is not None:
            raise ModelError(f"the {stage} has no weights in {files.folder} yet: a run is training it now "
                             f"({writer}); wait for its first validation")
        if files.killed_run_left():
            raise ModelError(
                f"the {stage} has no weights in {files.folder}: a run killed before its first validation "
                f"set the last finished run aside in {files.set_aside}; `distill run RECIPE` puts it "
                f"back (`distill train RECIPE{flag}` too, then trains anew)")
        raise ModelError(
            f"the {stage} has no weights: {best} does not exist. Train it first with "
            f"`distill train RECIPE{flag}` (or `distill run RECIPE`)"
            + (", or set teacher.checkpoint" if stage == "teacher" else ", or pass checkpoint=PATH")
        )
    return best


def check_normalization(recipe: Any, weights: Path, stage: str = "student") -> None:
    """Refuse to score, compare or export weights trained on images normalized otherwise than
    the recipe says (``data.mean``/``data.std``, read from the ``recipe.yaml`` beside them):
    every pixel would be off, and the score or the exported model silently worse. Weights
    without that record (from elsewhere) are taken as they are."""
    saved = Path(weights).parent / RECIPE_FILE
    if Path(weights).name not in ("best.safetensors", "last.safetensors"):  # not a stage folder's
        return
    try:
        tree = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return
    trained = tree.get("data") if isinstance(tree, dict) else None
    if not isinstance(trained, dict):  # another tool's file of that name
        return
    teacher = recipe.teacher if stage == "teacher" else None
    for key in ("mean", "std"):
        then = trained.get(key)
        now = list((getattr(teacher, key, None) if teacher is not None else None) or getattr(recipe.data, key))
        numbers = isinstance(then, list) and all(isinstance(v, (int, float)) for v in then)
        if numbers and len(then) == len(now) and any(abs(a - b) > 1e-9 for a, b in zip(then, now)):
            # A teacher from elsewhere takes its own normalization; the data's is the student's.
            external = teacher is not None and teacher.checkpoint is not None
            advice = (f"set teacher.{key} to the trained values" if external else
                      f"set data.{key} to the trained values" + (
                          f", or give the file as teacher.checkpoint with teacher.{key}, or retrain the "
                          "teacher" if teacher is not None else ""))
            raise ModelError(f"'{weights}' was trained on images normalized with data.{key} {then} (its "
                             f"{saved}), this recipe gives it {now}: {advice}")
