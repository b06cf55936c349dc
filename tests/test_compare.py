"""distill.comparison: teacher vs student (vs baseline) table, JSON and PNG, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import tiny_recipe
from PIL import Image

from distill._io import file_digest
from distill.comparison import CompareError, compare, measure_latency
from distill.config import recipe_from_dict, recipe_to_yaml
from distill.evaluation import evaluate_checkpoint
from distill.models import ModelError
from distill.training import train

FAST = {"latency_runs": 2, "warmup_runs": 1, "num_examples": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny teacher, distilled student and baseline on the synthetic data (1 epoch each)."""
    recipe = tiny_recipe(tmp_path_factory.mktemp("compare") / "run", teacher=True, **{"train.epochs": 1})
    for stage in ("teacher", "student", "baseline"):
        train(recipe, stage)
    return recipe


@pytest.fixture(scope="module")
def report(trained):
    return compare(trained, **FAST)


def test_compare_writes_json_and_png_with_every_number(trained, report):
    out = Path(trained.output_dir) / "compare"
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk["models"]) == {"teacher", "student", "baseline"}
    import hashlib

    assert on_disk["recipe_sha256"] == hashlib.sha256(recipe_to_yaml(trained).encode()).hexdigest()
    for name, entry in on_disk["models"].items():
        checkpoint = Path(trained.output_dir) / name / "best.safetensors"
        assert entry["checkpoint_sha256"] == file_digest(checkpoint)
        assert entry["checkpoint_bytes"] == checkpoint.stat().st_size
        assert entry["parameters"] > 0 and entry["gflops"] > 0 and entry["latency_ms"] > 0
        assert set(entry["iou"]) == {"background", "circle_stripes", "square_dots", "triangle_solid"}
    # helpers.tiny: width 12 teacher, width 6 student; params and FLOPs scale alike.
    ratios = on_disk["ratios"]["student/teacher"]
    assert ratios["parameters"] == pytest.approx(538 / 1720)
    assert 0.2 < ratios["gflops"] < 0.4
    assert "2 x multiply-accumulates" in on_disk["conventions"]["gflops"]
    assert on_disk["eval_resolution"] == [32, 32] and on_disk["num_images"] == 13
    deltas = [r["student_minus_teacher"] for r in on_disk["per_class"] if r["student_minus_teacher"] is not None]
    assert deltas == sorted(deltas)  # worst first
    assert all("baseline" in row for row in on_disk["per_class"])
    scored = {name: on_disk["models"][name]["miou"] for name in ("teacher", "student", "baseline")}
    gain, gap = scored["student"] - scored["baseline"], scored["teacher"] - scored["baseline"]
    assert on_disk["distillation"] == pytest.approx(
        {"gain": gain, "gap": gap, "gap_recovered": gain / gap if gap > 0 else None})
    assert (out / "recipe.yaml").is_file()

    png = Image.open(out / "compare.png")
    assert png.format == "PNG" and png.size[0] > 800 and png.size[1] > 800


def test_student_miou_equals_distill_eval(trained, report):
    scores, _ = evaluate_checkpoint(trained, "student")
    assert report["models"]["student"]["miou"] == scores.miou
    assert report["models"]["student"]["pixel_accuracy"] == scores.pixel_accuracy


def test_tables_are_printed(trained, capsys):
    compare(trained, **FAST)
    printed = capsys.readouterr().err
    for text in ("teacher vs student on val", "student / teacher", "GFLOPs / image", "latency (batch 1)",
                 "IoU per class", "student - teacher", "student - baseline", "distillation gain"):
        assert text in printed, text


def test_without_baseline_the_baseline_column_is_left_out(trained, tmp_path):
    run = tmp_path / "run"
    for stage in ("teacher", "student"):
        (run / stage).mkdir(parents=True)
        shutil.copy(Path(trained.output_dir) / stage / "best.safetensors", run / stage)
    recipe = trained.model_copy(update={"output_dir": run})
    result = compare(recipe, **FAST)
    assert set(result["models"]) == {"teacher", "student"}
    assert "baseline/teacher" not in result["ratios"]
    assert (run / "compare" / "compare.png").is_file()


def test_a_baseline_trained_from_other_settings_is_left_out_and_named(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(Path(trained.output_dir), run, ignore=shutil.ignore_patterns("compare", "checkpoints"))
    same = trained.model_copy(update={"output_dir": run})
    assert set(compare(same, **FAST)["models"]) == {"teacher", "student", "baseline"}
    other = same.model_copy(update={"train": same.train.model_copy(update={"lr": 0.02})})
    capsys.readouterr()
    result = compare(other, **FAST)
    assert set(result["models"]) == {"teacher", "student"}  # a gain over it would describe nothing
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "was trained from other settings (train.lr: 0.01 there, 0.02 here)" in out and "not compared" in out


def test_latency_is_a_median_of_interleaved_runs():
    import torch

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    result = measure_latency({"a": Recorder("a"), "b": Recorder("b")}, torch.zeros(1, 3, 32, 32), runs=3, warmup=1)
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then interleaved timed runs


# --------------------------------------------------------------------------------------------
# Bad input: each stops before any evaluation, with a message naming the path or key


def test_missing_checkpoints_name_the_command(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", teacher=True)
    with pytest.raises(ModelError, match=r"Train it first with `distill train RECIPE --stage teacher`"):
        compare(recipe, **FAST)
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    (tmp_path / "run" / "teacher" / "best.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"student/best.safetensors does not exist.*`distill train RECIPE`"):
        compare(recipe, **FAST)


def test_recipe_without_teacher_or_student(tmp_path):
    with pytest.raises(CompareError, match="no `student` section"):
        compare(tiny_recipe(tmp_path / "one"), **FAST)  # a single-model recipe
    alone = recipe_from_dict({"output_dir": str(tmp_path / "s"), "student": {"factory": "helpers:tiny"}})
    with pytest.raises(CompareError, match="no `teacher` section"):
        compare(alone, **FAST)


def test_unwritable_output_folder(trained, tmp_path):
    checkpoints = {"teacher.checkpoint": str(Path(trained.output_dir) / "teacher" / "best.safetensors"),
                   "eval.checkpoint": str(Path(trained.output_dir) / "student" / "best.safetensors")}
    run = tmp_path / "run"
    run.mkdir()
    (run / "compare").write_text("a file where the folder should be")
    with pytest.raises(CompareError, match=r"cannot write the comparison to .*compare: '.*compare' is a file"):
        compare(tiny_recipe(run, teacher=True, **checkpoints), **FAST)

    if os.geteuid() == 0:  # root writes into read-only folders; /sys refuses even root
        locked = Path("/sys/distill-test-run")
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        locked = tmp_path / "locked" / "run"
    with pytest.raises(CompareError, match=f"cannot write the comparison to {locked}/compare"):
        compare(tiny_recipe(locked, teacher=True, **checkpoints), **FAST)


def test_refused_commands_leave_no_empty_folder_and_eval_checks_before_scoring(trained, tmp_path, monkeypatch):
    import distill.evaluation as evaluation
    from distill.evaluation import evaluate_checkpoint
    from distill.run_folder import UnwritableFolderError

    run = tmp_path / "run"
    with pytest.raises(ModelError):  # no checkpoints there: refused
        compare(tiny_recipe(run, teacher=True), **FAST)
    assert not (run / "compare").exists()
    # distill eval into a folder it cannot write stops before it evaluates anything.
    (tmp_path / "blocked").write_text("a file where the run folder should be")
    checkpoint = str(Path(trained.output_dir) / "student" / "best.safetensors")
    scored = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: scored.append(1))
    with pytest.raises(UnwritableFolderError, match=r"cannot write the evaluation report to .*blocked/student"):
        evaluate_checkpoint(tiny_recipe(tmp_path / "blocked", **{"eval.checkpoint": checkpoint}), "student")
    assert not scored


def test_example_predictions_of_a_coarse_model_come_at_the_masks_size(trained):
    # A 1/4-resolution student's argmax was drawn against the full-size mask: an IndexError
    # after every model was scored, and no compare.json.
    import torch

    from distill.comparison import example_predictions
    from distill.data import build_dataset

    class Coarse(torch.nn.Module):
        def forward(self, images):
            return torch.nn.functional.avg_pool2d(images[:, :2], 4)

    dataset = build_dataset(trained.data, trained.data.val_split, train=False)
    [example] = example_predictions(dataset, {"coarse": Coarse()}, 1, torch.device("cpu"))
    image = dataset[0]["image"][None]
    expected = torch.nn.functional.interpolate(Coarse()(image), size=image.shape[-2:], mode="bilinear").argmax(1)[0]
    assert example["predictions"]["coarse"].shape == example["mask"].shape
    assert (example["predictions"]["coarse"] == expected.numpy()).all()


def test_a_compare_stopped_while_rendering_leaves_the_earlier_report_whole(trained, report, monkeypatch):
    import distill.comparison

    out = Path(trained.output_dir) / "compare"
    (out / "done.json").write_text("{}")  # as `distill run` leaves it
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.comparison, "render_png", stopped)
    with pytest.raises(KeyboardInterrupt):
        compare(trained, split="train", **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "done.json").unlink()
