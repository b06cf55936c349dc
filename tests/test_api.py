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
