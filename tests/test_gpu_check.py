"""bench/gpu_check.py stays runnable between GPU windows: its --smoke mode, on the CPU."""

import json
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--smoke",
                             "--camvid-root", str(tmp_path / "none"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["torch"]
    step = report["steps"]["no"]
    assert all(step[k] > 0 for k in ("student_alone_s", "cached_s", "streamed_s", "teacher_forward_s"))
    assert set(report["losses"]) == {"kl_fused", "kl_autograd", "dist_fused", "dist_autograd"}
    assert report["short_run"]["steps"] == 2 and 0.0 <= report["short_run"]["val_miou"] <= 1.0
    assert "cached / student" in result.stdout
