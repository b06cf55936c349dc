"""The CamVid recipe on the real data (``camvid_root`` in conftest.py), a few steps on a tiny subset."""

import json

import pytest

from distill.config import load_recipe
from distill.training import train
from helpers import REPO_ROOT

RECIPE = REPO_ROOT / "recipes" / "camvid" / "dlv3p-r50_to_dlv3p-mbv3_cpu.yaml"
pytestmark = pytest.mark.slow


def test_camvid_recipe_trains_teacher_then_distills_student(camvid_root, tmp_path):
    recipe = load_recipe(RECIPE, [
        f"data.root={camvid_root}", f"output_dir={tmp_path}", "data.max_samples=8",
        "data.resize=[120, 160]", "data.crop_size=[96, 128]", "data.batch_size=4", "data.num_workers=0",
        "train.epochs=1", "train.warmup_steps=0", "teacher_train.epochs=1",
    ])
    assert recipe.data.val_split == "train+val:prefix=0006R0"  # validated on a held-out sequence
    assert recipe.teacher.encoder == "resnet50" and recipe.student.encoder == "tu-mobilenetv3_large_100"
    teacher = train(recipe, "teacher")
    student = train(recipe, "student")
    assert teacher.steps == student.steps == 2
    records = [json.loads(line) for line in (student.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in records if "loss" in r)
    evals = [r for r in records if "val_miou" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["val_miou"] <= 1.0
