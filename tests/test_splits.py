"""Held-out groups: split selectors pool splits, select groups, and keep them out of training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data.splits import SplitError, file_safe, parse_split, sample_group, select
from distill.config import DataConfig, RecipeError, recipe_from_dict
from distill.data import DataError, build_dataset

# Two "sequences" in train (seqA x3, seqB x2) and one more in val (seqA x1, seqC x2).
FILES = {"train": ["seqA_001", "seqA_002", "seqA_003", "seqB_001", "seqB_002"],
         "val": ["seqA_004", "seqC_001", "seqC_002"]}


def make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, stems in FILES.items():
        for stem in stems:
            for folder, array in ((split, rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)),
                                  (f"{split}annot", rng.integers(0, 12, (6, 8), dtype=np.uint8))):
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / f"{stem}.png")
    return root


def names(dataset) -> list[str]:
    return [dataset.sample_id(i) for i in range(len(dataset))]


def data(root: Path, **values) -> DataConfig:
    return DataConfig(dataset="camvid", root=root, num_workers=0, **values)


def test_pooled_and_prefix_selection(tmp_path):
    root = make_tree(tmp_path)
    cfg = data(root, train_split="train+val", val_split="train+val:prefix=seqB,seqC")
    val = build_dataset(cfg, cfg.val_split, train=False)
    assert names(val) == ["train/seqB_001.png", "train/seqB_002.png", "val/seqC_001.png", "val/seqC_002.png"]
    train = build_dataset(cfg, cfg.train_split, train=True)
    # The held-out group is removed from the pooled training split; nothing else is.
    assert names(train) == ["train/seqA_001.png", "train/seqA_002.png", "train/seqA_003.png", "val/seqA_004.png"]
    image, mask = train.load_raw(3)  # loads from the second split of the pool
    assert image.shape == (6, 8, 3) and mask.shape == (6, 8)
    # The pool named by anything but data.train_split keeps every sample.
    assert len(build_dataset(data(root, train_split="train"), "train+val", train=False)) == 8


def test_folds_cover_every_group_once(tmp_path):
    root = make_tree(tmp_path)
    seen: list[str] = []
    for fold in range(3):
        cfg = data(root, train_split="train+val", val_split=f"train+val:fold={fold}/3")
        val = names(build_dataset(cfg, cfg.val_split, train=False))
        train = names(build_dataset(cfg, cfg.train_split, train=True))
        groups = {sample_group(n, cfg.group_pattern) for n in val}
        assert len(groups) == 1  # three groups over three folds: one sequence per fold
        assert not set(val) & set(train) and len(val) + len(train) == 8
        seen += val
    assert sorted(seen) == sorted(f"{s}/{n}.png" for s, stems in FILES.items() for n in stems)


def test_list_file_selects_by_stem_name_or_id(tmp_path):
    root = make_tree(tmp_path)
    listing = tmp_path / "holdout.txt"
    # A byte-order mark (Windows editors) and an indented comment are no sample names.
    listing.write_text("\ufeff# held out\nseqA_002\n  # the B camera\nseqB_001.png\nval/seqC_002.png\n",
                       encoding="utf-8")
    cfg = data(root, train_split="train+val", val_split=f"train+val:list={listing}")
    assert names(build_dataset(cfg, cfg.val_split, train=False)) == [
        "train/seqA_002.png", "train/seqB_001.png", "val/seqC_002.png"]
    listing.write_text("seqA_002\nseqZ_404\n")
    with pytest.raises(DataError, match="names 1 sample.*'seqZ_404'"):
        build_dataset(cfg, cfg.val_split, train=False)
    cfg = data(root, val_split=f"train:list={tmp_path / 'missing.txt'}")
    with pytest.raises(DataError, match="cannot read list file '.*missing.txt'"):
        build_dataset(cfg, cfg.val_split, train=False)


def test_group_pattern_with_capture_group():
    assert sample_group("train/aachen_000001_000019_leftImg8bit.png", "^[^_]+") == "aachen"
    assert sample_group("x/clip-7-frame-0003.jpg", r"^(clip-\d+)-") == "clip-7"
    assert sample_group("x/nomatch.png", r"^\d+") == "nomatch.png"


def test_selector_that_selects_nothing_lists_the_groups(tmp_path):
    root = make_tree(tmp_path)
    cfg = data(root, val_split="train+val:prefix=0006R0")
    with pytest.raises(DataError, match=r"selects none of the 8 samples of train\+val .*seqA, seqB, seqC"):
        build_dataset(cfg, cfg.val_split, train=False)


def test_everything_held_out_is_an_error(tmp_path):
    root = make_tree(tmp_path)
    cfg = data(root, train_split="train", val_split="train+val:prefix=seq")
    with pytest.raises(DataError, match="train_split 'train' has no sample left"):
        build_dataset(cfg, cfg.train_split, train=True)


@pytest.mark.parametrize("text, message", [
    ("train+", "must be split names joined by '\\+'"),
    ("train:prefix", "the group after ':' must be prefix"),
    ("train:bogus=1", "the group after ':' must be prefix"),
    ("train:prefix=a,,b", "empty prefix"),
    ("train:fold=2/2", "0 <= K < N"),
    ("train:fold=a/3", "0 <= K < N"),
    (".", "'.' and '..' are folders"),  # images/. of a folder layout: every split, and the store's root
    ("train+..:prefix=a", "'.' and '..' are folders"),
    ("train+val+train", "names 'train' twice"),  # every sample would count twice
])
def test_malformed_selectors(text, message):
    with pytest.raises(SplitError, match=message):
        parse_split(text)


def test_file_safe_never_names_the_folder_itself_or_its_parent():
    assert file_safe(".").startswith(".-") and file_safe("..").startswith("..-")  # hashed: '.-<8 hex>'
    assert file_safe("train") == "train"


def test_recipe_validates_selectors_and_pattern_without_the_disk():
    with pytest.raises(RecipeError, match="data.val_split: split 'val:fold=1/1'"):
        recipe_from_dict({"model": {}, "data": {"val_split": "val:fold=1/1"}})
    with pytest.raises(RecipeError, match="cache.splits: split 'a:b'"):
        recipe_from_dict({"model": {}, "cache": {"splits": ["a:b"]}})
    with pytest.raises(RecipeError, match="data.group_pattern: '\\(' is not a regular expression"):
        recipe_from_dict({"model": {}, "data": {"group_pattern": "("}})


def test_select_keeps_order_and_fold_stride():
    ids = [f"s/{g}_{k}.png" for g in "dcba" for k in range(2)]
    fold = parse_split("s:fold=0/2")  # sorted groups a, b, c, d: fold 0 takes a and c
    assert [ids[k] for k in select(fold, ids, group_pattern="^[^_]+")] == [
        "s/c_0.png", "s/c_1.png", "s/a_0.png", "s/a_1.png"]


def test_synthetic_splits_pool_and_never_train_on_validation_samples():
    cfg = DataConfig(num_workers=0, train_split="train+val", val_split="train")
    pooled = build_dataset(cfg, "train+val", train=False)
    assert len(pooled) == cfg.synthetic.num_val  # the validation split left the pool
    plain = DataConfig(num_workers=0, train_split="train+val", val_split="val")
    assert len(build_dataset(plain, "train+val", train=False)) == plain.synthetic.num_train
