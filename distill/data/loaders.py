"""The dataset, its joint transforms and the loaders (what a batch holds: :mod:`distill.data`)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from distill.data.layouts import (
    ADE20K,
    BadFileError,
    CamVid,
    Cityscapes,
    DataError,
    ImageFolder,
    PascalVOC,
)
from distill.data.labels import FILE_SOURCES, DatasetInfo, dataset_info
from distill.data.batches import Indexed, collate_batch, collate_user_items
from distill.data.splits import (
    SplitError,
    SplitSelector,
    Subset,
    first_samples,
    image_file,
    is_labelled,
    repeat,
    parse_split,
    select,
    without_samples,
)
from distill.data.synthetic import SyntheticShapes
from distill.data.transforms import jitter, resize_image, resize_nearest  # resize_*: re-exported
from distill.data.unlabelled import FolderImages, MixedBatchSampler, WithoutMasks

if TYPE_CHECKING:  # for types only: the loaders take the section's values, not the Recipe
    from distill.config import DataConfig

__all__ = [
    "ADE20K", "CamVid", "Cityscapes", "DataError", "DatasetInfo", "ImageFolder", "PascalVOC",
    "SampleSource", "SegmentationDataset", "SyntheticShapes", "build_dataset", "build_loader",
    "collate_batch", "dataset_info", "loader_for_dataset", "resize_image", "resize_nearest",
]

logger = logging.getLogger(__name__)



class SampleSource(Protocol):
    """What :class:`SegmentationDataset` needs from a layout (``CamVid``, ``SyntheticShapes``)."""

    def __len__(self) -> int: ...

    def sample_id(self, index: int) -> str: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB image [H, W, 3] and int64 mask [H, W] of train ids / ignore_index."""
        ...


class SegmentationDataset(Dataset):
    """A dataset source plus the train or eval transform; items are dicts (see module doc).

    Attributes:
        source: the layout that lists and decodes samples (``CamVid``, ``SyntheticShapes``...).
        info: classes, ignore value and palette.
        bad_files: files skipped as unreadable (``data.skip_bad_files``), in this process
            (each loader worker keeps its own list and logs a warning per new bad file).

    With ``data.skip_bad_files``, an unreadable sample is replaced by the next readable one (its
    ``index`` says which), so an epoch keeps its length; evaluation then counts that one twice.
    """

    def __init__(self, source: SampleSource, data: DataConfig, *, train: bool, seed: int = 0,
                 label_resolution: bool = False) -> None:
        self.source = source
        self.data = data
        self.train = train
        # Eval only: masks at their own size (not resized to data.resize), for scoring at the
        # label's resolution as published numbers are; ``label_size`` then says each one's size.
        self.label_resolution = label_resolution and not train
        self.seed = seed % (1 << 64)  # SeedSequence wants non-negative entropy
        # A shared-memory scalar, not an int: forked persistent workers keep their copy of the
        # dataset for the whole run, and must still see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.info = dataset_info(data)
        self.bad_files: list[str] = []
        self._mean = np.asarray(data.mean, dtype=np.float32)
        self._std = np.asarray(data.std, dtype=np.float32)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (a pure function of seed, epoch and index)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch whose augmentations ``__getitem__`` returns."""
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.source)

    def sample_id(self, index: int) -> str:
        """A stable name of sample ``index`` (e.g. its image path under the root)."""
        return self.source.sample_id(index)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The sample resized to the base frame: uint8 image [H, W, 3], int64 mask [H, W]
        (with ``label_resolution``, the mask keeps its own size)."""
        image, mask = self.source.load(index)
        if self.data.resize is not None:
            image = resize_image(image, self.data.resize)
            if not self.label_resolution:
                mask = resize_nearest(mask, self.data.resize)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, mask, index = self._load_good(index)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            item = self._train_item(image, mask, index, rng)
        else:
            frame = image.shape[:2]
            item = self._item(self._normalise(image.astype(np.float32) / 255.0), mask, index,
                              scale=1.0, scaled=frame, box=(0, 0, *frame), flip=False, base=frame)
        labelled = is_labelled(self.source, index)
        item["labelled"] = torch.tensor(labelled)
        if not labelled:
            # The KD term sees every image pixel of an image without a mask: its placeholder mask,
            # transformed with it, is 0 there and void in the padding. The CE sees none.
            item["kd_mask"] = item["mask"]
            item["mask"] = torch.full_like(item["mask"], self.data.ignore_index)
        return item

    def _load_good(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Load ``index``, or with ``skip_bad_files`` the next readable sample after a bad one."""
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                image, mask = self.load_raw(candidate)
                return image, mask, candidate
            except BadFileError as error:
                if not self.data.skip_bad_files:
                    raise
                if error.path not in self.bad_files:
                    self.bad_files.append(error.path)
                    logger.warning("skipping unreadable file (%d so far in this process): %s",
                                   len(self.bad_files), error)
        raise DataError(f"no readable sample in {len(self)} items: {self.bad_files[:5]}")

    def _train_item(self, image: np.ndarray, mask: np.ndarray, index: int,
                    rng: np.random.Generator) -> dict[str, Any]:
        data = self.data
        base = mask.shape
        # The geometric draws happen whatever the options (the jitter's come last), so turning
        # one option off never shifts the randomness of another.
        scale = float(rng.uniform(*data.scale_range))
        top_u, left_u, flip_u = rng.random(3)
        scaled = (max(1, int(np.floor(base[0] * scale + 0.5))),
                  max(1, int(np.floor(base[1] * scale + 0.5))))
        image, mask = resize_image(image, scaled), resize_nearest(mask, scaled)
        crop_h, crop_w = data.crop_size if data.crop_size is not None else scaled
        # The scaled image is padded at the bottom/right to at least the crop size.
        top = int(top_u * (max(scaled[0], crop_h) - crop_h + 1))
        left = int(left_u * (max(scaled[1], crop_w) - crop_w + 1))
        flip = bool(data.hflip and flip_u < 0.5)
        image = image[top : top + crop_h, left : left + crop_w].astype(np.float32) / 255.0
        # Jitter the valid pixels before padding (the padding must not shift the contrast mean)
        # and before the flip, which it commutes with: it uses global statistics and pixel maps.
        if data.color_jitter > 0:
            image = jitter(image, data.color_jitter, rng)
        image = self._normalise(image)
        valid_h, valid_w = image.shape[:2]
        # Pad after normalising with 0, i.e. the raw image padded with the mean colour.
        canvas = np.zeros((crop_h, crop_w, 3), dtype=np.float32)
        canvas[:valid_h, :valid_w] = image
        labels = np.full((crop_h, crop_w), data.ignore_index, dtype=np.int64)
        labels[:valid_h, :valid_w] = mask[top : top + crop_h, left : left + crop_w]
        if flip:  # copies: a one-pixel-wide view flipped keeps a negative stride torch refuses
            canvas, labels = canvas[:, ::-1].copy(), labels[:, ::-1].copy()
        return self._item(canvas, labels, index, scale=scale, scaled=scaled,
                          box=(top, left, crop_h, crop_w), flip=flip, base=base)

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        return (image - self._mean) / self._std

    @staticmethod
    def _item(image: np.ndarray, mask: np.ndarray, index: int, *, scale: float,
              scaled: tuple[int, int], box: tuple[int, int, int, int], flip: bool,
              base: tuple[int, int]) -> dict[str, Any]:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)),
            "label_size": torch.tensor(mask.shape, dtype=torch.int64),
            "index": index,
            "geometry": {
                "base_size": torch.tensor(base, dtype=torch.int64),
                "scaled_size": torch.tensor(scaled, dtype=torch.int64),
                "scale": torch.tensor(scale, dtype=torch.float32),
                "crop_box": torch.tensor(box, dtype=torch.int64),
                "flip": torch.tensor(flip, dtype=torch.bool),
            },
        }


# --------------------------------------------------------------------------------------------
# Building datasets and loaders


def build_dataset(data: DataConfig, split: str, *, train: bool, seed: int = 0,
                  label_resolution: bool = False, unlabelled: bool = False) -> SegmentationDataset:
    """The samples ``split`` selects, with the train (random) or eval (deterministic) transform.

    ``split`` is a selector (``val``, ``train+val``, ``train+val:prefix=0006R0``; see
    :mod:`distill.data.splits`). The training split never holds a validation sample: what
    ``data.val_split`` selects (a split, or a held-out group) is removed from ``data.train_split``.
    ``label_resolution`` (eval only) keeps each mask at its own size, see ``eval.resolution``.
    Of ``data.train_split`` for training, ``data.labelled_fraction`` keeps every k-th image's mask; with
    ``unlabelled`` (distillation, and the logit cache) the other images and ``data.unlabelled``
    follow as images without masks (see :mod:`distill.data.unlabelled`).

    Raises:
        DataError: a missing or empty folder, unpaired files, a bad ``class_names``, or a
            selector that selects nothing.
    """
    selector = _parse(split, "split")
    source = _select(data, selector)
    if split == data.train_split and split != data.val_split:
        held_out = _parse(data.val_split, "data.val_split")
        if set(held_out.splits) & set(selector.splits):
            # Every validation sample (a whole group), whatever data.max_samples keeps of it.
            try:
                source = without_samples(source, _select(data, held_out), split, held_out.text)
            except SplitError as error:
                raise DataError(str(error)) from None
    source = first_samples(source, data.max_samples)  # after the selection: N of the chosen samples
    if split == data.train_split and (train or unlabelled):  # scoring it scores every mask
        source = _with_unlabelled(data, source, include=unlabelled)
    return SegmentationDataset(source, data, train=train, seed=seed, label_resolution=label_resolution)


def _with_unlabelled(data: DataConfig, source: SampleSource, *, include: bool) -> SampleSource:
    """The training split's labelled part (``labelled_fraction``), then, with ``include``, its
    other images and ``data.unlabelled`` as images without masks."""
    step = max(1, round(1 / data.labelled_fraction))
    rows: list[tuple[Any, int]] = [(source, k) for k in range(0, len(source), step)]
    if not include:
        return source if step == 1 else Subset(rows)
    extra: list[Any] = []
    if step > 1:
        extra.append((Subset([(source, k) for k in range(len(source)) if k % step]), 1))
    # A split given as unlabelled never brings back a validation sample (that would leak the
    # scenes validation measures) nor a training one (it is there already).
    held = [source]
    if data.val_split != data.train_split:
        held.append(_select(data, _parse(data.val_split, "data.val_split")))
    taken = {part.sample_id(k) for part in held for k in range(len(part))}
    # Likewise a folder's images that are those files (only looked up when a folder is given).
    files = ({image_file(part, k) for part in held for k in range(len(part))} - {None}
             if any(entry.folder is not None for entry in data.unlabelled) else set())
    # Every `synthetic:` entry takes the next images of one stream of its own (not the same ones).
    generated = sum(entry.synthetic or 0 for entry in data.unlabelled)
    stream = (SyntheticShapes(data.synthetic.model_copy(update={"num_val": generated}), "unlabelled")
              if generated else None)
    offset = 0
    for entry in data.unlabelled:
        if entry.split is not None:
            part = _select(data, _parse(entry.split, "data.unlabelled split"))
            kept = [(part, k) for k in range(len(part)) if part.sample_id(k) not in taken]
            if not kept:
                raise DataError(f"data.unlabelled split '{entry.split}' holds only training or "
                                f"validation images ({len(part)}): nothing to add")
            extra.append((Subset(kept), entry.repeat))
        elif entry.folder is not None:
            folder = FolderImages(entry.folder, entry.repeat)
            kept = [path for path in folder.paths if path.resolve() not in files]
            if not kept:
                raise DataError(f"data.unlabelled folder '{entry.folder}' holds only training or "
                                f"validation images ({len(folder)}): nothing to add")
            if len(kept) < len(folder):
                logger.info("data.unlabelled folder %s: %d training or validation images left out",
                            entry.folder, len(folder) - len(kept))
                folder.paths = kept
            extra.append((folder, entry.repeat))
        else:
            assert stream is not None and entry.synthetic is not None
            extra.append((Subset([(stream, k) for k in range(offset, offset + entry.synthetic)]), entry.repeat))
            offset += entry.synthetic
    if not extra:
        return source
    for part, times in extra:
        unlabelled = part if isinstance(part, FolderImages) else WithoutMasks(part, times)
        unlabelled = first_samples(unlabelled, data.max_samples)
        rows += [(unlabelled, k) for k in range(len(unlabelled))]
    return Subset(rows)


def _parse(split: str, what: str) -> SplitSelector:
    try:
        return parse_split(split)
    except SplitError as error:
        raise DataError(f"{what}: {error}") from None


def _layout_split(data: DataConfig, split: str) -> SampleSource:
    if data.dataset == "synthetic":
        return SyntheticShapes(data.synthetic, split)
    if data.root is None:
        raise DataError(f"dataset '{data.dataset}' needs data.root")
    return FILE_SOURCES[data.dataset](data.root, split, ignore_index=data.ignore_index,
                                      class_names=data.class_names)


def _select(data: DataConfig, selector: SplitSelector) -> SampleSource:
    parts = [_layout_split(data, name) for name in selector.splits]
    if len(parts) == 1 and not selector.is_group:
        return parts[0]  # the common case keeps the layout's own source
    rows = [(part, k) for part in parts for k in range(len(part))]
    try:
        kept = select(selector, [part.sample_id(k) for part, k in rows],
                      group_pattern=data.group_pattern)
    except SplitError as error:
        raise DataError(str(error)) from None
    return Subset([rows[k] for k in kept])


def loader_for_dataset(dataset: Dataset, data: DataConfig, *, train: bool, seed: int = 0
                       ) -> DataLoader:
    """A DataLoader over a dataset of your own, batched as distill's (see the module doc).

    Items are ``(image, mask)`` pairs or dicts with ``image`` (float [3, H, W], normalised as
    the models expect) and ``mask`` (int [H, W] of class ids and ``data.ignore_index``); a
    :class:`SegmentationDataset` passes through unchanged. ``data`` gives batch sizes and workers.
    """
    batch_size = data.batch_size if train else (data.eval_batch_size or data.batch_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    # Each item with its index, except a stream's (it has none to give): batches name their samples.
    stream = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset if stream else Indexed(dataset), batch_size=batch_size, shuffle=train, drop_last=train,
        num_workers=data.num_workers, pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(collate_user_items, ignore_index=data.ignore_index, indexed=not stream),
        generator=generator, persistent_workers=data.num_workers > 0,
    )


def build_loader(data: DataConfig, split: str, *, train: bool, seed: int = 0,
                 label_resolution: bool = False, unlabelled: bool = False) -> DataLoader:
    """A plain DataLoader over :func:`build_dataset` (ready for ``accelerator.prepare``).

    Training loaders shuffle with a generator seeded from ``seed`` and drop the last partial
    batch; evaluation loaders keep the order and every sample. With ``unlabelled`` (the
    distilled student's training loader) and images without masks, each batch holds
    ``data.unlabelled_ratio`` of them (:class:`distill.data.unlabelled.MixedBatchSampler`); a ratio
    of 0 leaves them out (``labelled_fraction`` then distils on the kept masks alone).
    """
    unlabelled = unlabelled and data.unlabelled_ratio > 0
    dataset = build_dataset(data, split, train=train, seed=seed, label_resolution=label_resolution,
                            unlabelled=unlabelled)
    batch_size = data.batch_size if train else (data.eval_batch_size or data.batch_size)
    collate = functools.partial(collate_batch, ignore_index=data.ignore_index)
    flags = [is_labelled(dataset.source, k) for k in range(len(dataset))] if unlabelled and train else []
    if flags and not all(flags):
        drawn = [k for k, f in enumerate(flags) if not f for _ in range(repeat(dataset.source, k))]
        sampler = MixedBatchSampler([k for k, f in enumerate(flags) if f], drawn, batch_size,
                                    data.unlabelled_ratio, seed, dataset)
        # A generator of its own, as the plain loader's: without one, each iterator draws its
        # workers' base seed from torch's global generator, which a resumed process restores
        # at another point than the straight run reached it (other dropout masks after a resume).
        return DataLoader(dataset, batch_sampler=sampler, num_workers=data.num_workers,
                          pin_memory=torch.cuda.is_available(), collate_fn=collate,
                          generator=torch.Generator().manual_seed(seed),
                          persistent_workers=data.num_workers > 0)
    if train and len(dataset) < batch_size:
        kept = (f" with masks (data.labelled_fraction {data.labelled_fraction:g}: one mask in "
                f"{round(1 / data.labelled_fraction)})" if data.labelled_fraction < 1 else "")
        raise DataError(
            f"split '{split}' has {len(dataset)} samples{kept}, fewer than data.batch_size "
            f"{batch_size}: dropping the last partial batch would leave no batch at all"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=data.num_workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate,
        generator=generator,
        persistent_workers=data.num_workers > 0,
    )
