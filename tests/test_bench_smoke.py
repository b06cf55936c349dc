"""Every bench/ script runs at its smallest setting, so that none can rot between measurements.

These check that each script runs end to end and writes its JSON; the figures of such tiny runs
mean nothing (docs/results.md has the real ones, with their commands).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow
QUICKSTART = "recipes/quickstart.yaml"


def run_bench(script: str, *args: str, tmp_path: Path, timeout: int = 600) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args, "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("loss", ["kl", "dist"])
def test_kd_loss_bench(tmp_path, loss):
    report = run_bench("kd_loss.py", "--loss", loss, "--shape", "1", "3", "8", "8", "--repeats", "1",
                       tmp_path=tmp_path)
    assert report["rows"][0]["peak_ratio"] == 1.0 and len(report["rows"]) >= 2


def test_export_latency_bench(tmp_path):
    report = run_bench("export_latency.py", "--recipe", QUICKSTART, "--classes", "4", "--size", "64", "64",
                       "--repeats", "1", "--warmup", "0", "--threads", "1", "--calibration", "2", tmp_path=tmp_path)
    assert report["int8"]["calibration_images"] == 2 and report["int8"]["int8_bytes"] > 0
    assert report["results"][0]["ratio_int8_to_onnxruntime"] > 0


def test_cache_bench(tmp_path):
    report = run_bench("cache.py", "--recipe", QUICKSTART, "--cache-samples", "16", "--fidelity-samples", "1",
                       "--rounds", "1", "--batches", "1", tmp_path=tmp_path)
    assert {"size", "fidelity", "speed"} <= set(report)


def test_throughput_bench(tmp_path):
    report = run_bench("throughput.py", "--smoke", "--skip-omp", "--recipe", QUICKSTART, tmp_path=tmp_path)
    assert report["summary"] and report["real_data"] is False
    assert any(row["name"].startswith("streamed + feature term") for row in report["summary"])


def test_teachers_bench(tmp_path):
    report = run_bench("teachers.py", "--smoke", "--size", "64", "64", "--images", "4", "--batch", "2",
                       "--repeats", "1", tmp_path=tmp_path)
    assert [r["source"] for r in report["rows"]] == ["smp", "smp_hub", "onnx", "torchvision", "transformers"]
    shapes = {r["source"]: r["logits_shape"] for r in report["rows"]}
    assert shapes["onnx"] == shapes["smp"] == [2, 11, 64, 64] and shapes["transformers"] == [2, 11, 16, 16]
    assert all(r["forward_ms_per_image"] > 0 and r["cache_write_ms_per_image"] > 0 for r in report["rows"])


def test_omp_wait_bench(tmp_path):
    report = run_bench("omp_wait.py", "--reps", "1", "--steps", "1", tmp_path=tmp_path)
    assert report


def test_quickstart_bench(tmp_path):
    results = tmp_path / "quickstart.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "quickstart.py"), "--out", str(tmp_path / "run"),
                             "--results", str(results), "train.epochs=1", "teacher_train.epochs=1", "train.warmup_steps=0",
                             "data.synthetic.num_train=32", "data.labelled_fraction=0.25",
                             "data.synthetic.num_val=8"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(results.read_text())


def test_camvid_kd_bench(tmp_path, camvid_root):
    results = tmp_path / "camvid_kd.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "camvid_kd.py"), "--out", str(tmp_path / "run"),
         "--data-root", str(camvid_root), "--seeds", "0", "--arms", "baseline,cache/kl_T2_w1",
         "--results", str(results), "train.epochs=1", "teacher_train.epochs=1", "data.max_samples=16", "train.warmup_steps=0",
         "data.resize=[60,80]", "data.crop_size=[48,64]", "data.num_workers=0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(results.read_text())
    assert set(report["arms"]) == {"baseline", "cache/kl_T2_w1"}
    assert "gap recovered" in result.stdout
