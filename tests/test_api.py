"""The public surface: `import distill` names, and the README's Python example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
from helpers import TinySegmenter

REPO = Path(__file__).resolve().parents[1]


def test_public_names_resolve_to_their_modules():
    from distill.config import load_recipe
    from distill.pipeline import run_pipeline
    from distill.training import train

    assert distill.load_recipe is load_recipe and distill.train is train and distill.run is run_pipeline
    for name in distill.__all__:
        assert getattr(distill, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distill.nope  # noqa: B018


def test_import_distill_imports_no_torch():
    code = "import sys, distill; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block, "README has no api-example block"
    torch.manual_seed(0)
    torch.save(TinySegmenter(6, width=16), tmp_path / "my_teacher.pt")  # the user's trained model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    miou = float(re.search(r"student mIoU ([0-9.]+)", result.stdout).group(1))
    assert 0.0 < miou <= 1.0
    run = tmp_path / "runs" / "my_student"
    metrics = (run / "student" / "metrics.jsonl").read_text().splitlines()
    assert any('"kd": ' in line and '"kd": 0.0' not in line for line in metrics)  # it distilled
    assert (run / "export" / "student.onnx").stat().st_size > 0


def test_modules_of_the_callers_come_back_as_they_were(tmp_path):
    # A teacher in train mode with trainable, contiguous weights is frozen (and made channels_last)
    # for the run only; under bf16 neither train() nor evaluate() leaves Accelerate's autocast
    # wrapper or its prepared mark on a module of the caller's (its fp32 output would change, and
    # a second train(student=...) would skip preparing it).
    from helpers import tiny_recipe

    torch.manual_seed(0)
    teacher = TinySegmenter(4, width=12).train()
    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1, "train.max_steps": 2, "model": "null",
                                      "student": "{factory: 'helpers:tiny'}", "loss.kd_weight": 1.0,
                                      "train.mixed_precision": "bf16", "train.channels_last": "true"})
    result = distill.train(recipe, teacher=teacher, student=TinySegmenter(4))
    assert teacher.training and all(p.requires_grad and p.is_contiguous() for p in teacher.parameters())
    fresh = TinySegmenter(4).eval()
    for model in (result.model.eval(), fresh):
        image = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            before = model(image)
        distill.evaluate(recipe, model=model)
        assert not {"forward", "_original_forward", "_is_accelerate_prepared"} & set(vars(model))
        with torch.no_grad():
            assert torch.equal(model(image), before)


def test_arguments_that_do_not_fit_are_named(tmp_path):
    from distill.losses import DistillLoss, kd_loss
    from distill.models import ModelError
    from distill.teacher import Teacher
    from distill.training import TrainingError
    from helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1})

    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinySegmenter(4)

        def forward(self, images):
            return {"out": self.inner(images)}

    with pytest.raises(ModelError, match=r"Dict returned a dict, not logits \[N, C, H, W\]: .*output\['out'\]"):
        distill.train(recipe, "student", teacher=Dict())
    with pytest.raises(ModelError, match="the student given to train\\(\\) predicts 6 classes, the dataset has 4"):
        distill.train(recipe, "baseline", student=TinySegmenter(6))
    with pytest.raises(ModelError, match="the model given to evaluate\\(\\) predicts 3 classes, the dataset has 4"):
        distill.evaluate(recipe, model=TinySegmenter(3))
    with pytest.raises(TrainingError, match="stage 'studnet' is not one of teacher, baseline, student"):
        distill.train(recipe, "studnet")
    assert not (tmp_path / "studnet").exists()
    with pytest.raises(TypeError, match=r"a Teacher is called on a batch dict \{'image': images\}, not a Tensor"):
        Teacher(TinySegmenter(4))(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="tta_scales must be one or more scales > 0"):
        Teacher(TinySegmenter(4), tta_scales=[])
    with pytest.raises(TypeError, match=r"overrides must be a list .* pass \['train.epochs=3'\]"):
        distill.recipe_from_dict({"data": {"dataset": "synthetic"}}, "train.epochs=3")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got True"):
        kd_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), temperature=True)
    with pytest.raises(ValueError, match=r"pseudo_label_threshold must be in \(0, 1\], got 5.0"):
        DistillLoss(pseudo_label_threshold=5.0)


def test_a_student_whose_map_is_coarser_than_its_input_trains(tmp_path):
    # SegFormer without its upsampling predicts at 1/4: its logits are taken to the labels' pixels.
    from helpers import tiny_recipe

    class Quarter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinySegmenter(4)

        def forward(self, images):
            return torch.nn.functional.avg_pool2d(self.inner(images), 4)

    recipe = tiny_recipe(tmp_path, teacher=True, **{"train.epochs": 1, "train.max_steps": 2})
    result = distill.train(recipe, "student", student=Quarter(), teacher=TinySegmenter(4))
    assert result.steps == 2 and 0 <= result.best_miou <= 1
