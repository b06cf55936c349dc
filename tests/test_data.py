"""Tests of distill.data: layouts, label mapping, joint geometry, determinism, errors, loaders.

Every on-disk layout is generated as a tiny tree in ``tmp_path``; the real CamVid folder beside
the checkout (``camvid_root`` in ``conftest.py``) is read in place and its test skipped when absent.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.config import DataConfig, SyntheticConfig
from distill.data.synthetic import SyntheticShapes
from distill.data import (
    DataError,
    SegmentationDataset,
    build_dataset,
    build_loader,
    collate_batch,
    dataset_info,
    resize_nearest,
)

VOC_PALETTE = [c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def config(**values) -> DataConfig:
    values.setdefault("num_workers", 0)
    return DataConfig(**values)


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def save_palette_mask(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(VOC_PALETTE)
    image.save(path)
    return path


def labels(height: int, width: int, values: list[int], seed: int = 0) -> np.ndarray:
    """A label map that contains every value of ``values`` (and only those)."""
    rng = np.random.default_rng(seed)
    out = rng.choice(values, size=(height, width)).astype(np.uint8)
    out.flat[: len(values)] = values
    return out


def make_camvid(root: Path, split: str = "train", count: int = 3, size=(12, 16)) -> Path:
    for i in range(count):
        save(root / split / f"f{i:03d}.png", rgb(*size, seed=i))
        save(root / f"{split}annot" / f"f{i:03d}.png", labels(*size, list(range(12)), seed=i))
    return root


def make_folder(root: Path, split: str = "train", count: int = 3, sizes=None,
                num_classes: int = 4, ignore: int = 255) -> Path:
    for i in range(count):
        size = sizes[i] if sizes else (10, 14)
        suffix = ".jpg" if i % 2 else ".png"
        save(root / "images" / split / f"s{i}{suffix}", rgb(*size, seed=i))
        save(root / "masks" / split / f"s{i}.png",
             labels(*size, [*range(num_classes), ignore], seed=i))
    return root


# --------------------------------------------------------------------------------------------
# Layouts and label mapping


def test_camvid_layout_maps_void_and_respects_max_samples(tmp_path):
    make_camvid(tmp_path, "train", count=4)
    make_camvid(tmp_path, "val", count=2)
    data = config(dataset="camvid", root=tmp_path)
    train = build_dataset(data, "train", train=False)
    assert len(train) == 4 and len(build_dataset(data, "val", train=False)) == 2
    item = train[1]
    assert item["image"].shape == (3, 12, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (12, 16) and item["mask"].dtype == torch.int64
    assert item["index"] == 1
    raw = np.asarray(Image.open(tmp_path / "trainannot" / "f001.png")).astype(np.int64)
    expected = np.where(raw == 11, 255, raw)
    assert np.array_equal(item["mask"].numpy(), expected)
    assert set(item["mask"].unique().tolist()) == {*range(11), 255}
    short = build_dataset(config(dataset="camvid", root=tmp_path, max_samples=2), "train",
                          train=False)
    assert len(short) == 2 and short.sample_id(1) == "train/f001.png"


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    ids = [0, 1, 4, 7, 8, 11, 26, 33]
    for city, count in (("aachen", 2), ("bonn", 1)):
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", rgb(8, 16))
            save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png",
                 labels(8, 16, ids, seed=i))
            # Other gtFine files (colour, instances) sit beside the labelIds and are not masks.
            save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_color.png", rgb(8, 16))
    dataset = build_dataset(config(dataset="cityscapes", root=tmp_path), "val", train=False)
    assert len(dataset) == 3
    assert dataset.sample_id(2).startswith("leftImg8bit/val/bonn/")
    raw = np.asarray(Image.open(dataset.source.pairs[0][1]))
    mask = dataset[0]["mask"].numpy()
    mapping = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 11: 2, 26: 13, 33: 18}
    for label_id, train_id in mapping.items():
        assert set(np.unique(mask[raw == label_id])) == {train_id}
    assert dataset_info(config(dataset="cityscapes", root=tmp_path)).num_classes == 19


@pytest.mark.parametrize("nested", [True, False])
def test_ade20k_layout_shifts_labels_and_ignores_zero(tmp_path, nested):
    base = tmp_path / "ADEChallengeData2016" if nested else tmp_path
    for i in range(2):
        for split in ("training", "validation"):
            save(base / "images" / split / f"ADE_{split}_{i:08d}.jpg", rgb(10 + i, 12))
            save(base / "annotations" / split / f"ADE_{split}_{i:08d}.png",
                 labels(10 + i, 12, [0, 1, 2, 150], seed=i))
    data = config(dataset="ade20k", root=tmp_path)
    dataset = build_dataset(data, "val", train=False)
    assert len(dataset) == 2 and len(build_dataset(data, "train", train=False)) == 2
    raw = np.asarray(Image.open(dataset.source.pairs[1][1])).astype(np.int64)
    mask = dataset[1]["mask"].numpy()
    assert mask.shape == (11, 12)
    assert np.array_equal(mask, np.where(raw == 0, 255, raw - 1))
    info = dataset_info(data)
    assert info.num_classes == 150 and info.class_names[0] == "wall"
    assert info.class_names[-1] == "flag" and len(set(info.palette)) == 150


@pytest.mark.parametrize("devkit", [False, True])
def test_voc_reads_palette_indices_and_split_lists(tmp_path, devkit):
    base = tmp_path / "VOCdevkit" / "VOC2012" if devkit else tmp_path
    ids = ["2007_000032", "2007_000039", "2008_000002"]
    for i, name in enumerate(ids):
        save(base / "JPEGImages" / f"{name}.jpg", rgb(9, 13, seed=i))
        save_palette_mask(base / "SegmentationClass" / f"{name}.png",
                          labels(9, 13, [0, 1, 15, 20, 255], seed=i))
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[2] + "\n")
    data = config(dataset="voc", root=tmp_path)
    train = build_dataset(data, "train", train=False)
    assert len(train) == 2 and len(build_dataset(data, "val", train=False)) == 1
    raw = np.asarray(Image.open(train.source.pairs[0][1]))
    assert Image.open(train.source.pairs[0][1]).mode == "P"
    assert np.array_equal(train[0]["mask"].numpy(), raw.astype(np.int64))  # 255 stays 255
    voc = dataset_info(data)
    assert voc.num_classes == 21 and voc.palette[1] == (128, 0, 0) and voc.palette[15] == (
        192, 128, 128)


def test_folder_layout_uses_class_names_and_mixed_formats(tmp_path):
    make_folder(tmp_path, count=3, sizes=[(10, 14), (10, 14), (10, 14)])
    data = config(dataset="folder", root=tmp_path, class_names=["a", "b", "c", "d"])
    dataset = build_dataset(data, "train", train=False)
    assert len(dataset) == 3
    assert [dataset.sample_id(i) for i in range(3)] == [
        "images/train/s0.png", "images/train/s1.jpg", "images/train/s2.png"]
    assert set(dataset[1]["mask"].unique().tolist()) == {0, 1, 2, 3, 255}
    assert dataset.info.class_names == ["a", "b", "c", "d"]


def test_grey_rgba_and_palette_images_load_as_rgb(tmp_path):
    for i, mode in enumerate(["L", "RGBA", "P", "RGB"]):
        save(tmp_path / "images" / "train" / f"{i}.png", rgb(6, 7, seed=i), mode=mode)
        save(tmp_path / "masks" / "train" / f"{i}.png", labels(6, 7, [0, 1]))
    dataset = build_dataset(config(dataset="folder", root=tmp_path, class_names=["x", "y"]),
                            "train", train=False)
    assert [tuple(dataset[i]["image"].shape) for i in range(4)] == [(3, 6, 7)] * 4
    grey = dataset[0]["image"] * torch.tensor(dataset.data.std)[:, None, None]
    assert torch.allclose(grey[0] + 0.485, grey[1] + 0.456, atol=1e-5)  # R == G: was grey


def test_dataset_info_without_files_and_renaming(tmp_path):
    synthetic = dataset_info(config(synthetic=SyntheticConfig(num_classes=5)))
    assert synthetic.num_classes == 5 and synthetic.class_names[0] == "background"
    assert len(synthetic.palette) == 5 and synthetic.ignore_index == 255
    camvid = dataset_info(config(dataset="camvid", root=tmp_path))  # tmp_path is empty: no reads
    assert camvid.class_names[6] == "sign_symbol" and camvid.palette[0] == (128, 128, 128)
    renamed = dataset_info(config(dataset="camvid", root=tmp_path,
                                  class_names=[f"c{i}" for i in range(11)]))
    assert renamed.class_names[10] == "c10" and renamed.num_classes == 11
    with pytest.raises(ValueError, match="3 names but dataset 'camvid' has 11 classes"):
        dataset_info(config(dataset="camvid", root=tmp_path, class_names=["a", "b", "c"]))
    with pytest.raises(DataError, match="ignore_index 3 is a class"):
        dataset_info(config(dataset="camvid", root=tmp_path, ignore_index=3))


# --------------------------------------------------------------------------------------------
# The joint geometric transform and its recorded geometry


def exact_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """An independent nearest-exact resize: source index floor((i + 0.5) * in / out)."""
    # (i + 0.5) * in is exact in float64 and the quotient is never within rounding of an
    # integer unless it is one, so the floor is exact.
    rows = np.floor((np.arange(height) + 0.5) * array.shape[0] / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * array.shape[1] / width).astype(int)
    return array[rows][:, cols]


def replay(frame: np.ndarray, geometry: dict, fill: float) -> np.ndarray:
    """Scale to scaled_size, crop the box (padding with ``fill``), flip: on a base-frame array."""
    scaled = exact_nearest(frame, *geometry["scaled_size"].tolist())
    top, left, height, width = geometry["crop_box"].tolist()
    out = np.full((height, width, *frame.shape[2:]), fill, dtype=frame.dtype)
    part = scaled[top : top + height, left : left + width]
    out[: part.shape[0], : part.shape[1]] = part
    return out[:, ::-1] if bool(geometry["flip"]) else out


@pytest.mark.parametrize("resize, crop", [((30, 40), (24, 36)), (None, (50, 60)), (None, None)])
def test_recorded_geometry_replays_the_mask_exactly(tmp_path, resize, crop):
    height, width = 37, 53
    coords = np.arange(height * width, dtype=np.uint16).reshape(height, width)  # unique labels
    ys, xs = np.mgrid[0:height, 0:width]
    ramps = np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), np.full_like(xs, 128)],
                     axis=-1).astype(np.uint8)
    save(tmp_path / "images" / "train" / "a.png", ramps)
    save(tmp_path / "masks" / "train" / "a.png", coords)  # 16-bit PNG
    data = config(dataset="folder", root=tmp_path, ignore_index=65535, resize=resize,
                  crop_size=crop, scale_range=(0.5, 2.0), hflip=True,
                  class_names=[str(i) for i in range(height * width)])
    dataset = build_dataset(data, "train", train=True, seed=3)
    base_mask = exact_nearest(coords.astype(np.int64), *(resize or (height, width)))
    base_image = exact_nearest(ramps, *(resize or (height, width)))  # only its size is used
    mean, std = np.array(data.mean), np.array(data.std)
    flips, padded = set(), False
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        g = item["geometry"]
        assert g["base_size"].tolist() == list(base_mask.shape)
        expected = replay(base_mask, g, fill=65535)
        assert np.array_equal(item["mask"].numpy(), expected), f"epoch {epoch}: {g}"
        scale = float(g["scale"])
        assert g["scaled_size"].tolist() == [int(np.floor(s * scale + 0.5))
                                             for s in base_mask.shape]
        flips.add(bool(g["flip"]))
        void = expected == 65535
        padded |= bool(void.any())
        image = item["image"].numpy().transpose(1, 2, 0)
        assert np.all(image[void] == 0)  # padding is the mean colour, i.e. 0 once normalised
        # The image went through the same geometry: replay it bilinearly (as logits would be).
        pixels = image * std + mean
        frame = torch.from_numpy(np.array(Image.fromarray(ramps).resize(
            base_image.shape[1::-1], Image.BILINEAR))).permute(2, 0, 1)[None].float() / 255
        scaled = F.interpolate(frame, size=g["scaled_size"].tolist(), mode="bilinear",
                               antialias=True, align_corners=False)[0].numpy().transpose(1, 2, 0)
        top, left, h, w = g["crop_box"].tolist()
        reference = np.zeros((h, w, 3))
        part = scaled[top : top + h, left : left + w]
        reference[: part.shape[0], : part.shape[1]] = part
        reference = reference[:, ::-1] if bool(g["flip"]) else reference
        assert np.abs(pixels - reference)[~void].max() < 1 / 255  # uint8 rounding only
    assert flips == {True, False}
    assert padded == (crop is not None)  # some scales left the crop larger than the image


def test_eval_items_have_identity_geometry(tmp_path):
    make_camvid(tmp_path, count=1, size=(12, 16))
    dataset = build_dataset(config(dataset="camvid", root=tmp_path, resize=(6, 10),
                                   crop_size=(4, 4)), "train", train=False)
    item = dataset[0]
    g = item["geometry"]
    assert item["image"].shape == (3, 6, 10) and item["mask"].shape == (6, 10)
    assert g["base_size"].tolist() == g["scaled_size"].tolist() == [6, 10]
    assert float(g["scale"]) == 1.0 and g["crop_box"].tolist() == [0, 0, 6, 10]
    assert not bool(g["flip"]) and g["flip"].dtype == torch.bool
    assert g["scale"].dtype == torch.float32 and g["crop_box"].dtype == torch.int64


def test_resize_nearest_is_exact_nearest():
    array = np.arange(7 * 11).reshape(7, 11)
    for size in [(3, 5), (7, 11), (14, 22), (10, 3), (1, 1)]:
        assert np.array_equal(resize_nearest(array, size), exact_nearest(array, *size))


# --------------------------------------------------------------------------------------------
# Determinism


def test_augmentation_is_a_pure_function_of_seed_epoch_index():
    data = config(scale_range=(0.75, 1.5), crop_size=(64, 64), color_jitter=0.4,
                  synthetic=SyntheticConfig(num_train=4, num_val=2))
    first = build_dataset(data, "train", train=True, seed=7)
    second = build_dataset(data, "train", train=True, seed=7)
    for dataset in (first, second):
        dataset.set_epoch(3)
    second[0]  # reading other items first must not change anything
    a, b = first[2], second[2]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert all(torch.equal(a["geometry"][k], b["geometry"][k]) for k in a["geometry"])
    second.set_epoch(4)
    c = second[2]
    assert not torch.equal(a["image"], c["image"])
    assert not torch.equal(a["geometry"]["crop_box"], c["geometry"]["crop_box"]) or not (
        torch.equal(a["geometry"]["scale"], c["geometry"]["scale"]))
    other_seed = build_dataset(data, "train", train=True, seed=8)
    other_seed.set_epoch(3)
    assert not torch.equal(a["image"], other_seed[2]["image"])


def test_loader_batches_do_not_depend_on_worker_count():
    def batches(workers: int) -> list[dict]:
        data = config(batch_size=2, num_workers=workers, scale_range=(0.5, 1.5),
                      crop_size=(48, 48), synthetic=SyntheticConfig(num_train=6, size=(48, 48)))
        loader = build_loader(data, "train", train=True, seed=5)
        loader.dataset.set_epoch(2)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 3
    for a, b in zip(serial, parallel):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["geometry"]["crop_box"], b["geometry"]["crop_box"])


def test_persistent_workers_see_each_new_epoch():
    data = config(batch_size=2, num_workers=2, scale_range=(0.5, 1.5), crop_size=(48, 48),
                  synthetic=SyntheticConfig(num_train=4, size=(48, 48)))
    loader = build_loader(data, "train", train=True, seed=5)
    assert loader.persistent_workers  # the same two workers serve every epoch
    reference = build_dataset(data.model_copy(update={"num_workers": 0}), "train", train=True, seed=5)
    for epoch in (0, 3, 1):
        loader.dataset.set_epoch(epoch)
        reference.set_epoch(epoch)
        for batch in loader:
            for row, index in enumerate(batch["index"].tolist()):
                expected = reference[index]
                assert torch.equal(batch["image"][row], expected["image"]), (epoch, index)
                assert torch.equal(batch["geometry"]["crop_box"][row], expected["geometry"]["crop_box"])


def test_synthetic_is_reproducible_and_splits_differ():
    cfg = SyntheticConfig(num_train=5, num_val=3, num_classes=6, seed=1)
    train = SyntheticShapes(cfg, "train")
    image, mask = train.load(4)
    again_image, again_mask = SyntheticShapes(cfg, "train").load(4)
    assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert not np.array_equal(image, SyntheticShapes(cfg, "val").load(4)[0])
    other = SyntheticConfig(num_train=5, num_val=3, num_classes=6, seed=2)
    assert not np.array_equal(image, SyntheticShapes(other, "train").load(4)[0])
    data = config(synthetic=cfg)
    assert len(build_dataset(data, "train", train=False)) == 5
    assert len(build_dataset(data, "val", train=False)) == 3
    assert len(build_dataset(config(synthetic=cfg, max_samples=2), "train", train=False)) == 2
    with pytest.raises(DataError, match="synthetic split 'holdout'"):
        build_dataset(data, "holdout", train=False)


def test_synthetic_classes_need_shape_and_texture():
    cfg = SyntheticConfig(num_train=64, num_classes=12)
    source = SyntheticShapes(cfg, "train")
    seen, colours = set(), {}
    for index in range(64):
        image, mask = source.load(index)
        assert mask.min() >= 0 and mask.max() < 12
        assert (mask == 0).mean() > 0.2  # background is always present
        for label in np.unique(mask):
            seen.add(int(label))
            colours.setdefault(int(label), []).append(image[mask == label].mean(0))
    assert seen == set(range(12))
    names = dataset_info(config(synthetic=cfg)).class_names
    shapes = {name.split("_")[0] for name in names[1:]}
    patterns = {name.split("_")[1] for name in names[1:]}
    assert shapes == {"circle", "square", "triangle"} and len(patterns) == 4
    # Colour alone does not tell the class: each shape class shows widely varying colours.
    for label in range(1, 12):
        assert np.ptp(np.array(colours[label]), axis=0).max() > 100, names[label]


def test_synthetic_generation_is_fast():
    source = SyntheticShapes(SyntheticConfig(num_train=60), "train")
    best = float("inf")
    for _ in range(3):  # best of three: other processes share the two cores
        start = time.perf_counter()
        for index in range(60):
            source.load(index)
        best = min(best, (time.perf_counter() - start) / 60)
    assert best < 0.005, f"{best * 1000:.2f} ms per 96x96 image"


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_root_and_split_folders(tmp_path):
    data = config(dataset="camvid", root=tmp_path)
    with pytest.raises(DataError, match=r"root '.*nowhere' does not exist"):
        build_dataset(data.model_copy(update={"root": tmp_path / "nowhere"}), "train",
                      train=False)
    with pytest.raises(DataError, match=rf"folder '{tmp_path / 'train'}' does not exist"):
        build_dataset(data, "train", train=False)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=rf"folder '{tmp_path / 'train'}' has no"):
        build_dataset(data, "train", train=False)
    with pytest.raises(DataError, match="split list .*test.txt' does not exist"):
        build_dataset(config(dataset="voc", root=tmp_path), "test", train=False)


def test_unpaired_images_and_masks_are_named(tmp_path):
    make_camvid(tmp_path, count=2)
    for i in range(7):
        save(tmp_path / "train" / f"lonely{i}.png", rgb(4, 4))
    save(tmp_path / "trainannot" / "orphan.png", labels(4, 4, [0]))
    with pytest.raises(DataError) as error:
        build_dataset(config(dataset="camvid", root=tmp_path), "train", train=False)
    message = str(error.value)
    assert "7 images without a mask" in message and "lonely0.png" in message
    assert "(and 2 more)" in message
    assert "1 masks without an image" in message and "orphan.png" in message


def test_voc_ids_without_files_are_named(tmp_path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    save(tmp_path / "JPEGImages" / "a.jpg", rgb(4, 4))
    save_palette_mask(tmp_path / "SegmentationClass" / "b.png", labels(4, 4, [0]))
    with pytest.raises(DataError) as error:
        build_dataset(config(dataset="voc", root=tmp_path), "train", train=False)
    assert "1 ids of 'train.txt' without an image" in str(error.value) and "b.jpg" in str(
        error.value)
    assert "without a mask" in str(error.value) and "a.png" in str(error.value)


def test_image_and_mask_of_different_sizes(tmp_path):
    make_camvid(tmp_path, count=2, size=(12, 16))
    save(tmp_path / "trainannot" / "f001.png", labels(12, 15, [0]))
    dataset = build_dataset(config(dataset="camvid", root=tmp_path), "train", train=False)
    dataset[0]
    with pytest.raises(DataError, match=r"f001.png' is 16x12 .* mask '.*f001.png' is 15x12"):
        dataset[1]


@pytest.mark.parametrize("dataset, bad, message", [
    ("camvid", 12, r"annot/f000.png' has label values \[12\]"),
    ("folder", 4, r"train/s0.png' has label values \[4\] .* classes 0..3 nor ignore_index 255"),
])
def test_label_values_outside_the_classes(tmp_path, dataset, bad, message):
    if dataset == "camvid":
        make_camvid(tmp_path, count=1)
        mask_path = tmp_path / "trainannot" / "f000.png"
    else:
        make_folder(tmp_path, count=1)
        mask_path = tmp_path / "masks" / "train" / "s0.png"
    values = np.asarray(Image.open(mask_path)).copy()
    values[0, :3] = bad
    save(mask_path, values)
    data = config(dataset=dataset, root=tmp_path, class_names=["a", "b", "c", "d"]
                  if dataset == "folder" else None)
    with pytest.raises(DataError, match=message):
        build_dataset(data, "train", train=True)[0]


def test_colour_masks_are_rejected(tmp_path):
    make_folder(tmp_path, count=1)
    save(tmp_path / "masks" / "train" / "s0.png", rgb(10, 14))
    data = config(dataset="folder", root=tmp_path, class_names=["a", "b", "c", "d"])
    with pytest.raises(DataError, match="s0.png' has mode RGB"):
        build_dataset(data, "train", train=False)[0]


def corrupt(tmp_path: Path) -> tuple[Path, Path]:
    """A CamVid tree of 4 samples whose #1 is truncated and #2 is not an image at all."""
    make_camvid(tmp_path, count=4, size=(32, 32))
    truncated = tmp_path / "train" / "f001.png"
    truncated.write_bytes(truncated.read_bytes()[:120])
    garbage = tmp_path / "train" / "f002.png"
    garbage.write_bytes(b"not an image" * 10)
    return truncated, garbage


def test_corrupt_images_name_the_file(tmp_path):
    truncated, garbage = corrupt(tmp_path)
    dataset = build_dataset(config(dataset="camvid", root=tmp_path), "train", train=False)
    dataset[0]
    with pytest.raises(DataError, match=f"cannot read '{truncated}'"):
        dataset[1]
    with pytest.raises(DataError, match=f"cannot read '{garbage}'"):
        dataset[2]
    # The error keeps its type and message through loader worker processes.
    loader = build_loader(config(dataset="camvid", root=tmp_path, num_workers=2,
                                 eval_batch_size=4), "train", train=False)
    iterator = iter(loader)
    try:
        with pytest.raises(DataError, match="cannot read '.*f00[12].png'"):
            next(iterator)
    finally:
        # Left to the garbage collector, the failed iterator's workers take 5 s to shut down.
        iterator._shutdown_workers()


def test_skip_bad_files_substitutes_and_counts(tmp_path, caplog):
    truncated, garbage = corrupt(tmp_path)
    data = config(dataset="camvid", root=tmp_path, skip_bad_files=True)
    dataset = build_dataset(data, "train", train=False)
    with caplog.at_level(logging.WARNING, logger="distill.data.loaders"):
        indices = [dataset[i]["index"] for i in range(4)]
    assert indices == [0, 3, 3, 3]  # each bad sample is replaced by the next readable one
    assert dataset.bad_files == [str(truncated), str(garbage)]
    assert "2 so far" in caplog.text and str(garbage) in caplog.text


# --------------------------------------------------------------------------------------------
# Batches and loaders


def test_collate_pads_variable_size_eval_batches(tmp_path):
    make_folder(tmp_path, "val", count=3, sizes=[(10, 14), (13, 9), (8, 8)])
    data = config(dataset="folder", root=tmp_path, class_names=["a", "b", "c", "d"],
                  batch_size=1, eval_batch_size=3, ignore_index=200)
    for i in range(3):  # masks were written with 255 as void; use this recipe's 200
        path = tmp_path / "masks" / "val" / f"s{i}.png"
        values = np.asarray(Image.open(path)).copy()
        values[values == 255] = 200
        save(path, values)
    batch = next(iter(build_loader(data, "val", train=False)))
    assert batch["image"].shape == (3, 3, 13, 14) and batch["mask"].shape == (3, 13, 14)
    assert torch.all(batch["mask"][0, 10:] == 200) and torch.all(batch["image"][2, :, 8:] == 0)
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.int64
    g = batch["geometry"]
    assert g["base_size"].tolist() == [[10, 14], [13, 9], [8, 8]]
    assert g["crop_box"].shape == (3, 4) and g["scale"].shape == (3,) and g["flip"].shape == (3,)
    same = collate_batch([build_dataset(data, "val", train=False)[2]] * 2)
    assert same["image"].shape == (2, 3, 8, 8)


def test_loader_batch_sizes_shuffle_and_drop_last():
    data = config(batch_size=4, eval_batch_size=3, synthetic=SyntheticConfig(
        num_train=10, num_val=5, size=(16, 16)))
    train = build_loader(data, "train", train=True, seed=1)
    order = [b["index"].tolist() for b in train]
    assert [len(b) for b in order] == [4, 4]  # 10 samples: the last 2 are dropped
    assert sorted(sum(order, [])) != list(range(8))  # shuffled
    assert order == [b["index"].tolist() for b in build_loader(data, "train", train=True, seed=1)]
    evaluation = build_loader(data, "val", train=False)
    assert [b["index"].tolist() for b in evaluation] == [[0, 1, 2], [3, 4]]
    assert isinstance(train.dataset, SegmentationDataset) and train.num_workers == 0
    with pytest.raises(DataError, match="2 samples, fewer than data.batch_size 4"):
        build_loader(config(batch_size=4, max_samples=2), "train", train=True)


# --------------------------------------------------------------------------------------------
# Real data


@pytest.fixture
def real_camvid(camvid_root) -> Path:
    return camvid_root


def test_real_camvid(real_camvid):
    data = config(dataset="camvid", root=real_camvid, resize=(240, 320), crop_size=(192, 256),
                  scale_range=(0.5, 2.0), color_jitter=0.2)
    train = build_dataset(data, "train", train=True)
    val = build_dataset(data, "val", train=False)
    assert (len(train), len(val)) == (367, 101)
    item = train[0]
    assert item["image"].shape == (3, 192, 256) and item["mask"].shape == (192, 256)
    assert val[0]["image"].shape == (3, 240, 320) and val[0]["mask"].shape == (240, 320)
    for mask in (item["mask"], val[0]["mask"], val[100]["mask"]):
        values = set(mask.unique().tolist())
        assert values <= {*range(11), 255} and len(values - {255}) >= 3
    assert torch.isfinite(item["image"]).all()


def test_one_pixel_wide_images_flip_without_a_stride_error(tmp_path):
    make_camvid(tmp_path, count=2, size=(12, 1))
    dataset = build_dataset(config(dataset="camvid", root=tmp_path, crop_size=(4, 1), hflip=True), "train",
                            train=True)
    flips = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        flips.append(bool(item["geometry"]["flip"]))
        assert item["image"].shape == (3, 4, 1) and item["mask"].shape == (4, 1)
    assert any(flips)  # the flipped path ran


def test_training_reads_images_as_predict_does_16_bit_grey_and_exif(tmp_path):
    # 16-bit grayscale is scaled by its range (not clipped to white by PIL's RGB conversion), and
    # EXIF orientation is applied, as `distill predict` does: one decoder for training and use.
    grey8 = np.random.default_rng(0).integers(0, 256, (10, 14), dtype=np.uint8)
    save(tmp_path / "images" / "train" / "a.png", np.repeat(grey8[..., None], 3, axis=2))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "images" / "train" / "b.png")
    upright = rgb(10, 14, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: viewers rotate it 90 degrees clockwise
    Image.fromarray(np.rot90(upright, 1).copy()).save(tmp_path / "images" / "train" / "c.png", exif=exif)
    for name, shape in (("a", (10, 14)), ("b", (10, 14)), ("c", (10, 14))):
        save(tmp_path / "masks" / "train" / f"{name}.png", np.zeros(shape, dtype=np.uint8))
    data = config(dataset="folder", root=tmp_path, class_names=["x", "y"], mean=(0, 0, 0), std=(1, 1, 1))
    dataset = build_dataset(data, "train", train=False)
    a, b, c = (dataset[i]["image"] for i in range(3))
    assert torch.equal(a, b)
    assert torch.allclose(c, torch.from_numpy(upright).permute(2, 0, 1).float() / 255)
    # A mask drawn on the stored (unturned) pixels does not fit: the message says why.
    save(tmp_path / "masks" / "train" / "c.png", np.zeros((14, 10), dtype=np.uint8))
    with pytest.raises(DataError, match=r"14x10 \(WxH\) \(after its EXIF orientation, which distill applies\)"):
        build_dataset(data, "train", train=False)[2]


def test_a_mirrored_or_upside_down_photo_warns_that_its_mask_must_follow_the_viewer(tmp_path, caplog, monkeypatch):
    # Orientations 2-4 keep the size: a mask drawn on the stored pixels cannot be told from a
    # right one, so the first such image of a run is named (once per process).
    import distill.data.layouts as layouts

    monkeypatch.setattr(layouts, "_warned_about_orientation", False)
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down
    (tmp_path / "images" / "train").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(rgb(10, 14, seed=1)).save(tmp_path / "images" / "train" / f"{name}.png", exif=exif)
        save(tmp_path / "masks" / "train" / f"{name}.png", np.zeros((10, 14), dtype=np.uint8))
    data = config(dataset="folder", root=tmp_path, class_names=["x", "y"])
    dataset = build_dataset(data, "train", train=False)
    with caplog.at_level("WARNING", logger="distill.data.layouts"):
        dataset[0], dataset[1]
    warnings = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(warnings) == 1 and "a.png' carries an EXIF orientation" in warnings[0]
    assert "must be drawn on the image as viewers show it" in warnings[0]
