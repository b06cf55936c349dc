"""Writing the logit store: ``distill cache`` runs the teacher once and stores its logits
(the store and its replay: :mod:`distill.cache`)."""


from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from distill.cache import store as store_ops
from distill.cache.store import CacheError, _prepare_split, _set_entry, _split_files, split_folder
from distill.cache.reader import _stream_recipe, base_size, cache_dataset, cache_dir, expected_fingerprint

if TYPE_CHECKING:
    from distill.config import Recipe


logger = logging.getLogger(__name__)


def write_cache(recipe: Recipe, splits: Sequence[str] | None = None) -> Path:
    """Run the teacher once over each split of ``cache.splits`` and store its logits.

    Works alone or under ``accelerate launch``: every process takes whole batches of
    ``cache.batch_size`` consecutive samples round-robin, so batches (and hence every stored
    byte) are the same whatever the number of processes, and no sample is written twice. A
    complete split with the same fingerprint is left as is; an interrupted one is resumed (its
    missing samples only); one written for another recipe is rewritten. Returns the store folder.
    """
    from distill.data import dataset_info
    from distill.launch import make_accelerator
    from distill.run_folder import exclusive_folder
    from distill.teacher import load_teacher

    from distill.preflight import check_inputs
    from distill.run_folder import ensure_writable_folder

    stream = _stream_recipe(recipe)
    check_inputs(stream, "cache")  # every problem of its data, folder and teacher at once
    base_size(stream)
    folder = cache_dir(stream)
    ensure_writable_folder(folder, "logit cache", CacheError)  # cache.dir that is a file, read-only...
    accelerator = make_accelerator(stream, folder)
    info = dataset_info(stream.data)
    # Every split is found before the first is (re)written: a wrong name in cache.splits must
    # not cost a complete store of the splits before it.
    datasets = {split: cache_dataset(stream, split) for split in (splits or stream.cache.splits)}
    store_ops.check_store_folder(folder, list(datasets))
    ids = {split: [dataset.sample_id(i) for i in range(len(dataset))] for split, dataset in datasets.items()}
    fingerprints = {split: expected_fingerprint(stream, split, ids=ids[split], num_classes=info.num_classes)
                    for split in datasets}
    up_to_date = accelerator.is_main_process and all(
        store_ops.split_state(folder, split, fingerprints[split]) == "up to date" for split in datasets)
    if accelerator.num_processes > 1:  # one answer for all: a process going on alone would hang
        from accelerate.utils import broadcast_object_list

        [up_to_date] = broadcast_object_list([up_to_date])
    if up_to_date:
        # Nothing to write: the teacher (a large model can take a while to load) is not loaded.
        if accelerator.is_main_process:
            from distill.progress import report

            report(f"logit cache {folder}: {', '.join(datasets)} up to date")
        return folder
    teacher = load_teacher(stream, info.num_classes).to(accelerator.device)
    with exclusive_folder(folder, accelerator):  # one writer per store
        for split, dataset in datasets.items():
            _write_split(stream, split, dataset, ids[split], fingerprints[split], folder, teacher, accelerator)
        accelerator.wait_for_everyone()
    return folder


def _write_split(recipe: Recipe, split: str, dataset: Any, ids: list[str], fingerprint: dict[str, Any],
                 folder: Path, teacher: nn.Module, accelerator: Any) -> None:
    """Write (or resume, or skip) one split; every process calls it.

    An error on one process (an unreadable image, non-finite logits, a full disk) is shared with
    the others at the next check (:func:`_stop_together`) instead of leaving them in a
    collective it will never join: every process then stops with that error. ``dataset``: the
    split's every image, with or without its mask (:func:`cache_dataset`); ``ids`` their sample
    ids, which ``fingerprint`` was made from.
    """
    from distill.data import collate_batch
    from distill.progress import make_progress, report

    main = accelerator.is_main_process
    state, error = "", None
    if main:
        try:
            state = _prepare_split(recipe.loss.temperature, split, folder, fingerprint, ids)
        except Exception as caught:
            error = caught
    _stop_together(accelerator, error)  # also the barrier: the files exist before anyone opens them
    # A top-k tail is fitted at the temperature the split was begun at (the manifest says which):
    # a split resumed, or found up to date, under another loss.temperature keeps one fit and
    # its record (the reader warns when it serves another temperature).
    entry = (store_ops.read_manifest(folder) or {}).get("splits", {}).get(split, {})
    fit_temperature = entry.get("info", {}).get("rest_temperature") or recipe.loss.temperature
    files = _split_files(fingerprint, split_folder(folder, split))
    arrays = files.open("r+")
    written = arrays.pop("written")
    batch_size, count = recipe.cache.batch_size, len(ids)
    batches = [list(range(start, min(start + batch_size, count)))
               for start in range(0, count, batch_size)]
    todo = [rows for rows in batches if not bool(np.all(written[rows[0] : rows[-1] + 1]))]
    stored = int(np.count_nonzero(written))  # before the barrier: another process may then write
    accelerator.wait_for_everyone()  # everyone has read the flags before anyone writes them
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=mine, num_workers=recipe.data.num_workers,
        collate_fn=partial(collate_batch, ignore_index=recipe.data.ignore_index))
    size = store_ops.fingerprint_stored_size(fingerprint)
    label = f"cache {split}"
    if main:
        report(f"{label}: {state}, {stored}/{count} samples stored, {accelerator.num_processes} process(es)")
    with make_progress(enabled=main) as progress:
        task = progress.add_task(label, total=count, completed=stored,
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
                    if logits.shape[1] != fingerprint["num_classes"]:  # a count nothing recorded
                        raise CacheError(f"the teacher gives {logits.shape[1]} classes per pixel and the "
                                         f"student has {fingerprint['num_classes']}: map them with teacher.class_map")
                    if not bool(torch.isfinite(logits).all()):
                        bad = [ids[row] for row in rows]
                        raise CacheError(f"the teacher produced non-finite logits for a batch of {bad}")
                    maps = store_ops.downsample(logits.float(), size)
                    packed = store_ops.compress(maps, fingerprint["layout"], fingerprint["dtype"],
                                                 fingerprint["topk"], fit_temperature)
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
            _set_entry(fit_temperature, folder, split, fingerprint, complete=True)
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
