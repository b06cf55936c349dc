"""The teacher's logit cache: compress once, replay through every augmentation, reuse.

``distill cache RECIPE`` (:func:`write_cache`) runs the frozen teacher once over each split in
``cache.splits``, on the *un-augmented* base frame (the eval transform; ``data.resize`` is
required so that every map spans one frame), average-pools its logits to ``1/cache.stride`` and
stores them compressed. While a student trains with ``teacher.mode: cache``,
:class:`CachedTeacher` reads the maps of the batch's samples and replays the batch's recorded
geometry on them (rescale, crop with padding, flip: one bilinear ``grid_sample`` over the batch),
so the targets line up with the augmented view the student sees.

Choices (figures: ``bench/cache.py``):

- Average pooling, not bilinear downsampling: at stride 4 bilinear reads 2 of every 4 rows and
  aliases; the box filter keeps every teacher pixel, and the replay's bilinear upsampling then
  reconstructs a low-pass map. (DeepLabV3+ predicts at stride 4 anyway: the replay error barely
  moves between stride 1 and 4, while the store is 16x smaller.)
- The non-top-k classes share one logit per pixel, ``T * log(mean exp(z / T))`` over them at
  ``loss.temperature``: the only single value that keeps their probability mass, so the top-k
  probabilities come back exact; it minimises KL(teacher || rebuilt) at T, and still beats the
  tails' mean logit at other temperatures (a store is then served with a warning, not refused).
- Targets come back at the batch images' resolution (not 1/stride): sampling once is as cheap
  as sampling at 1/stride and letting ``kd_loss`` upsample (within 1% of a step), and sharper.
- ``int8``: per pixel an fp16 zero point (``rest``, or the minimum for ``dense``) and scale, and
  unsigned 8-bit codes over [zero, max]; ``fp16`` stores the logits themselves.
- Photometric augmentation (``data.color_jitter``) is not replayed: targets are the teacher's
  view of the original colours, the price of running the teacher once.
- Padding (the crop past the image, labels ``ignore_index``) repeats the edge values: finite,
  and skipped by the KD loss.

Layout of ``cache.dir`` (default ``<output_dir>/cache``)::

    manifest.json             format and layout version; per split its fingerprint, complete flag
    <split>/index.json        sample ids, in dataset order (row i = dataset index i)
    <split>/<array>.npy       one memory-mapped array per name, shaped [num_samples, ...]
    <split>/written.npy       uint8 [num_samples]: 1 once a sample's rows are on disk

Arrays (:func:`distill._cache_replay.array_specs`): ``topk`` keeps the k largest logits per pixel
(``values`` fp16, or ``codes`` + ``scale``), their classes (``indices``, uint8; uint16 beyond 256
classes) and ``rest``; ``dense`` keeps every class (fp16 is the reference layout). Readers open
the files read-only with ``mmap`` and copy only a batch's rows, so any number of processes share
one store.

A store serves only the recipe that made it: its fingerprint (teacher weights' sha256, teacher
spec and input normalisation, dataset, root, the split's sample ids, base frame, stride, layout,
top-k, dtype, layout version) must match, else :class:`CacheError` names each differing field
with both values. An interrupted write is resumed by the next ``distill cache`` (missing samples
only) and refused by readers until then.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from distill import _cache_replay as replay_ops
from distill._cache_replay import (
    LAYOUT_VERSION,
    CacheError,
    _differences,
    _ids_digest,
    _prepare_split,
    _set_entry,
    _split_files,
    read_manifest,
    split_folder,
)
from distill._io import file_digest

if TYPE_CHECKING:
    from distill.config import Recipe

__all__ = ["CacheError", "CachedTeacher", "LogitStore", "cache_dir", "expected_fingerprint",
           "load_cached_teacher", "open_store", "write_cache"]

logger = logging.getLogger(__name__)


def cache_dir(recipe: Recipe) -> Path:
    """``cache.dir``, or ``<output_dir>/cache``."""
    return Path(recipe.cache.dir) if recipe.cache.dir is not None else Path(recipe.output_dir) / "cache"


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


def _split_ids(recipe: Recipe, split: str) -> list[str]:
    from distill.data import build_dataset

    dataset = build_dataset(recipe.data, split, train=False)
    return [dataset.sample_id(i) for i in range(len(dataset))]


def expected_fingerprint(recipe: Recipe, split: str, *, ids: Sequence[str] | None = None,
                         num_classes: int | None = None) -> dict[str, Any]:
    """What a store of ``split`` written from ``recipe`` would record (a flat JSON dict)."""
    from distill.data import dataset_info
    from distill.teacher import teacher_checkpoint

    recipe = _stream_recipe(recipe)
    teacher, data, cache = recipe.teacher, recipe.data, recipe.cache
    assert teacher is not None
    num_classes = num_classes if num_classes is not None else dataset_info(data).num_classes
    ids = list(ids) if ids is not None else _split_ids(recipe, split)
    return {
        "layout_version": LAYOUT_VERSION,
        "teacher_checkpoint_sha256": file_digest(teacher_checkpoint(recipe)),
        "teacher_model": teacher.model_dump(
            mode="json", include={"arch", "encoder", "factory", "factory_kwargs", "arch_kwargs"}),
        "teacher_input": {"mean": list(teacher.mean or data.mean), "std": list(teacher.std or data.std)},
        "dataset": data.dataset,
        "dataset_root": str(Path(data.root).resolve()) if data.root is not None else None,
        "dataset_options": data.synthetic.model_dump(mode="json") if data.dataset == "synthetic" else None,
        "split": split,
        "split_files_sha256": _ids_digest(ids),
        "num_samples": len(ids),
        "num_classes": num_classes,
        "base_size": list(base_size(recipe)),
        "stride": cache.stride,
        "layout": cache.layout,
        "topk": replay_ops.effective_topk(cache.layout, cache.topk, num_classes),
        "dtype": cache.dtype,
    }


# --------------------------------------------------------------------------------------------
# Reading


class LogitStore:
    """One split of a complete, verified store; reads and rebuilds the logits of any samples.

    Memory maps are opened lazily (read-only) in each process that reads, so the store can be
    pickled into data-loader workers; nothing is loaded into memory beyond the rows asked for.
    """

    def __init__(self, folder: Path, split: str, fingerprint: dict[str, Any], info: dict[str, Any]
                 ) -> None:
        self.folder = Path(folder)
        self.split = split
        self.fingerprint = fingerprint
        self.info = info
        self.layout: replay_ops.Layout = fingerprint["layout"]
        self.num_samples: int = fingerprint["num_samples"]
        self.num_classes: int = fingerprint["num_classes"]
        self.base_size: tuple[int, int] = tuple(fingerprint["base_size"])  # type: ignore
        self.stride: int = fingerprint["stride"]
        self.size = replay_ops.stored_size(self.base_size, self.stride)
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
                       "the recipe distils at %s (slightly less faithful tails; rerun "
                       "`distill cache` to refit)", folder, stored_t, recipe_t)
    return LogitStore(folder, split, entry["fingerprint"], info)


class CachedTeacher(nn.Module):
    """``teacher(batch) -> logits``, served from a :class:`LogitStore` instead of a forward.

    Stateless (no parameters or buffers): it reads on the CPU and rebuilds and replays on the
    batch's device, in fp32 whatever the autocast; ``.to(device)`` is a no-op.

    ``resolution``: ``"crop"`` (default) samples the stored maps straight at every pixel of the
    batch's images, so ``kd_loss`` needs no resize; ``"stride"`` samples at ``1/stride`` of them
    and leaves the upsampling to ``kd_loss`` (two interpolations, slightly blurrier).
    """

    def __init__(self, store: LogitStore, *, resolution: Literal["crop", "stride"] = "crop") -> None:
        super().__init__()
        self.store = store
        self.resolution = resolution

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
            maps = self.store.logits(batch["index"].tolist(), device=images.device)
            return replay_ops.replay(maps, geometry, (height, width), out_size)


def load_cached_teacher(recipe: Recipe, num_classes: int) -> CachedTeacher:
    """The recipe's cached teacher for ``data.train_split`` (what ``load_teacher`` returns in
    ``teacher.mode: cache``), on the CPU; move it with ``.to(device)``."""
    store = open_store(recipe, recipe.data.train_split)
    if store.num_classes != num_classes:
        raise CacheError(f"the logit cache holds {store.num_classes} classes, the dataset has "
                         f"{num_classes}")
    return CachedTeacher(store)


# --------------------------------------------------------------------------------------------
# Writing


def write_cache(recipe: Recipe, splits: Sequence[str] | None = None) -> Path:
    """Run the teacher once over each split of ``cache.splits`` and store its logits.

    Works alone or under ``accelerate launch``: every process takes whole batches of
    ``cache.batch_size`` consecutive samples round-robin, so batches (and hence every stored
    byte) are the same whatever the number of processes, and no sample is written twice. A
    complete split with the same fingerprint is left as is; an interrupted one is resumed (its
    missing samples only); one written for another recipe is rewritten. Returns the store folder.
    """
    from distill.data import dataset_info
    from distill.teacher import load_teacher
    from distill.launch import make_accelerator

    stream = _stream_recipe(recipe)
    base_size(stream)
    folder = cache_dir(stream)
    accelerator = make_accelerator(stream, folder)
    info = dataset_info(stream.data)
    teacher = load_teacher(stream, info.num_classes).to(accelerator.device)
    for split in (splits or stream.cache.splits):
        _write_split(stream, split, folder, teacher, accelerator, info.num_classes)
    accelerator.wait_for_everyone()
    return folder


def _write_split(recipe: Recipe, split: str, folder: Path, teacher: nn.Module, accelerator: Any,
                 num_classes: int) -> None:
    """Write (or resume, or skip) one split; every process calls it.

    An error on one process (an unreadable image, non-finite logits, a full disk) is shared with
    the others at the next check (:func:`_stop_together`) instead of leaving them in a
    collective it will never join: every process then stops with that error.
    """
    from distill.data import build_dataset, collate_batch
    from distill.progress import make_progress, report

    main = accelerator.is_main_process
    dataset = build_dataset(recipe.data, split, train=False)
    ids = [dataset.sample_id(i) for i in range(len(dataset))]
    fingerprint = expected_fingerprint(recipe, split, ids=ids, num_classes=num_classes)
    state, error = "", None
    if main:
        try:
            state = _prepare_split(recipe, split, folder, fingerprint, ids)
        except Exception as caught:
            error = caught
    _stop_together(accelerator, error)  # also the barrier: the files exist before anyone opens them
    files = _split_files(fingerprint, split_folder(folder, split))
    arrays = files.open("r+")
    written = arrays.pop("written")
    batch_size, count = recipe.cache.batch_size, len(ids)
    batches = [list(range(start, min(start + batch_size, count)))
               for start in range(0, count, batch_size)]
    todo = [rows for rows in batches if not bool(np.all(written[rows[0] : rows[-1] + 1]))]
    accelerator.wait_for_everyone()  # everyone has read the flags before anyone writes them
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=mine, num_workers=recipe.data.num_workers,
        collate_fn=partial(collate_batch, ignore_index=recipe.data.ignore_index))
    size = replay_ops.stored_size(tuple(fingerprint["base_size"]), fingerprint["stride"])
    label = f"cache {split}"
    if main:
        report(f"{label}: {state}, {int(np.count_nonzero(written))}/{count} samples stored, "
               f"{accelerator.num_processes} process(es)")
    with make_progress(enabled=main) as progress:
        task = progress.add_task(label, total=count, completed=int(np.count_nonzero(written)),
                                 info=str(split_folder(folder, split)))
        loaded = iter(loader)
        # As many turns on every process (the last may have no batch): each ends with the check
        # that every process joins.
        for turn in range(-(-len(todo) // accelerator.num_processes)):
            error = None
            if turn < len(mine):
                try:
                    # Rows are the sampler's indices, not batch["index"]: with
                    # data.skip_bad_files an unreadable sample's row holds its substitute's maps
                    # (training never asks for it).
                    rows = np.asarray(mine[turn], dtype=np.int64)
                    batch = next(loaded)
                    with accelerator.autocast():
                        logits = teacher(_to_device(batch, accelerator.device))
                    if not bool(torch.isfinite(logits).all()):
                        bad = [ids[row] for row in rows]
                        raise CacheError(f"the teacher produced non-finite logits for a batch of {bad}")
                    maps = replay_ops.downsample(logits.float(), size)
                    packed = replay_ops.compress(maps, fingerprint["layout"], fingerprint["dtype"],
                                                 fingerprint["topk"], recipe.loss.temperature)
                    missing = written[rows] == 0  # a resumed batch keeps the samples already stored
                    for name, tensor in packed.items():
                        values = tensor.cpu().numpy().astype(arrays[name].dtype, copy=False)
                        arrays[name][rows[missing]] = values[missing]
                    for array in arrays.values():  # the data reaches the disk before its flags
                        array.flush()
                    written[rows[missing]] = 1
                    written.flush()
                except Exception as caught:
                    error = caught
            _stop_together(accelerator, error)
            if main:
                progress.update(task, completed=int(np.count_nonzero(written)))
    del arrays, written, loaded
    accelerator.wait_for_everyone()
    error = None
    if main:
        problems = files.problems()
        flags = np.load(split_folder(folder, split) / "written.npy", mmap_mode="r")
        if problems or not bool(np.all(flags)):
            error = CacheError(f"logit cache split '{split}' is not complete after writing: "
                               + ("; ".join(problems) or f"{int(np.count_nonzero(flags == 0))} "
                                  "samples missing"))
        else:
            _set_entry(recipe, folder, split, fingerprint, complete=True)
            report(f"{label}: {count} samples stored in {split_folder(folder, split)}")
    _stop_together(accelerator, error)


def _stop_together(accelerator: Any, error: Exception | None) -> None:
    """Raise on every process if any process failed; a collective that every process joins.

    A process raising alone would leave the others waiting in their next barrier: released
    only if the launcher kills them or the transport notices the dead peer (gloo does, NCCL may
    wait for its timeout), and then with the transport's error instead of the real one. Here the
    failing process raises its own error and the others a :class:`CacheError` that quotes it.
    Batches already written stay flagged, so the next ``distill cache`` resumes after them.
    """
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if not accelerator.reduce(failed, "sum").item():
        return
    messages: list[str | None] = [None] * accelerator.num_processes
    mine = None if error is None else f"{type(error).__name__}: {error}"
    torch.distributed.all_gather_object(messages, mine)
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise CacheError(f"process {rank} of {accelerator.num_processes} failed, so this one stopped "
                     f"too: {message}. Samples already stored are kept: rerun `distill cache "
                     "RECIPE` to finish.")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {**batch, "image": batch["image"].to(device, non_blocking=True)}
