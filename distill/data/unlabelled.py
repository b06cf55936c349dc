"""Images without masks, and batches that mix them with labelled ones.

An unlabelled sample loads as its image and a placeholder mask of class 0 everywhere: the joint
transforms then crop and pad it like any other, so after augmentation the placeholder marks the
pixels that are image (0) and those that are padding (``ignore_index``). The dataset hands that
to the KD term as ``kd_mask`` and gives the CE a mask of ``ignore_index`` only: the teacher
teaches every pixel of an unlabelled image, the labels only where they exist.
"""

from __future__ import annotations

import math

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from distill.data.files import IMAGE_SUFFIXES, DataError, read_image


class FolderImages:
    """Every image under ``folder`` (sub-folders included), sorted; no masks. Each is drawn
    ``repeat`` times per pass of the mixed batches (:class:`MixedBatchSampler`)."""

    labelled = False

    def __init__(self, folder: Path, repeat: int = 1) -> None:
        self.folder, self.repeat = Path(folder), repeat
        if not self.folder.is_dir():
            raise DataError(f"unlabelled folder '{self.folder}' does not exist or is not a folder")
        # Under the folder's whole path: ids name it (see sample_id).
        self.paths = sorted(p for p in self.folder.resolve().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DataError(f"unlabelled folder '{self.folder}' holds no image "
                            f"({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.paths)

    def sample_id(self, index: int) -> str:
        # The whole path: two folders may hold the same file names, and a store of the teacher's
        # targets is keyed by these ids (and made stale by a change of folder).
        return f"unlabelled/{self.paths[index].as_posix()}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.paths[index])
        return image, np.zeros(image.shape[:2], dtype=np.int64)


class WithoutMasks:
    """A labelled source (a layout's split, the synthetic generator) with its masks ignored,
    each image drawn ``repeat`` times per pass of the mixed batches."""

    labelled = False

    def __init__(self, source: Any, repeat: int = 1) -> None:
        self.source, self.repeat = source, repeat

    def __len__(self) -> int:
        return len(self.source)

    def sample_id(self, index: int) -> str:
        return f"unlabelled/{self.source.sample_id(index)}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, _ = self.source.load(index)
        return image, np.zeros(image.shape[:2], dtype=np.int64)


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` with a fixed share of unlabelled samples
    (``ratio * batch_size`` rounded half up, at least one of each kind).

    An epoch has as many batches as plain training over the labelled samples would
    (``len(labelled) // batch_size``), so a distilled student and its baseline take the same
    optimizer steps per epoch and the same schedule compares them at equal cost. Each kind is
    drawn from its own permutation, continuing across epochs in order: every labelled sample is
    seen before any repeats, and likewise every unlabelled one (an index listed ``r`` times in
    ``unlabelled`` is drawn ``r`` times per pass: ``data.unlabelled[].repeat``). The order is a pure function of
    ``seed`` and the epoch the dataset is set to (``dataset.epoch``), so a resumed run sees the
    same batches.
    """

    # Whole batches only, as the baseline's loader: Accelerate then drops the last partial round
    # of batches under several processes, where it would pad it with batches from the start (the
    # student would take more steps per epoch than its baseline, and see repeats).
    drop_last = True

    def __init__(self, labelled: Sequence[int], unlabelled: Sequence[int], batch_size: int,
                 ratio: float, seed: int, dataset: Any) -> None:
        self.labelled, self.unlabelled = list(labelled), list(unlabelled)
        if batch_size < 2:
            raise DataError(f"data.batch_size {batch_size} cannot hold both a labelled and an "
                            "unlabelled image: use at least 2")
        if len(self.labelled) < batch_size:
            raise DataError(f"{len(self.labelled)} labelled images do not fill one batch of "
                            f"data.batch_size {batch_size}: an epoch would have no step")
        # Half up (Python's round() takes halves to the even number: 2.5 -> 2 but 1.5 -> 2).
        self.per_batch_unlabelled = min(batch_size - 1, max(1, math.floor(ratio * batch_size + 0.5)))
        self.per_batch_labelled = batch_size - self.per_batch_unlabelled
        self.batch_size, self.seed, self.dataset = batch_size, seed, dataset

    def __len__(self) -> int:
        return len(self.labelled) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(getattr(self.dataset, "epoch", 0))
        labelled = _draws(self.labelled, self.seed, epoch * len(self) * self.per_batch_labelled)
        unlabelled = _draws(self.unlabelled, self.seed + 1, epoch * len(self) * self.per_batch_unlabelled)
        for _ in range(len(self)):
            yield ([next(labelled) for _ in range(self.per_batch_labelled)]
                   + [next(unlabelled) for _ in range(self.per_batch_unlabelled)])


def _draws(pool: list[int], seed: int, start: int) -> Iterator[int]:
    """``pool`` in one fresh permutation per pass over it, from the ``start``-th draw on."""
    cycle, offset = divmod(start, len(pool))
    while True:
        order = _permutation(len(pool), seed, cycle)
        for k in order[offset:]:
            yield pool[k]
        cycle, offset = cycle + 1, 0


def _permutation(count: int, seed: int, step: int) -> list[int]:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randperm(count, generator=generator).tolist()
