"""Every bench/ script runs at its smallest setting, so that none can rot between measurements.

These check that each script runs end to end and writes its JSON; the figures of such tiny runs
mean nothing (docs/results.md has the real ones, with their commands).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow
QUICKSTART = "recipes/quickstart.yaml"


STUDIES = REPO_ROOT / "bench" / "studies"


def run_bench(script: str, *args: str, tmp_path: Path, timeout: int = 600) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args, "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("loss, peer", [("kl", "peer_kl_div"), ("dist", "peer_dist")])
def test_kd_loss_bench(tmp_path, loss, peer):
    # Each row is a fresh process: the chunked KL rows (the same code as fused) are left out.
    report = run_bench("kd_loss.py", "--loss", loss, "--shape", "1", "3", "8", "8", "--repeats", "1",
                       "--variants", f"fused,{peer}", tmp_path=tmp_path)
    assert [row["variant"] for row in report["rows"]] == ["reference", peer, "fused"]
    assert report["rows"][0]["peak_ratio"] == 1.0
    peer = next(row for row in report["rows"] if row["variant"].startswith("peer_"))
    fused = next(row for row in report["rows"] if row["variant"] == "fused")
    assert fused["time_ratio_to_fastest_peer"] == pytest.approx(fused["time_s"] / peer["time_s"])
    assert "loss_rel_diff" not in peer and "meets_targets" in fused


def test_kd_loss_bench_peers_compute_the_same_losses_as_distill_without_void():
    # With no void pixel, the peers differ from distill's losses only by their mean: mmrazor's
    # and torchdistill's batchmean KL is distill's per-pixel mean times H*W; DIST is the same.
    import importlib.util

    import torch

    from distill.losses import dist_loss, kd_loss

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("kd_loss_bench", REPO_ROOT / "bench" / "kd_loss.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 5, 6, 7, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    for temperature in (1.0, 4.0):
        torch.testing.assert_close(bench._peer_kl_div(torch, student, teacher, temperature),
                                   kd_loss(student, teacher, temperature=temperature) * 6 * 7)
        torch.testing.assert_close(bench._peer_dist(torch, student, teacher, temperature),
                                   dist_loss(student, teacher, temperature=temperature), rtol=1e-6, atol=1e-8)


def test_export_latency_bench(tmp_path):
    report = run_bench("export_latency.py", "--recipe", QUICKSTART, "--classes", "4", "--size", "64", "64",
                       "--repeats", "1", "--warmup", "0", "--threads", "1", "--calibration", "2", "--fixed-size",
                       tmp_path=tmp_path)
    assert report["int8"]["calibration_images"] == 2 and report["int8"]["int8_bytes"] > 0
    row = report["results"][0]
    assert row["ratio_int8_to_onnxruntime"] == pytest.approx(
        row["median_ms"]["onnxruntime_int8"] / row["median_ms"]["onnxruntime"])
    assert row["ratio_int8_fixed_to_onnxruntime_fixed"] == pytest.approx(
        row["median_ms"]["onnxruntime_int8_fixed"] / row["median_ms"]["onnxruntime_fixed"])
    assert report["int8_fixed"]["int8_bytes"] > 0


def test_throughput_bench_falls_back_to_synthetic_images_of_the_camvid_recipe(tmp_path):
    # Without CamVid on disk the bench measures synthetic frames of its shape: the recipe's
    # held-out selector (train+val:prefix=0006R0) must not reach a dataset without such names.
    import argparse

    from distill.cache.reader import cache_dataset
    from distill.data import build_dataset

    paths = [str(REPO_ROOT), str(REPO_ROOT / "bench")]  # bench.cache, and benchlib beside it
    sys.path[:0] = paths
    try:
        from bench.throughput import build_recipes
    finally:
        for path in paths:
            sys.path.remove(path)
    args = argparse.Namespace(recipe="recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml", cache_samples=4,
                              data_root=str(tmp_path / "no_camvid"))
    recipe, full, _ = build_recipes(args, tmp_path, synthetic=True)
    assert recipe.data.dataset == "synthetic"
    assert [len(cache_dataset(recipe, split)) for split in recipe.cache.splits] == [4]  # --cache-samples
    assert [len(build_dataset(full.data, split, train=False))
            for split in (full.data.train_split, full.data.val_split)] == [367, 101]


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


def test_precision_bench(tmp_path):
    report = run_bench("precision.py", "--recipe", QUICKSTART, "--rounds", "1", tmp_path=tmp_path)
    rows = report["results"]
    assert set(rows) == {"teacher_step", "teacher_forward", "student_step", "student_forward"}
    for row in rows.values():
        assert row["speedup"] == pytest.approx(row["fp32_s"] / row["bf16_s"])  # one round: one ratio


def test_omp_wait_bench(tmp_path):
    # One condition, idle: the shared one adds a competing process that halves every worker's share
    # of the cores (imports included) for the same code path.
    # Two of its three settings: the third runs the same code with another variable.
    report = run_bench("omp_wait.py", "--reps", "1", "--steps", "1", "--batch", "2", "--size", "64", "64",
                       "--conditions", "idle", "--settings", "libgomp default,OMP_WAIT_POLICY=PASSIVE",
                       tmp_path=tmp_path)
    assert (report["batch"], report["size"]) == (2, [64, 64])
    runs = report["runs"]["idle"]
    assert {name: len(times) for name, times in runs.items()} == {"libgomp default": 1, "OMP_WAIT_POLICY=PASSIVE": 1}
    assert report["summary"]["libgomp default"] == {"idle_s": runs["libgomp default"][0], "idle_ratio": 1.0}
    assert report["summary"]["OMP_WAIT_POLICY=PASSIVE"]["idle_ratio"] == pytest.approx(
        runs["OMP_WAIT_POLICY=PASSIVE"][0] / runs["libgomp default"][0])


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
    # First the benchmark trains its teacher and a baseline; then a second teacher, an ensemble of
    # two copies of the first (bench/studies/ensemble_teacher.py), goes beside it under
    # --teacher-name with its own cache and distilled arm, reusing that baseline as it was.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    common = ["--out", str(tmp_path / "run"), "--data-root", str(camvid_root), "--seeds", "0",
              "train.epochs=1", "teacher_train.epochs=1", "data.max_samples=16", "train.warmup_steps=0",
              "data.resize=[60,80]", "data.crop_size=[48,64]", "data.num_workers=0",
              "teacher.encoder=resnet18", "eval.resolution=frame"]
    result = subprocess.run(
        [sys.executable, str(STUDIES / "camvid_kd.py"), *common, "--arms", "baseline",
         "--results", str(tmp_path / "camvid_kd.json")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "camvid_kd.json").read_text())
    assert set(report["arms"]) == {"baseline"}
    assert report["teacher"]["train_seconds"] > 0  # the benchmark trained it (no --teacher-checkpoint)
    assert report["teacher"]["reused"] is False and report["baseline_arm"] == "baseline"
    # The teacher's own held-out curve, read from its run's metrics: one evaluation, epoch 1.
    logged = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert report["teacher"]["val_curve"] == {"1": next(line["val_miou"] for line in logged if "val_miou" in line)}

    teacher = tmp_path / "run" / "teacher" / "last.safetensors"
    ensemble = tmp_path / "ensemble.safetensors"
    subprocess.run([sys.executable, str(STUDIES / "ensemble_teacher.py"), "--out", str(ensemble),
                    str(teacher), str(teacher)], cwd=REPO_ROOT, env=env, check=True, timeout=300)
    member = "{arch: DeepLabV3Plus, encoder: resnet18}"
    second = subprocess.run(
        [sys.executable, str(STUDIES / "camvid_kd.py"), *common, "--arms", "baseline,cache/kl_T2_w1",
         "--results", str(tmp_path / "ensemble.json"),
         "--teacher-checkpoint", str(ensemble), "--teacher-name", "ensemble",
         "--teacher-override", "teacher.source=factory", "--teacher-override", "teacher.factory=ensemble_teacher:ensemble",
         "--teacher-override", f"teacher.factory_kwargs={{members: [{member}, {member}]}}",
         "--teacher-override", "loss.feature.kind=none"],
        cwd=REPO_ROOT, env={**env, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{STUDIES}"},
        capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "baseline: reused" in second.stdout
    both = json.loads((tmp_path / "ensemble.json").read_text())
    base = report["arms"]["baseline"]["0"]
    assert both["arms"]["baseline"]["0"]["final_miou"] == base["final_miou"]
    # Two copies of one model average to that model: the ensemble scores as the teacher did.
    assert both["teacher"]["final_miou"] == pytest.approx(report["teacher"]["final_miou"], abs=1e-6)
    assert (tmp_path / "run" / "ensemble" / "cache" / "manifest.json").is_file()
    assert (tmp_path / "run" / "ensemble" / "cache/kl_T2_w1" / "seed0" / "arm.json").is_file()
    assert both["teacher_overrides"][0] == "teacher.source=factory"
    assert "gap recovered" in second.stdout
    # The per-class table: each class's IoU difference from the baseline of the same seed.
    assert "per-class IoU minus baseline's" in second.stdout
    kd = both["arms"]["cache/kl_T2_w1"]["0"]
    gains = both["per_class_gain"]["arms"]["cache/kl_T2_w1"]
    assert set(gains) == set(base["per_class_iou"]) and len(gains) == 11
    for name, gain in gains.items():
        assert gain == pytest.approx(kd["per_class_iou"][name] - base["per_class_iou"][name])


def _bench_module(name: str):
    """A bench/studies/ script imported as a module (they are scripts, not a package)."""
    import importlib.util

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    return module


def test_ensemble_teacher_averages_its_members_probabilities(tmp_path):
    import torch
    from torch import nn

    from distill.models import load_weights

    ensemble_teacher = _bench_module("ensemble_teacher")
    torch.manual_seed(0)
    members = [nn.Conv2d(3, 4, 1) for _ in range(3)]
    images = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        mean = sum(torch.softmax(m(images), dim=1) for m in members) / 3  # the reference, in probability
        logits = ensemble_teacher.Ensemble(members)(images)
    torch.testing.assert_close(torch.softmax(logits, dim=1), mean)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(2, 5, 6))  # already log-probabilities

    # The weights file: each member's keys under members.<i>., loadable into the factory's model.
    from safetensors.torch import save_file

    paths = []
    for i, member in enumerate(members):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(member.state_dict(), str(paths[-1]))
    ensemble_teacher.combine(paths, tmp_path / "ens.safetensors")
    rebuilt = ensemble_teacher.Ensemble([nn.Conv2d(3, 4, 1) for _ in range(3)])
    load_weights(rebuilt, tmp_path / "ens.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), logits)
    with pytest.raises(ValueError, match="ensemble member 1: give arch and encoder"):
        ensemble_teacher.ensemble(num_classes=4, members=[{"arch": "FPN", "encoder": "resnet18"}, {"arch": "FPN"}])
    with pytest.raises(ValueError, match="ensemble member 0: encodr: Extra inputs are not permitted"):  # the recipe's own validation
        ensemble_teacher.ensemble(num_classes=4, members=[{"arch": "FPN", "encoder": "resnet18", "encodr": "x"}])


def test_teacher_confidence_figures_against_closed_form():
    import torch

    confidence = _bench_module("teacher_confidence")
    # Two classes, the teacher's logits (log 3, 0) everywhere: p = (3/4, 1/4) at T=1 and
    # (sqrt 3, 1) / (sqrt 3 + 1) at T=2. Labels: class 0 on 5 pixels, class 1 on 2, one void.
    mask = torch.tensor([[[0, 0, 0, 0], [0, 1, 1, 255]]])
    logits = torch.zeros(1, 2, 2, 4)
    logits[:, 0] = math.log(3)
    loader = torch.utils.data.DataLoader([{"image": torch.zeros(3, 2, 4), "mask": mask[0]}], batch_size=1)
    figures = confidence.split_confidence(lambda batch: logits.expand(len(batch["mask"]), -1, -1, -1),
                                          loader, num_classes=2, ignore_index=255, temperature=2.0)
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    assert figures["pixels"] == 7
    assert figures["label_prob_T1"] == pytest.approx((5 * 0.75 + 2 * 0.25) / 7)
    assert figures["label_prob_T"] == pytest.approx((5 * p0 + 2 * (1 - p0)) / 7)
    assert figures["other_mass_T"] == pytest.approx(1 - (5 * p0 + 2 * (1 - p0)) / 7)
    assert figures["entropy_T"] == pytest.approx(-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)))
    # Every pixel predicted 0: accuracy 5/7; IoU class 0 = 5/7, class 1 = 0.
    assert figures["pixel_accuracy"] == pytest.approx(5 / 7)
    assert figures["miou"] == pytest.approx((5 / 7 + 0) / 2)


def test_target_accuracy_scores_each_target_against_the_masks(tmp_path):
    import torch

    target_accuracy = _bench_module("target_accuracy")
    # Labels: class 0 on 5 pixels, class 1 on 2, one void. "zeros" predicts class 0 everywhere
    # with p = 3/4 (logits log 3, 0); "exact" predicts the label, with p = e^4 / (e^4 + 1).
    mask = torch.tensor([[[0, 0, 0, 0], [0, 1, 1, 255]]])
    zeros = torch.zeros(1, 2, 2, 4)
    zeros[:, 0] = math.log(3)
    exact = 4 * torch.nn.functional.one_hot(mask.clamp(0, 1), 2).permute(0, 3, 1, 2).float()
    loader = [{"mask": mask}, {"mask": mask}]  # the second batch is left out by batches=1
    report = target_accuracy.score_targets({"zeros": lambda b: zeros, "exact": lambda b: exact},
                                           loader, num_classes=2, ignore_index=255, batches=1)
    assert report["pixels"] == 7
    assert report["targets"]["zeros"]["iou"] == pytest.approx([5 / 7, 0.0])
    assert report["targets"]["zeros"]["label_prob_T1"] == pytest.approx((5 * 0.75 + 2 * 0.25) / 7)
    assert report["targets"]["exact"]["miou"] == 1.0
    assert report["targets"]["exact"]["label_prob_T1"] == pytest.approx(math.exp(4) / (math.exp(4) + 1))

    # A real store (test_cache's 1x1-conv teacher, dense, stride 1, upscaled crops): its replay
    # equals the streamed teacher there, so both targets score alike on the same crops.
    from test_cache import recipe_for

    from distill.cache import write_cache

    recipe = recipe_for(tmp_path, **{"data.scale_range": "[1.0,1.6]", "cache.layout": "dense"})
    write_cache(recipe)
    report = target_accuracy.measure(recipe, batches=3)
    assert report["pixels"] > 0 and len(report["class_names"]) == 4
    store, streamed = report["targets"]["store"], report["targets"]["streamed"]
    assert store["pixel_accuracy"] == pytest.approx(streamed["pixel_accuracy"], abs=0.01)
    assert store["label_prob_T1"] == pytest.approx(streamed["label_prob_T1"], abs=0.01)


def test_teacher_confidence_bench(tmp_path):
    from safetensors.torch import save_file

    import distill
    from distill.models import stage_model

    recipe = distill.load_recipe(REPO_ROOT / QUICKSTART)
    teacher = distill.build_model(stage_model(recipe, "teacher"), 4)  # a random teacher: the run, not its figures
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    report = run_bench("studies/teacher_confidence.py", QUICKSTART, f"teacher.checkpoint={weights}",
                       "data.synthetic.num_train=16", "data.synthetic.num_val=8", tmp_path=tmp_path)
    assert set(report["splits"]) == {"train", "held_out"} and report["temperature"] == 2.0
    assert report["splits"]["train"]["images"] == 16 and report["splits"]["held_out"]["images"] == 8
    for figures in report["splits"].values():
        assert 0 < figures["label_prob_T1"] < 1 and 0 < figures["entropy_T"] <= math.log(4) + 1e-6


def test_camvid_kd_named_arms_start_from_logits_alone():
    camvid_kd = _bench_module("camvid_kd")
    cached, streamed = ["teacher.mode=cache", *camvid_kd.LOGITS_ONLY], ["teacher.mode=stream"]
    # The recipe's feature term is switched off by a named setting, and a hint setting adds one after.
    assert camvid_kd._arm_overrides("stream/kl_T2_w1", cached, streamed) == [
        "teacher.mode=stream", "loss.feature.kind=none", *camvid_kd.SETTINGS["kl_T2_w1"]]
    hinted = camvid_kd._arm_overrides("stream/kl_T2_w1+hint", cached, streamed)
    assert hinted.index("loss.feature.kind=none") < hinted.index(camvid_kd.SETTINGS["hint"][0])
    assert camvid_kd._arm_overrides("kd_stream", cached, streamed) == streamed  # the recipe's own loss
    assert camvid_kd._arm_overrides("cache/kl_T4_w1", cached, streamed) == [*cached, *camvid_kd.SETTINGS["kl_T4_w1"]]
    assert camvid_kd._arm_overrides("baseline/epochs40", cached, streamed) == ["train.epochs=40"]
    # What those overrides make of a recipe with a hint: a valid cached recipe, logits only.
    from distill.config import load_recipe

    recipe = load_recipe(REPO_ROOT / "recipes" / "camvid" / "dlv3p-r50_to_dlv3p-mbv3_cpu.yaml",
                         ["loss.feature={kind: hint}", *camvid_kd._arm_overrides("cache/kl_T2_w1", cached, streamed)])
    assert recipe.teacher.mode == "cache" and recipe.loss.feature.kind == "none"


def test_camvid_kd_gains_are_measured_from_the_named_baseline(capsys):
    camvid_kd = _bench_module("camvid_kd")

    def run(miou: float) -> dict:
        return {"final_miou": miou, "seconds_per_epoch": 1.0}

    arms = {"baseline": {"0": run(0.30)}, "baseline/cutmix": {"0": run(0.32)},
            "stream/kl_T2_w1+cutmix": {"0": run(0.35)}}
    camvid_kd._summary(arms, 0.40, [0], "baseline/cutmix")
    row = arms["stream/kl_T2_w1+cutmix"]["summary"]
    assert row["gains"] == [pytest.approx(0.03)] and row["gap_recovered"] == [pytest.approx(0.375)]
    assert arms["baseline"]["summary"]["gains"] == [pytest.approx(-0.02)]
    assert "gains" not in arms["baseline/cutmix"]["summary"]
    # The baseline streams its (unused) teacher too: a recipe of a cached one refuses CutMix.
    assert camvid_kd._arm_overrides("baseline/cutmix", [], []) == [
        "data.cutmix=0.5", "teacher.mode=stream", "teacher.tta_flip=false", "teacher.tta_scales=[1.0]"]


def test_camvid_kd_reuses_an_arm_of_the_same_teacher_weights_only(tmp_path, monkeypatch):
    camvid_kd = _bench_module("camvid_kd")
    trained = []

    def run(command, log):
        trained.append(command)
        metrics = log.parent / "student" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps({"epoch": 1, "val_miou": 0.5}) + "\n")
        return 7.0

    monkeypatch.setattr(camvid_kd, "_run", run)
    monkeypatch.setattr(camvid_kd, "_eval", lambda *a: {"miou": 0.5, "pixel_accuracy": 0.9, "iou": {}})
    recipe = REPO_ROOT / "recipes" / "quickstart.yaml"
    arm = lambda teacher: camvid_kd._arm("cache/kl", "student", recipe, tmp_path / "arm", ["x=1"], False, teacher)
    first = arm("aaa")
    assert len(trained) == 1 and "reused" not in first
    again = arm("aaa")  # the same command and teacher weights: reused, and said so
    assert len(trained) == 1 and again["reused"] is True and again["seconds"] == 7.0
    arm("bbb")  # a teacher retrained into the same path: the arm is trained again
    assert len(trained) == 2
    # A record from before teachers were recorded: reused when the teacher is older than it.
    record = json.loads((tmp_path / "arm" / "arm.json").read_text())
    del record["teacher_sha256"]
    (tmp_path / "arm" / "arm.json").write_text(json.dumps(record))
    old = camvid_kd._arm("cache/kl", "student", recipe, tmp_path / "arm", ["x=1"], False, "ccc", 0.0)
    assert len(trained) == 2 and old["reused"] is True
    assert json.loads((tmp_path / "arm" / "arm.json").read_text())["teacher_sha256"] == "ccc"


def test_camvid_kd_shares_of_the_gap_need_a_gap_and_seeds_their_baseline(capsys):
    camvid_kd = _bench_module("camvid_kd")

    def run(miou: float) -> dict:
        return {"final_miou": miou, "seconds_per_epoch": 1.0}

    # A teacher below both baselines: the gains are real, there is no gap to take a share of.
    arms = {"baseline": {"0": run(0.32), "1": run(0.34)}, "cache/kl": {"0": run(0.34), "1": run(0.36)}}
    camvid_kd._summary(arms, 0.30, [0, 1])
    row = arms["cache/kl"]["summary"]
    assert row["gap_recovered"] == [None, None] and row["mean_gap_recovered"] is None
    assert row["beats_baseline_every_seed"] is True
    # A seed the baseline did not run: not counted as beaten.
    arms = {"baseline": {"0": run(0.31)}, "cache/kl": {"0": run(0.33), "1": run(0.20)}}
    camvid_kd._summary(arms, 0.40, [0, 1])
    assert arms["cache/kl"]["summary"]["beats_baseline_every_seed"] is False
    assert arms["cache/kl"]["summary"]["paired_seeds"] == 1


def test_heldout_gains_pairs_each_arm_with_its_own_baseline_once(tmp_path):
    def result(baseline_arm: str | None, teacher: float, arms: dict) -> dict:
        stored = {"teacher": {"final_miou": teacher},
                  "arms": {a: {s: {"final_miou": m} for s, m in seeds.items()} for a, seeds in arms.items()}}
        return stored if baseline_arm is None else {**stored, "baseline_arm": baseline_arm}

    results = tmp_path / "results"
    results.mkdir()
    # An older result names no baseline arm: its one baseline arm is the reference.
    (results / "camvid_kd_heldout_a.json").write_text(json.dumps(result(
        None, 0.40, {"baseline/epochs40": {"0": 0.30, "1": 0.32}, "cache/kl": {"0": 0.34, "1": 0.31}})))
    # A later command reusing one of those arms (same teacher, same score) and adding one; an arm
    # whose seed has no baseline is left out.
    (results / "camvid_kd_heldout_b.json").write_text(json.dumps(result(
        "baseline/epochs40", 0.40, {"baseline/epochs40": {"0": 0.30}, "cache/kl": {"0": 0.34},
                                    "stream/kl": {"0": 0.36, "2": 0.39}})))
    (results / "camvid_kd_few_labels.json").write_text("{}")  # another protocol: not read
    out = tmp_path / "gains.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(STUDIES / "heldout_gains.py"), "--results-dir",
                           str(results), "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [(p["arm"], p["seed"]) for p in report["pairs"]] == [("cache/kl", 0), ("cache/kl", 1), ("stream/kl", 0)]
    gains = [0.04, -0.01, 0.06]
    assert [p["gain"] for p in report["pairs"]] == pytest.approx(gains)
    assert report["pairs"][0]["gap_share"] == pytest.approx(0.04 / 0.10)
    assert report["summary"]["mean_gain"] == pytest.approx(sum(gains) / 3)
    assert report["summary"]["pairs_above_baseline"] == 2
    # Only the first result holds both seeds of its baseline: 0.30 and 0.32.
    assert report["summary"]["baseline_seed_spreads"] == [pytest.approx(0.02)]

    # --pattern pools another family of results instead (here one file of its own protocol).
    (results / "camvid_pretrained_r9_x.json").write_text(json.dumps(result(
        None, 0.48, {"baseline": {"1": 0.44}, "cache/cwd": {"1": 0.45}})))
    done = subprocess.run([sys.executable, str(STUDIES / "heldout_gains.py"), "--results-dir", str(results),
                           "--pattern", "camvid_pretrained_r*.json", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    pairs = json.loads(out.read_text())["pairs"]
    assert [(p["file"], p["arm"], p["seed"]) for p in pairs] == [("camvid_pretrained_r9_x.json", "cache/cwd", 1)]
    assert pairs[0]["gap_share"] == pytest.approx(0.01 / 0.04)

    # Without --results-dir it reads the study results stored in the repository, as docs/results.md runs it.
    done = subprocess.run([sys.executable, str(STUDIES / "heldout_gains.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert all(p["file"].startswith("camvid_kd_heldout") for p in json.loads(out.read_text())["pairs"])
