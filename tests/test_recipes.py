"""Every shipped recipe validates and runs two steps (teacher, then distilled student) on a tiny
tree in its dataset's on-disk layout."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.config import load_recipe
from distill.training import train
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow
SIZE = (48, 64)  # (H, W) of the generated images


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def labels(path: Path, values: list[int], seed: int, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).choice(values, SIZE).astype(np.uint8)
    picture = Image.fromarray(array, mode="P" if palette else "L")
    if palette:
        picture.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    picture.save(path)


def make_camvid(root: Path) -> None:
    # Named like CamVid's frames: sequence, then frame number (the recipe holds out 0006R0).
    for split, sequences in (("train", ("0001TP", "0006R0")), ("val", ("0016E5",))):
        for i in range(4):
            name = f"{sequences[i % len(sequences)]}_{i:05d}.png"
            image(root / split / name, i)
            labels(root / f"{split}annot" / name, list(range(12)), i)


def make_cityscapes(root: Path) -> None:
    for split in ("train", "val"):
        for i in range(4):
            stem = f"aachen_{i:06d}_000019"
            image(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", i)
            labels(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", [0, 7, 8, 11, 26], i)


def make_ade20k(root: Path) -> None:
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(4):
            stem = f"ADE_{folder[:5]}_{i:08d}"
            image(root / "ADEChallengeData2016" / "images" / folder / f"{stem}.jpg", i)
            labels(root / "ADEChallengeData2016" / "annotations" / folder / f"{stem}.png", [0, 1, 2, 150], i)


def make_voc(root: Path) -> None:
    for split in ("train", "val"):
        ids = [f"2007_{split}_{i:04d}" for i in range(4)]
        for i, name in enumerate(ids):
            image(root / "JPEGImages" / f"{name}.jpg", i)
            labels(root / "SegmentationClass" / f"{name}.png", [0, 1, 15, 20, 255], i, palette=True)
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")


MAKERS = {"camvid": make_camvid, "cityscapes": make_cityscapes, "ade20k": make_ade20k, "voc": make_voc}
RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))


def test_recipes_cover_every_published_setting():
    names = {path.parent.name for path in RECIPES}
    assert {"camvid", "cityscapes", "ade20k", "voc"} <= names
    assert (REPO_ROOT / "recipes" / "quickstart.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_two_steps_on_a_tiny_tree(path, tmp_path):
    import yaml

    dataset = yaml.safe_load(path.read_text())["data"]["dataset"]
    overrides = [
        f"output_dir={tmp_path / 'run'}", "data.crop_size=[32, 32]", "data.batch_size=2",
        "data.eval_batch_size=2", "data.num_workers=0", "train.max_steps=2", "train.epochs=1",
        "train.warmup_steps=0", "train.mixed_precision=no", "data.max_samples=4", "teacher_train={}",
    ]
    if dataset == "synthetic":
        # 2 of the tiny split's 4 images keep their masks (the quickstart keeps 1 in 64).
        overrides += ["data.synthetic.size=[32, 32]", "data.resize=[32, 32]", "data.labelled_fraction=0.5",
                      "train.epochs=2"]  # one step per epoch then
    else:
        MAKERS[dataset](tmp_path / "data")
        overrides += [f"data.root={tmp_path / 'data'}"]
        if yaml.safe_load(path.read_text())["data"].get("resize"):
            overrides += [f"data.resize=[{SIZE[0]}, {SIZE[1]}]"]
    tree = yaml.safe_load(path.read_text())
    if tree.get("teacher", {}).get("source") == "smp_hub":  # a tiny stand-in for the hub teacher
        import segmentation_models_pytorch as smp

        classes = len(tree["teacher"]["class_names"])
        smp.create_model("FPN", encoder_name="tu-mobilenetv3_small_050", encoder_weights=None,
                         classes=classes).save_pretrained(tmp_path / "hub_teacher")
        overrides += [f"teacher.path={tmp_path / 'hub_teacher'}", "student.encoder_weights=null"]
    if tree.get("teacher", {}).get("source") == "transformers":  # a tiny stand-in SegFormer
        pytest.importorskip("transformers")
        from test_teacher_sources import _tiny_segformer

        from distill.data import dataset_info
        from distill.config import DataConfig

        names = dataset_info(DataConfig(dataset=dataset, root=tmp_path / "data")).class_names
        _tiny_segformer(tmp_path / "hf_teacher", names)
        overrides += [f"teacher.path={tmp_path / 'hf_teacher'}", "student.encoder_weights=null"]
    recipe = load_recipe(path, overrides)
    assert recipe.teacher is not None and recipe.student is not None, "every recipe distills"
    if recipe.teacher.external:
        teacher = None
    else:
        teacher = train(recipe, "teacher")
    if recipe.teacher.mode == "cache":
        from distill.cache import write_cache

        write_cache(recipe)
    student = train(recipe, "student")
    assert student.steps == 2 and (teacher is None or teacher.steps == 2)
    import json

    records = [json.loads(line) for line in (student.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kd"] > 0 for r in records if "loss" in r] == [True]
