"""The recipe's ``data`` section: dataset, splits, augmentation, batches, images without masks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config._base import DISTILLED, EVERY_STAGE, IMAGENET_MEAN, IMAGENET_STD, RUN_ONLY, STUDENTS, Section
from distill.data.splits import parse_split


class SyntheticConfig(Section):
    """The built-in dataset, generated from a seed (see ``distill.data.SyntheticShapes``)."""

    num_train: int = Field(256, ge=1, description="training images")
    num_val: int = Field(64, ge=1, description="validation images")
    size: tuple[int, int] = Field((96, 96), description="(height, width) of every image")

    @field_validator("size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8:
            raise ValueError(f"{list(value)} must be at least 8 pixels on each side")
        return value
    num_classes: int = Field(6, ge=2, le=12, description="background + shape classes")
    seed: int = Field(0, ge=0, lt=2**32, description="generator seed; the same seed gives the same images")


def optional_split(value: str | None) -> str | None:
    """A split selector's syntax (a SplitError is a ValueError: pydantic names the key)."""
    if value is not None:
        parse_split(value)
    return value


class UnlabelledSource(Section):
    """Images without masks, distilled on every pixel: exactly one of the three keys."""

    split: str | None = Field(
        None, description="a split (or selector) of data.dataset's layout, its masks ignored"
    )
    folder: Path | None = Field(
        None, description="a folder of images (sub-folders included); the dataset's training and "
        "validation images in it are left out")
    synthetic: int | None = Field(
        None, ge=1, description="this many more images of the built-in generator (another stream)"
    )
    repeat: int = Field(
        1, ge=1, description="each of these images is drawn this many times as often as one of "
        "repeat 1 (weights footage of the scenes the student will run on above the rest)"
    )

    _split_syntax = field_validator("split")(optional_split)

    @model_validator(mode="after")
    def _one_source(self) -> UnlabelledSource:
        given = [k for k in ("split", "folder", "synthetic") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"an unlabelled source takes exactly one of split, folder, synthetic "
                             f"(got {', '.join(given) or 'none'})")
        return self


class DataConfig(Section):
    """Where the images come from and how they are augmented and batched."""

    dataset: Literal["synthetic", "camvid", "cityscapes", "ade20k", "voc", "folder"] = Field(
        "synthetic", description="on-disk layout (docs/recipe.md, Datasets)", json_schema_extra=EVERY_STAGE
    )
    root: Path | None = Field(None, description="dataset folder (not used by `synthetic`)", json_schema_extra=EVERY_STAGE)
    class_names: list[str] | None = Field(
        None, description="required for `folder`; optional elsewhere to rename classes (a rename redoes only the "
        "comparison, and the student when teacher.class_map names classes; another count redoes every stage)",
        json_schema_extra=EVERY_STAGE
    )
    ignore_index: int = Field(255, ge=0, description="label value excluded from loss and metrics", json_schema_extra=EVERY_STAGE)
    train_split: str = Field(
        "train", description="split the model is trained on; `a+b` pools splits (README, Data: scenes no model trained on)", json_schema_extra=EVERY_STAGE
    )
    val_split: str = Field(
        "val", description="split evaluated during training, or a held-out group such as "
        "`train+val:prefix=0006R0`, `...:list=FILE`, `...:fold=K/N` (removed from train_split)", json_schema_extra=EVERY_STAGE
    )
    group_pattern: str = Field(
        "^[^_]+", description="regex whose first match in a file name is its group (fold=K/N); "
        "default: the name up to the first `_` (a CamVid sequence, a Cityscapes city)", json_schema_extra=EVERY_STAGE
    )
    resize: tuple[int, int] | None = Field(
        None, description="(height, width) every image is resized to before augmentation and eval", json_schema_extra=EVERY_STAGE
    )
    crop_size: tuple[int, int] | None = Field(
        None, description="(height, width) of training crops; padded with ignore_index if larger", json_schema_extra=EVERY_STAGE
    )
    scale_range: tuple[float, float] = Field((1.0, 1.0), description="random rescale range", json_schema_extra=EVERY_STAGE)
    hflip: bool = Field(True, description="random horizontal flip while training", json_schema_extra=EVERY_STAGE)
    color_jitter: float = Field(
        0.0, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter strength (image only)", json_schema_extra=EVERY_STAGE
    )
    cutmix: float = Field(
        0.0, ge=0.0, le=1.0, description="chance that a training image gets a box of another image "
        "of its batch pasted in, its masks cut with it (CutMix; README, Mixed batches); distilling "
        "needs teacher.mode stream, which runs the teacher on the mixed images", json_schema_extra=EVERY_STAGE
    )
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="RGB mean, images in [0, 1]", json_schema_extra=EVERY_STAGE)
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="RGB std, images in [0, 1]", json_schema_extra=EVERY_STAGE)
    batch_size: int = Field(8, ge=1, description="per process", json_schema_extra=EVERY_STAGE)
    eval_batch_size: int | None = Field(None, ge=1, description="defaults to batch_size", json_schema_extra=RUN_ONLY)
    num_workers: int = Field(2, ge=0, description="data-loader worker processes (0: in the main one)", json_schema_extra=RUN_ONLY)
    max_samples: int | None = Field(None, ge=1, description="use only the first N samples a split (or selector) selects", json_schema_extra=EVERY_STAGE)
    skip_bad_files: bool = Field(False, description="skip unreadable images instead of stopping", json_schema_extra=EVERY_STAGE)
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="the built-in dataset's settings", json_schema_extra=EVERY_STAGE
    )
    unlabelled: list[UnlabelledSource] = Field(
        default_factory=list, description="images without masks the distilled student also learns "
        "from (the teacher labels them softly); see README, Images without masks", json_schema_extra=DISTILLED
    )
    labelled_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="students keep the masks of every k-th training image "
        "(k = round(1 / fraction)); the distilled one learns from the others unlabelled. A teacher "
        "distill trains uses every mask", json_schema_extra=STUDENTS
    )
    unlabelled_ratio: float = Field(
        0.5, ge=0.0, lt=1.0, description="share of each distillation batch drawn from the "
        "unlabelled images, when there are any; 0 with labelled_fraction distils on the kept masks alone", json_schema_extra=DISTILLED
    )

    @field_validator("labelled_fraction")
    @classmethod
    def _one_in_k(cls, value: float) -> float:
        step = max(1, round(1 / value))
        # 1/k to 3 decimal places (0.333 for 1/3, 0.167 for 1/6): every k-th image is used either way.
        if abs(value - 1 / step) > 5e-4:
            raise ValueError(f"{value} is not 1/k for a whole k (every k-th image keeps its mask): "
                             f"use e.g. {1 / step:.4g} (1/{step})")
        return value

    @field_validator("train_split", "val_split")
    @classmethod
    def _split_syntax(cls, value: str) -> str:
        parse_split(value)  # a SplitError is a ValueError: pydantic names the key
        return value

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"'{value}' is not a regular expression ({error})") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        # A value check only: whether the folder exists is asked where it is read (the schema
        # validates values, not the disk, so a recipe prints before its data is there).
        if self.dataset != "synthetic" and self.root is None:
            raise ValueError(f"data.root is required for dataset '{self.dataset}'")
        if self.dataset == "folder" and not self.class_names:
            raise ValueError("data.class_names is required for dataset 'folder'")
        repeated = repeated_names(self.class_names or [])
        if repeated:  # per-class scores are keyed by name: one would overwrite the other
            raise ValueError(f"data.class_names names {repeated} more than once")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"data.scale_range {list(self.scale_range)} must satisfy 0 < low <= high")
        for key in ("resize", "crop_size"):
            value = getattr(self, key)
            if value is not None and min(value) < 1:
                raise ValueError(f"data.{key} {list(value)} must be positive")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std {list(self.std)} must be positive")
        sources = [(u.split, str(u.folder) if u.folder is not None else None) for u in self.unlabelled]
        twice = next((n for n, source in enumerate(sources) if source != (None, None) and source in sources[:n]), None)
        if twice is not None:  # each of its images would be drawn twice as often, unsaid
            given = self.unlabelled[twice]
            what = f"split '{given.split}'" if given.split is not None else f"folder '{given.folder}'"
            raise ValueError(f"data.unlabelled lists the {what} twice; to draw its images more "
                             "often, give it once with `repeat`")
        return self


def repeated_names(names: list[str]) -> list[str]:
    """The names that occur more than once, in order."""
    return sorted({name for name in names if names.count(name) > 1}, key=names.index)
