"""A killed run loses nothing: SIGKILL mid-epoch, resume, and end where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from distill.config import save_resolved_recipe
from helpers import tiny_recipe

pytestmark = pytest.mark.slow


def run_distill(args, cwd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def logged_steps(path):
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    settings = {"model.factory": "helpers:slow_tiny", "data.synthetic.num_train": 64, "train.epochs": 3,
                "train.log_every_steps": 1}
    straight = tiny_recipe(tmp_path / "straight", **settings)
    killed = tiny_recipe(tmp_path / "killed", **settings)
    straight_file = save_resolved_recipe(straight, tmp_path / "straight")
    killed_file = save_resolved_recipe(killed, tmp_path / "killed")

    process = run_distill(["train", str(killed_file)], tmp_path, start_new_session=True)
    run = tmp_path / "killed" / "student"
    progress = run / "checkpoints" / "latest" / "progress.json"
    # 64 images / batch 4 = 16 steps per epoch: kill after the epoch-1 checkpoint, mid-epoch 2.
    reached = wait_for(lambda: progress.is_file() and any(s >= 20 for s in logged_steps(run / "metrics.jsonl")))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert reached, process.stdout.read()[-2000:]
    assert json.loads(progress.read_text())["step"] == 16
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"

    resumed = run_distill(["train", str(killed_file), f"train.resume={run}"], tmp_path)
    uninterrupted = run_distill(["train", str(straight_file)], tmp_path)
    outputs = []
    for proc in (resumed, uninterrupted):
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        outputs.append(output)
    assert "resumed from" in outputs[0] and "at epoch 1, step 16" in outputs[0].replace("\n", " ")
    final = json.loads((run / "checkpoints" / "latest" / "progress.json").read_text())
    assert final["step"] == 48 and final["epoch"] == 3
    a = load_file(str(run / "last.safetensors"))
    b = load_file(str(tmp_path / "straight" / "student" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # bit-exact on CPU: same data order, augmentations and RNG state after resume
        assert torch.equal(a[key], b[key]), key
