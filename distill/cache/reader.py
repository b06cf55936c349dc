"""The logit store's reading side: where a recipe's store is, what it must record, and the
:class:`CachedTeacher` that replays it (the format: :mod:`distill.cache`; writing: :mod:`distill.cache.writer`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from distill.cache import store as replay_ops
from distill.cache.store import (
    LAYOUT_VERSION,
    CacheError,
    _differences,
    _ids_digest,
    _split_files,
    read_manifest,
    split_folder,
)
from distill.config import changes_output
from distill.run_folder import cache_dir
from distill.stage_weights import teacher_digest

if TYPE_CHECKING:
    from distill.config import Recipe

logger = logging.getLogger(__name__)


def _stream_recipe(recipe: Recipe) -> Recipe:
    """The recipe with ``teacher.mode: stream`` (writing the cache needs the real teacher)."""
    if recipe.teacher is None:
        raise CacheError("the logit cache needs a `teacher` section in the recipe")
    return recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"mode": "stream"})})


def base_size(recipe: Recipe) -> tuple[int, int]:
    """The frame every stored map spans: ``data.resize`` (required for the cache)."""
    if recipe.data.resize is None:
        raise CacheError(
            "the logit cache needs data.resize: stored maps must share one base frame, and "
            "replaying a batch's geometry assumes the teacher saw that frame. Set data.resize, "
            "e.g. data.resize=[240,320] (or use teacher.mode=stream)"
        )
    return (int(recipe.data.resize[0]), int(recipe.data.resize[1]))


def cache_dataset(recipe: Recipe, split: str) -> Any:
    """The samples a store of ``split`` holds, in its row order: every image of the split (and
    ``data.unlabelled``), whatever ``data.labelled_fraction`` keeps of its masks. The teacher sees
    the same images either way, so changing the fraction reuses the store."""
    from distill.data import build_dataset

    update: dict[str, Any] = {"labelled_fraction": 1.0}
    if recipe.cache.teacher_resize is not None:
        update["resize"] = recipe.cache.teacher_resize
    data = recipe.data.model_copy(update=update)
    return build_dataset(data, split, train=False, unlabelled=True)


def _split_ids(recipe: Recipe, split: str) -> list[str]:
    dataset = cache_dataset(recipe, split)
    return [dataset.sample_id(i) for i in range(len(dataset))]


def store_rows(store_ids: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """The store row of each sample id of a training dataset.

    A training image whose mask ``labelled_fraction`` drops is named ``unlabelled/<id>``; it is
    stored under its own ``<id>``.
    """
    where = {sample: row for row, sample in enumerate(store_ids)}
    rows = []
    for sample in ids:
        row = where.get(sample)
        if row is None and sample.startswith("unlabelled/"):
            row = where.get(sample.removeprefix("unlabelled/"))
        if row is None:
            raise CacheError(f"sample '{sample}' is not in the logit cache: rerun `distill cache RECIPE`")
        rows.append(row)
    return np.asarray(rows, dtype=np.int64)


def _teacher_outputs(teacher: Any) -> dict[str, Any]:
    """The teacher's keys that change its stored outputs; its class names reduced to their
    count where its class map numbers them (they label ids, and say nothing of where a class goes)."""
    keys = teacher.model_dump(mode="json", include={name for name, field in type(teacher).model_fields.items()
                                                    if changes_output(field)})
    if keys.get("class_names") is not None and not teacher.map_names("teacher"):
        keys["class_names"] = f"{len(keys['class_names'])} classes"
    return keys


def expected_fingerprint(recipe: Recipe, split: str, *, ids: Sequence[str] | None = None,
                         num_classes: int | None = None) -> dict[str, Any]:
    """What a store of ``split`` written from ``recipe`` would record (a flat JSON dict)."""
    from distill.data import dataset_info

    recipe = _stream_recipe(recipe)
    teacher, data, cache = recipe.teacher, recipe.data, recipe.cache
    assert teacher is not None
    num_classes = num_classes if num_classes is not None else dataset_info(data).num_classes
    ids = list(ids) if ids is not None else _split_ids(recipe, split)
    fingerprint = {
        "layout_version": LAYOUT_VERSION,
        "teacher_checkpoint_sha256": teacher_digest(recipe),
        # The keys whose metadata says they change the teacher's outputs (the weights enter by
        # their digest above; the normalization below).
        "teacher_model": _teacher_outputs(teacher),
        "teacher_input": {"mean": list(teacher.mean or data.mean), "std": list(teacher.std or data.std)},
        "dataset": data.dataset,
        "dataset_root": str(Path(data.root).resolve()) if data.root is not None else None,
        "dataset_options": (data.synthetic.model_dump(mode="json") if data.dataset == "synthetic"
                            or any(entry.synthetic for entry in data.unlabelled) else None),
        "split": split,
        "split_files_sha256": _ids_digest(ids),
        "num_samples": len(ids),
        "num_classes": num_classes,
        "base_size": list(base_size(recipe)),
        # The frame the teacher saw, when not base_size: maps span the whole image either way,
        # so replay through the student's geometry is unchanged.
        "teacher_frame": list(cache.teacher_resize) if cache.teacher_resize is not None else None,
        "stride": cache.stride,
        "layout": cache.layout,
        "topk": replay_ops.effective_topk(cache.layout, cache.topk, num_classes),
        "dtype": cache.dtype,
    }
    # Stored logits that average the teacher's probabilities at the loss's temperature (its
    # test-time views, a class map's merged classes) depend on it; plain logits do not, and so
    # stay valid across a sweep of temperatures (a top-k tail's fit is only warned about, below).
    views = teacher.tta_flip or tuple(teacher.tta_scales) != (1.0,)
    if views or teacher.class_map is not None:
        fingerprint["temperature"] = recipe.loss.temperature
    if teacher.map_names("student"):  # the student's names say where each class goes
        fingerprint["student_classes"] = list(dataset_info(data).class_names)
    if recipe.train.mixed_precision != "no":  # the teacher writes under the recipe's autocast
        fingerprint["mixed_precision"] = recipe.train.mixed_precision
    return fingerprint


# --------------------------------------------------------------------------------------------
# Reading


class LogitStore:
    """One split of a complete, verified store; reads and rebuilds the logits of any samples.

    Memory maps are opened lazily (read-only) in each process that reads, so the store can be
    pickled into data-loader workers; nothing is loaded into memory beyond the rows asked for.
    """

    def __init__(self, folder: Path, split: str, fingerprint: dict[str, Any], info: dict[str, Any],
                 ids: Sequence[str]) -> None:
        self.folder = Path(folder)
        self.split = split
        self.ids = list(ids)  # the sample id of each row (index.json, checked against the manifest)
        self.fingerprint = fingerprint
        self.info = info
        self.layout: replay_ops.Layout = fingerprint["layout"]
        self.num_samples: int = fingerprint["num_samples"]
        self.num_classes: int = fingerprint["num_classes"]
        self.base_size: tuple[int, int] = tuple(fingerprint["base_size"])  # type: ignore
        self.stride: int = fingerprint["stride"]
        self.size = replay_ops.fingerprint_stored_size(fingerprint)
        self._files = _split_files(fingerprint, split_folder(self.folder, split))
        self._arrays: dict[str, np.memmap] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    @property
    def arrays(self) -> dict[str, np.memmap]:
        if self._arrays is None:
            self._arrays = self._files.open("r")
        return self._arrays

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The stored arrays' rows of ``indices`` (copies; written flags excluded)."""
        rows = np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise CacheError(f"sample index out of range for the '{self.split}' store of "
                             f"{self.num_samples} samples: {rows.tolist()}")
        return {name: np.asarray(array[rows]) for name, array in self.arrays.items()
                if name != "written"}

    def logits(self, indices: Sequence[int], device: torch.device | str | None = None
               ) -> torch.Tensor:
        """Rebuilt fp32 logits ``[B, C, h, w]`` of ``indices`` at the stored resolution.

        Only the compressed rows cross to ``device``; the full maps are rebuilt there.
        """
        tensors = {}
        for name, array in self.read(indices).items():
            if array.dtype == np.uint16:
                array = array.astype(np.int32)
            tensors[name] = torch.from_numpy(array).to(device or "cpu", non_blocking=True)
        return replay_ops.rebuild(tensors, self.layout, self.num_classes)


def open_store(recipe: Recipe, split: str | None = None) -> LogitStore:
    """Open ``split`` (default ``data.train_split``) of the recipe's store, verified.

    Raises:
        CacheError: no store, the split was not cached (names the cached ones), the store was
            written for another recipe (names each differing field with both values), its
            writing was interrupted, or an array file is missing or truncated.
    """
    split = split or recipe.data.train_split
    folder = cache_dir(recipe)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CacheError(f"no logit cache at '{folder}': run `distill cache RECIPE` first "
                         "(or set cache.dir to an existing store)")
    if manifest.get("layout_version") != LAYOUT_VERSION:
        raise CacheError(f"logit cache '{folder}' has layout version {manifest.get('layout_version')}, "
                         f"this distill reads version {LAYOUT_VERSION}: rerun `distill cache RECIPE`")
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        cached = ", ".join(sorted(manifest.get("splits", {}))) or "none"
        raise CacheError(f"split '{split}' is not in the logit cache '{folder}' (cached splits: "
                         f"{cached}); add it to cache.splits and rerun `distill cache RECIPE`")
    differences = _differences(entry.get("fingerprint", {}), expected_fingerprint(recipe, split))
    if differences:
        raise CacheError(
            f"the logit cache '{folder}' (split '{split}') was written for a different recipe:\n  "
            + "\n  ".join(differences)
            + "\nRerun `distill cache RECIPE` to rewrite it, or point cache.dir elsewhere."
        )
    files = _split_files(entry["fingerprint"], split_folder(folder, split))
    problems = files.problems()
    if problems:
        raise CacheError(f"the logit cache '{folder}' (split '{split}') is damaged: "
                         + "; ".join(problems) + ". Rerun `distill cache RECIPE` to rewrite it.")
    written = np.load(split_folder(folder, split) / "written.npy", mmap_mode="r")
    missing = int(written.size - np.count_nonzero(written))
    if not entry.get("complete") or missing:
        raise CacheError(
            f"the logit cache '{folder}' (split '{split}') is incomplete ({missing} of "
            f"{written.size} samples missing): its writing was interrupted. Rerun "
            "`distill cache RECIPE` to finish it."
        )
    index = split_folder(folder, split) / "index.json"
    try:
        ids = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CacheError(f"the logit cache index '{index}' is unreadable ({error})") from None
    if _ids_digest(ids) != entry["fingerprint"]["split_files_sha256"]:
        raise CacheError(f"the logit cache index '{index}' does not match its manifest; rerun "
                         "`distill cache RECIPE`")
    info = {**entry.get("info", {})}
    stored_t, recipe_t = info.get("rest_temperature"), recipe.loss.temperature
    fingerprint = entry["fingerprint"]
    tail = fingerprint["layout"] == "topk" and fingerprint["topk"] < fingerprint["num_classes"]
    if tail and stored_t not in (None, recipe_t):
        logger.warning("logit cache '%s': the non-top-k logits were fitted at temperature %s, "
                       "the recipe distils at %s (slightly less faithful tails; a store written "
                       "at %s fits them exactly: `distill cache RECIPE cache.dir=<new folder>`)",
                       folder, stored_t, recipe_t, recipe_t)
    return LogitStore(folder, split, entry["fingerprint"], info, ids)


class CachedTeacher(nn.Module):
    """``teacher(batch) -> logits``, served from a :class:`LogitStore` instead of a forward.

    Stateless (no parameters or buffers): it reads on the CPU and rebuilds and replays on the
    batch's device, in fp32 whatever the autocast; ``.to(device)`` is a no-op.

    ``resolution``: ``"crop"`` (default) samples the stored maps straight at every pixel of the
    batch's images, so ``kd_loss`` needs no resize; ``"stride"`` samples at ``1/stride`` of them
    and leaves the upsampling to ``kd_loss`` (two interpolations, slightly blurrier).
    """

    def __init__(self, store: LogitStore, *, resolution: Literal["crop", "stride"] = "crop",
                 rows: np.ndarray | None = None) -> None:
        super().__init__()
        self.store = store
        self.resolution = resolution
        self.rows = rows  # the store row of each dataset index (None: the same)

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        images, geometry = batch["image"], batch["geometry"]
        base = geometry["base_size"]
        expected = torch.tensor(self.store.base_size, device=base.device)
        if not bool((base == expected).all()):
            raise CacheError(f"batch base frames {base.tolist()} differ from the logit cache's "
                             f"{list(self.store.base_size)} (data.resize changed?)")
        height, width = images.shape[-2:]
        out_size = (height, width)
        if self.resolution == "stride":
            out_size = (-(-height // self.store.stride), -(-width // self.store.stride))
        with torch.autocast(images.device.type, enabled=False):
            indices = batch["index"].tolist()
            if self.rows is not None:
                indices = self.rows[indices].tolist()
            maps = self.store.logits(indices, device=images.device)
            return replay_ops.replay(maps, geometry, (height, width), out_size)


def load_cached_teacher(recipe: Recipe, num_classes: int) -> CachedTeacher:
    """The recipe's cached teacher for ``data.train_split`` (what ``load_teacher`` returns in
    ``teacher.mode: cache``), on the CPU; move it with ``.to(device)``."""
    store = open_store(recipe, recipe.data.train_split)
    if store.num_classes != num_classes:
        raise CacheError(f"the logit cache holds {store.num_classes} classes, the dataset has "
                         f"{num_classes}")
    rows = None
    if recipe.data.labelled_fraction < 1:  # the training rows: its labelled images first
        from distill.data import build_dataset

        train = build_dataset(recipe.data, recipe.data.train_split, train=False, unlabelled=True)
        rows = store_rows(store.ids, [train.sample_id(i) for i in range(len(train))])
    return CachedTeacher(store, rows=rows)


# --------------------------------------------------------------------------------------------
# Writing
