"""Real 2-process runs on CPU through `accelerate launch` (gloo), compared with one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from distill.config import save_resolved_recipe
from distill.evaluation import evaluate_checkpoint
from distill.train import train
from helpers import tiny_recipe

LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    "--main_process_port", "0",
]
pytestmark = pytest.mark.slow


def launch(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(LAUNCH + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_process_eval_equals_one_process(tmp_path):
    # 13 val images, batch 4 per process: the last global batch is uneven and Accelerate pads it.
    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1})
    train(recipe, "student")
    single, report = evaluate_checkpoint(recipe, "student")
    one = json.loads(report.read_text())
    report.unlink()
    path = save_resolved_recipe(recipe, tmp_path)
    launch(["-m", "distill", "eval", str(path)], tmp_path)
    two = json.loads(report.read_text())
    assert two["confusion"] == one["confusion"]
    assert sum(map(sum, two["confusion"])) == 13 * 32 * 32  # every val pixel once (none is void)
    assert two["miou"] == one["miou"]


SCRIPT = """
import hashlib, sys
import distill
from accelerate import PartialState
from distill.config import load_recipe
from distill.train import train

recipe = load_recipe(sys.argv[1])
result = train(recipe, "student")
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
rank = PartialState().process_index
open(f"params_rank{rank}.txt", "w").write(digest)
"""


def test_two_process_distillation_keeps_parameters_identical(tmp_path):
    recipe = tiny_recipe(tmp_path, teacher=True, **{"train.epochs": 1})
    train(recipe, "teacher")
    path = save_resolved_recipe(recipe, tmp_path)
    (tmp_path / "run_distill.py").write_text(SCRIPT)
    launch(["run_distill.py", str(path)], tmp_path)
    digests = [(tmp_path / f"params_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    # 24 images, 4 per process and 2 processes: 3 optimizer steps, each one logged once.
    assert [r["step"] for r in records if "loss" in r] == [2, 3]
    assert all(r["kd"] > 0 for r in records if "loss" in r)


def test_launcher_mismatch_is_detected(tmp_path, monkeypatch):
    import distill.train as loop

    class OneProcess:  # what each process sees when the launcher's group did not form
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(loop, "Accelerator", OneProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(loop.TrainingError, match="started 2 processes but they did not form one process group"):
        loop.make_accelerator(tiny_recipe(tmp_path))
