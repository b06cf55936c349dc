"""Images without masks, and batches that mix them with labelled ones.

An unlabelled sample loads as its image and a placeholder mask of class 0 everywhere: the joint
transforms then crop and pad it like any other, so after augmentation the placeholder marks the
pixels that are image (0) and those that are padding (``ignore_index``). The dataset hands that
to the KD term as ``kd_mask`` and gives the CE a mask of ``ignore_index`` only: the teacher
teaches every pixel of an unlabelled image, the labels only where they exist.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from distill._datasets import IMAGE_SUFFIXES, DataError, read_image


class FolderImages:
    """Every image under ``folder`` (sub-folders included), sorted; no masks."""

    labelled = False

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"unlabelled folder '{self.folder}' does not exist or is not a folder")
        self.paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DataError(f"unlabelled folder '{self.folder}' holds no image "
                            f"({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.paths)

    def sample_id(self, index: int) -> str:
        return f"unlabelled/{self.paths[index].relative_to(self.folder).as_posix()}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.paths[index])
        return image, np.zeros(image.shape[:2], dtype=np.int64)


class WithoutMasks:
    """A labelled source (a layout's split, the synthetic generator) with its masks ignored."""

    labelled = False

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def sample_id(self, index: int) -> str:
        return f"unlabelled/{self.source.sample_id(index)}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, _ = self.source.load(index)
        return image, np.zeros(image.shape[:2], dtype=np.int64)


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` with a fixed share of unlabelled samples, reshuffled each epoch
    (``round(ratio * batch_size)``, at least one of each kind).

    An epoch passes once over the labelled samples (the last partial batch dropped, as for plain
    training); unlabelled samples are drawn from their own permutation, continuing across epochs
    in order, so every one is seen before any repeats. The order is a pure function of ``seed``
    and the epoch the dataset is set to (``dataset.epoch``), so a resumed run sees the same batches.
    """

    def __init__(self, labelled: Sequence[int], unlabelled: Sequence[int], batch_size: int,
                 ratio: float, seed: int, dataset: Any) -> None:
        self.labelled, self.unlabelled = list(labelled), list(unlabelled)
        if batch_size < 2:
            raise DataError(f"data.batch_size {batch_size} cannot hold both a labelled and an "
                            "unlabelled image: use at least 2")
        self.per_batch_unlabelled = min(batch_size - 1, max(1, round(ratio * batch_size)))
        self.per_batch_labelled = batch_size - self.per_batch_unlabelled
        if len(self.labelled) < self.per_batch_labelled:
            raise DataError(f"{len(self.labelled)} labelled images do not fill the "
                            f"{self.per_batch_labelled} labelled places of one batch")
        self.seed, self.dataset = seed, dataset

    def __len__(self) -> int:
        return len(self.labelled) // self.per_batch_labelled

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(getattr(self.dataset, "epoch", 0))
        order = _permutation(len(self.labelled), self.seed, epoch)
        drawn = epoch * len(self) * self.per_batch_unlabelled  # where this epoch's draws start
        count, cycles = len(self.unlabelled), {}
        for b in range(len(self)):
            start = b * self.per_batch_labelled
            batch = [self.labelled[i] for i in order[start : start + self.per_batch_labelled]]
            for k in range(self.per_batch_unlabelled):
                cycle, offset = divmod(drawn + b * self.per_batch_unlabelled + k, count)
                if cycle not in cycles:  # one permutation of the unlabelled pool per pass over it
                    cycles[cycle] = _permutation(count, self.seed + 1, cycle)
                batch.append(self.unlabelled[cycles[cycle][offset]])
            yield batch


def _permutation(count: int, seed: int, step: int) -> list[int]:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randperm(count, generator=generator).tolist()
