"""A refused command leaves every file as it was and creates nothing; one run's records per
folder; problems named by their cause, all at once (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distill.cli import main
from distill.config import recipe_to_yaml
from helpers import tiny_recipe


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(tmp_path: Path, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_yaml(tiny_recipe(tmp_path / "run", **overrides)))
    return path


def bad_label_folder(root: Path) -> Path:
    """A 'folder' dataset whose masks hold label 9 with 2 classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(4):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(np.full((32, 32), 9, dtype=np.uint8)).save(root / "masks" / split / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    return recipe, tmp_path / "run"


@pytest.mark.parametrize("refused,message", [
    pytest.param(lambda run, tmp: ["train.lr=0.5", f"train.resume={run}/student"],
                 "train.lr: checkpoint 0.01, now 0.5", id="resume-other-lr"),
    pytest.param(lambda run, tmp: ["data.dataset=folder", f"data.root={bad_label_folder(tmp / 'bad')}",
                                   "data.class_names=[a,b]"], "has label values [9]", id="label-out-of-range"),
    pytest.param(lambda run, tmp: ["train.warmup_steps=10000"], "train.warmup_steps 10000", id="warmup-past-the-end"),
    pytest.param(lambda run, tmp: ["model.checkpoint=/no/such/weights.safetensors"],
                 "'/no/such/weights.safetensors' does not exist", id="missing-checkpoint"),
    pytest.param(lambda run, tmp: [f"train.resume={run}/student/best.safetensors"],
                 "best.safetensors' is not a checkpoint folder (tried", id="resume-from-a-file"),
])
def test_refused_train_leaves_a_finished_run_byte_identical(finished, tmp_path, refused, message, capfd):
    recipe, run = finished
    before = snapshot(run.parent)
    assert main(["train", str(recipe), *refused(run, tmp_path)]) == 2
    assert message in " ".join(capfd.readouterr().err.split())
    assert snapshot(run.parent) == before


def test_bad_data_met_after_the_first_step_gives_the_earlier_run_back(tmp_path, capfd):
    # The validation split is read only at the end of the first epoch, long after the new run's
    # first write: the finished run must come back as it was, and stay the resumable one.
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(rng.integers(0, 2, (32, 32), dtype=np.uint8)).save(root / "masks" / split / f"{i}.png")
    recipe = write_recipe(tmp_path, **{"data.dataset": "folder", "data.root": str(root),
                                       "data.class_names": "[a,b]", "data.batch_size": 2})
    assert main(["train", str(recipe)]) == 0
    before = snapshot(tmp_path / "run")
    Image.fromarray(np.full((32, 32), 9, dtype=np.uint8)).save(root / "masks" / "val" / "3.png")
    assert main(["train", str(recipe), "train.lr=0.02"]) == 2
    assert "3.png' has label values [9]" in " ".join(capfd.readouterr().err.split())
    assert snapshot(tmp_path / "run") == before
    assert not (tmp_path / "run" / "student" / ".previous_run").exists()
    # Masks all void: an mIoU of nothing (it ended "done" at -100, without best weights, and
    # dropped the finished run).
    for i in range(4):
        Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(root / "masks" / "val" / f"{i}.png")
    assert main(["train", str(recipe), "train.lr=0.02"]) == 2
    assert ("data.val_split 'val' has no labelled pixel (every mask is data.ignore_index 255): its mIoU "
            "is undefined") in " ".join(capfd.readouterr().err.split())
    assert snapshot(tmp_path / "run") == before


def test_sigterm_from_the_launcher_gives_the_earlier_run_back(tmp_path, monkeypatch):
    # torch's launcher stops a failed process's peers with SIGTERM: with distill's handler (the
    # CLI installs it in launched processes) the stop unwinds like an error, and a fresh run
    # stopped before its first validation puts the finished run back instead of hiding it.
    import signal

    import distill.training
    from distill.cli import stop_on_sigterm

    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    before = snapshot(tmp_path / "run")
    real = distill.training._validate_and_checkpoint

    def terminated(*args, **kwargs):  # after the first steps, before the first weights
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(distill.training, "_validate_and_checkpoint", terminated)
    default = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["train", str(recipe), "train.lr=0.02"])
    finally:
        signal.signal(signal.SIGTERM, default)
    monkeypatch.setattr(distill.training, "_validate_and_checkpoint", real)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert snapshot(tmp_path / "run") == before


def test_a_run_killed_before_its_first_weights_keeps_the_finished_run_aside(tmp_path):
    from distill.run_folder import StageFiles

    files = StageFiles(tmp_path / "student")
    files.folder.mkdir()
    for path, text in ((files.metrics, "finished\n"), (files.best, "weights"), (files.recipe, "recipe")):
        path.write_text(text)
    files.set_aside_earlier_run()  # the killed run's first write
    files.metrics.write_text("killed\n")
    files.set_aside_earlier_run()  # the next run's: the finished run stays aside, the killed one goes
    assert not files.metrics.exists() and (files.set_aside / "metrics.jsonl").read_text() == "finished\n"
    files.metrics.write_text("refused\n")
    files.restore_set_aside()
    assert files.metrics.read_text() == "finished\n" and files.best.read_text() == "weights"
    assert files.recipe.read_text() == "recipe" and not files.set_aside.exists()

    # A kill between two moves (setting aside, or restoring): the files on their way are the
    # earlier run's as much as those still in the folder, and come back with them.
    files.set_aside_earlier_run()
    moving = files.folder / ".previous_run.moving"
    os.replace(files.set_aside, moving)
    os.replace(moving / "best.safetensors", files.best)  # half restored when the kill came
    files.set_aside_earlier_run()  # the next run: the earlier one whole, then set aside again
    assert not moving.exists() and sorted(p.name for p in files.set_aside.iterdir()) == [
        "best.safetensors", "metrics.jsonl", "recipe.yaml"]


def test_eval_of_other_weights_does_not_replace_the_stage_report(finished, tmp_path):
    import json

    recipe, run = finished
    folder = tmp_path / "copy"
    folder.mkdir()
    other = folder / "best.safetensors"
    other.write_bytes((run / "student" / "last.safetensors").read_bytes())
    try:
        assert main(["eval", str(recipe)]) == 0
        own = json.loads((run / "student" / "eval_val.json").read_text())
        assert main(["eval", str(recipe), f"eval.checkpoint={other}"]) == 0
        assert main(["eval", str(recipe), f"eval.checkpoint={run}/student/last.safetensors"]) == 0
        assert json.loads((run / "student" / "eval_val.json").read_text()) == own
        reports = sorted(p.name for p in (run / "student").glob("eval_val@*.json"))
        assert len(reports) == 2 and "eval_val@last.json" in reports
        scored = {json.loads((run / "student" / name).read_text())["checkpoint"] for name in reports}
        assert scored == {str(other), f"{run}/student/last.safetensors"}
        # a split's own report never takes the name: a split 'val@last' is written 'val_last-<hash>'
        from distill.data.splits import file_safe

        assert "@" not in file_safe("val@last")
    finally:  # the module's finished run stays as the other tests expect it
        for report in (run / "student").glob("eval_*.json"):
            report.unlink()


def test_resuming_a_finished_run_into_another_folder_is_refused(finished, tmp_path, capfd):
    recipe, run = finished
    other = tmp_path / "other"
    assert main(["train", str(recipe), f"output_dir={other}", f"train.resume={run}/student"]) == 2
    assert "is a finished run (step 12 of 12): nothing is left to train into" in " ".join(capfd.readouterr().err.split())
    assert not other.exists()


def test_refused_train_into_a_new_folder_creates_nothing(tmp_path, capfd):
    recipe = write_recipe(tmp_path)
    target = tmp_path / "new" / "deeper"
    assert main(["train", str(recipe), f"output_dir={target}", "train.warmup_steps=10000"]) == 2
    assert not (tmp_path / "new").exists()


def test_training_again_from_the_start_begins_a_new_metrics_log(tmp_path):
    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    assert main(["eval", str(recipe)]) == 0
    report = tmp_path / "run" / "student" / "eval_val.json"
    assert report.is_file()
    assert main(["train", str(recipe)]) == 0
    assert not report.exists()  # it scored the weights the new run replaced
    steps = [line for line in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    numbers = [int(line.split('"step": ')[1].split(",")[0]) for line in steps]
    assert numbers == sorted(set(numbers)) and numbers[0] == 2  # one run, not two appended


def test_grad_accum_beyond_an_epoch_steps_with_the_micro_batches_mean(tmp_path):
    # 24 images in batches of 4: 6 micro-batches per epoch. Accumulating 50 or exactly 6 is one
    # optimizer step over the same 6 micro-batches: the same update (before, 50 gave 6/50 of it).
    weights = {}
    for accumulate in (6, 50):
        recipe = write_recipe(tmp_path / str(accumulate), **{
            "train.epochs": 1, "train.grad_accum_steps": accumulate, "train.optimizer": "sgd",
            "train.momentum": 0.0, "train.weight_decay": 0.0, "model.factory": "helpers:tiny_without_batch_norm"})
        assert main(["train", str(recipe)]) == 0
        weights[accumulate] = load_file(str(tmp_path / str(accumulate) / "run" / "student" / "last.safetensors"))
    torch.manual_seed(0)  # the initial weights: the same factory and seed as the runs
    for key, value in weights[6].items():
        assert torch.allclose(weights[50][key], value, atol=1e-6), key


def stop_in_the_second_epoch(monkeypatch) -> None:
    """A Ctrl-C as the second epoch ends: the first epoch's checkpoint is whole."""
    import distill.training

    real, calls = distill.training._validate_and_checkpoint, []

    def checkpoint_once(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(distill.training, "_validate_and_checkpoint", checkpoint_once)


def test_ctrl_c_prints_the_command_that_resumes_exactly_this_run(tmp_path, monkeypatch, capfd):
    stop_in_the_second_epoch(monkeypatch)
    recipe = write_recipe(tmp_path)
    out_dir = tmp_path / "other run"
    assert main(["train", str(recipe), "--stage", "baseline", f"output_dir={out_dir}", "train.epochs=3"]) == 130
    text = capfd.readouterr()
    line = " ".join((text.out + text.err).split())
    command = line.split("resume this run with `")[1].split("`")[0]
    words = shlex.split(command)
    assert words[:5] == ["distill", "train", str(recipe), "--stage", "baseline"]
    assert f"output_dir={out_dir}" in words and "train.epochs=3" in words
    assert f"train.resume={out_dir}/baseline" in words
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0  # and it does


@pytest.mark.parametrize("where", ["check_inputs", "_set_up"])
def test_ctrl_c_before_a_resumed_run_began_repeats_its_train_resume(tmp_path, monkeypatch, capfd, where):
    import distill.training

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe), "--stage", "baseline", "train.epochs=3"]) == 0
    monkeypatch.setattr(distill.training, where, stopped)  # the inputs checked; the data, models set up
    capfd.readouterr()
    elsewhere = tmp_path / "elsewhere"
    resume = f"train.resume={tmp_path / 'run' / 'baseline'}"
    assert main(["train", str(recipe), "--stage", "baseline", "train.epochs=4", f"output_dir={elsewhere}", resume]) == 130
    said = " ".join("".join(capfd.readouterr()).split())
    # The user's own train.resume, whose checkpoint is untouched; not one of a folder that holds
    # no checkpoint, and not "nothing to resume".
    assert "nothing to resume" not in said and ("resume it again with `" in said or "resume this run with `" in said)
    command = said.split("with `")[1].split("`")[0]
    assert resume in shlex.split(command) and f"train.resume={elsewhere}" not in command


@pytest.mark.parametrize("key,what", [("output_dir", "student stage"), ("cache.dir", "logit cache")])
def test_a_file_where_a_folder_belongs_is_named_as_such(tmp_path, key, what, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    recipe = write_recipe(tmp_path, teacher=True, **{"data.resize": "[32,32]"})
    command = "cache" if key == "cache.dir" else "train"
    teacher = tmp_path / "teacher.safetensors"
    from safetensors.torch import save_file
    from helpers import tiny
    save_file(tiny(4, 12).state_dict(), str(teacher))
    assert main([command, str(recipe), f"{key}={blocker}", f"teacher.checkpoint={teacher}"]) == 2
    out = " ".join(capfd.readouterr().err.split())
    assert f"'{blocker}' is a file, not a folder" in out and what in out
    assert blocker.read_text() == "not a folder"


def test_every_local_problem_is_reported_at_once(tmp_path, capfd):
    recipe = write_recipe(tmp_path, teacher=True)
    assert main(["train", str(recipe), "data.dataset=camvid", "data.root=/no_such_dir"]) == 2
    out = " ".join(capfd.readouterr().err.split())
    assert "2 problems" in out
    assert "data.root '/no_such_dir' does not exist" in out and "the teacher has no weights" in out
    assert not (tmp_path / "run").exists()


def test_a_run_refused_by_a_later_stage_leaves_the_finished_run_byte_identical(tmp_path, capfd):
    # A larger batch changes the teacher's inputs (it would be retrained) and leaves the
    # baseline's 6 masks (every 4th of 24 images) short of one batch: the baseline's refusal
    # must come before the teacher is redone.
    recipe = write_recipe(tmp_path, teacher=True, **{
        "data.labelled_fraction": 0.25, "train.epochs": 1, "run.compare": "false", "run.export": "false"})
    assert main(["run", str(recipe)]) == 0
    before = snapshot(tmp_path / "run")
    capfd.readouterr()
    assert main(["run", str(recipe), "data.batch_size=8"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert ("the baseline stage: split 'train' has 6 samples with masks (data.labelled_fraction 0.25: "
            "one mask in 4), fewer than data.batch_size 8") in err
    # train.resume names one checkpoint; distill run resumes each stage from its own.
    assert main(["run", str(recipe), f"train.resume={tmp_path / 'run' / 'student'}"]) == 2
    assert "train.resume is for `distill train`" in " ".join(capfd.readouterr().err.split())
    assert main(["run", str(recipe), f"teacher_train.resume={tmp_path / 'run' / 'teacher'}"]) == 2
    assert "teacher_train.resume is for `distill train`" in " ".join(capfd.readouterr().err.split())
    # Refusals that need the students' models built, with the teacher's schedule changed (it
    # would be retrained first); and eval.checkpoint, which compare and export would have used.
    for refused, message in [
        ("student.factory=helpers:no_such", "the baseline stage: factory 'helpers:no_such': 'helpers' has no function"),
        ("teacher.class_map={0: 9}", "the student stage: teacher.class_map: student class 9 is out of range"),
        ("loss.feature.pairs=[[7,-1]]", "the student stage: loss.feature.pairs: feature distillation reads"),
        (f"eval.checkpoint={tmp_path / 'run' / 'baseline' / 'best.safetensors'}", "eval.checkpoint is for"),
    ]:
        feature = ["loss.feature.kind=hint"] if "feature" in refused else []
        assert main(["run", str(recipe), "teacher_train.epochs=2", refused, *feature]) == 2, refused
        assert message in " ".join(capfd.readouterr().err.split()), refused
    assert snapshot(tmp_path / "run") == before


def test_a_streamed_onnx_teachers_bad_class_map_is_refused_before_the_baseline_trains(tmp_path, capfd):
    from helpers import onnx_teacher

    onnx_teacher(tmp_path / "teacher.onnx")  # 4 classes, like the student's data
    recipe = write_recipe(tmp_path, teacher=True, **{
        "teacher.source": "onnx", "teacher.path": str(tmp_path / "teacher.onnx"), "teacher.mode": "stream",
        "teacher.class_map": "{0: 0, 1: 1, 2: 2, 7: 3}", "train.epochs": 1})
    assert main(["run", str(recipe)]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "the student stage: teacher.class_map: teacher class 7 is out of range 0..3" in err
    assert not (tmp_path / "run").exists()  # the baseline was not trained first


def test_eval_of_a_teacher_checkpoint_elsewhere_keeps_the_teacher_report(tmp_path):
    import json
    import shutil

    recipe = write_recipe(tmp_path, teacher=True, **{"train.epochs": 1})
    assert main(["train", str(recipe), "--stage", "teacher"]) == 0
    folder = tmp_path / "run" / "teacher"
    assert main(["eval", str(recipe), "--stage", "teacher"]) == 0
    own = (folder / "eval_val.json").read_bytes()
    other = tmp_path / "elsewhere" / "best.safetensors"
    other.parent.mkdir()
    shutil.copy(folder / "best.safetensors", other)
    assert main(["eval", str(recipe), "--stage", "teacher", f"teacher.checkpoint={other}"]) == 0
    assert (folder / "eval_val.json").read_bytes() == own
    [report] = folder.glob("eval_val@best-*.json")
    assert json.loads(report.read_text())["checkpoint"] == str(other)


def test_missing_encoder_weights_file_is_bad_input_not_a_crash(tmp_path, capfd):
    recipe = write_recipe(tmp_path)
    missing = tmp_path / "none.safetensors"
    assert main(["train", str(recipe), "model.factory=null", "model.arch=FPN", "model.encoder=resnet18",
                 f"model.encoder_weights={missing}"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_eval_of_a_teacher_the_recipe_does_not_have_is_named(tmp_path, capfd):
    recipe = write_recipe(tmp_path)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not read")
    assert main(["eval", str(recipe), "--stage", "teacher", f"checkpoint={weights}"]) == 2
    assert "stage 'teacher' needs a `teacher` section" in " ".join(capfd.readouterr().err.split())


def test_eval_checkpoint_cannot_replace_a_teacher_given_by_its_path(tmp_path):
    from distill.models import ModelError
    from distill.stage_weights import checkpoint_to_score

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not read")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.factory": "null", "teacher.source": "onnx", "teacher.path": str(tmp_path / "t.onnx"),
        "teacher.class_names": "[a,b,c,d]", "eval.checkpoint": str(weights)})
    with pytest.raises(ModelError, match=r"eval.checkpoint: a teacher of source 'onnx' is the model in teacher.path"):
        checkpoint_to_score(recipe, "teacher")
    assert checkpoint_to_score(recipe, "student") == weights  # the student's weights can be any file


def test_a_run_that_does_not_distil_exports_without_teacher_weights(tmp_path):
    from distill.pipeline import run_pipeline

    # A teacher section with kd_weight 0: nothing trains the teacher, and the export reads the
    # student alone.
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"loss.kd_weight": 0.0, "train.epochs": 1})
    assert {o.stage: o.status for o in run_pipeline(recipe)} == {"student": "trained", "export": "done"}
    assert (tmp_path / "run" / "export" / "student.onnx").is_file()


def test_a_fresh_run_stopped_before_its_first_weights_gives_the_earlier_run_back_whole(tmp_path, monkeypatch,
                                                                                      capfd):
    import distill.training

    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    assert (tmp_path / "run" / "student" / "checkpoints" / "latest").is_dir()
    before = snapshot(tmp_path / "run")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.training, "_validate_and_checkpoint", stopped)
    capfd.readouterr()
    assert main(["train", str(recipe), "train.lr=0.02"]) == 130  # its first step ran, then a stop
    # Its checkpoint and weights together: never the checkpoint of one run beside another's weights.
    assert snapshot(tmp_path / "run") == before
    # Nothing of the stopped run to resume (train.resume would name the earlier, finished run).
    captured = capfd.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert "it had not been validated yet, so the folder's earlier run is back as it was and there is nothing to resume" in said
    assert f"start it again with `distill train {recipe} --stage student train.lr=0.02`" in said
    assert "train.resume" not in said
    import pickle

    from distill.training import StoppedBeforeCheckpoint

    again = pickle.loads(pickle.dumps(StoppedBeforeCheckpoint(True)))  # process pools pickle it
    assert isinstance(again, KeyboardInterrupt) and again.earlier_run_restored is True


def test_bad_validation_data_met_after_a_checkpoint_gives_the_earlier_run_back(tmp_path, monkeypatch, capfd):
    # Validation every 2nd epoch, a checkpoint every epoch: the refused run checkpoints (and
    # writes last.safetensors) before it first reads the validation split.
    import distill.training
    from distill.data import DataError

    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    before = snapshot(tmp_path / "run")

    def bad_mask(*args, **kwargs):
        raise DataError("mask 'val/000003.png' has label values [7]")

    monkeypatch.setattr(distill.training, "evaluate_model", bad_mask)
    assert main(["train", str(recipe), "train.lr=0.02", "train.eval_every_epochs=2"]) == 2
    assert snapshot(tmp_path / "run") == before
    assert "label values [7]" in " ".join(capfd.readouterr().err.split())


def test_ctrl_c_during_set_up_of_a_fresh_run_offers_no_resume(tmp_path, monkeypatch, capfd):
    import distill.training

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.training, "_set_up", stopped)  # loading a teacher, scanning data
    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 130
    captured = capfd.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert "it had saved no checkpoint yet, so there is nothing to resume: start it again with" in said
    assert "train.resume" not in said and not (tmp_path / "run" / "student" / "checkpoints").exists()


def test_a_cached_teacher_cannot_label_a_dataset_of_your_own(tmp_path):
    from distill.launch import TrainingError
    from distill.training import train

    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.mode": "cache", "data.resize": "[32,32]"})
    pairs = [(torch.rand(3, 32, 32), torch.zeros(32, 32, dtype=torch.long)) for _ in range(8)]
    with pytest.raises(TrainingError, match="teacher.mode 'cache' serves the stored maps of data.train_split"):
        train(recipe, "student", train_dataset=pairs)
    assert not (tmp_path / "run").exists()


def test_a_dataset_of_your_own_too_small_for_a_batch_is_named_as_yours(tmp_path):
    from distill.launch import TrainingError
    from distill.training import train

    recipe = tiny_recipe(tmp_path / "run", **{"data.batch_size": 4})
    pairs = [(torch.rand(3, 32, 32), torch.zeros(32, 32, dtype=torch.long)) for _ in range(3)]
    with pytest.raises(TrainingError, match=r"no training batch: 3 images in the train_dataset given do not fill one batch of 4"):
        train(recipe, "baseline", train_dataset=pairs, val_dataset=pairs)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_replaces_hub_encoder_weights_without_fetching_them(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from distill.config import ModelConfig
    from distill.models import build_model

    plain = ModelConfig(arch="FPN", encoder="resnet18", arch_kwargs={"decoder_segmentation_channels": 32})
    weights = tmp_path / "fpn.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(plain, 3).state_dict().items()}, str(weights))
    for variable in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):  # empty caches, no network
        monkeypatch.setenv(variable, str(tmp_path / "caches"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model(plain.model_copy(update={"encoder_weights": "imagenet", "checkpoint": weights}), 3)
    assert all(torch.equal(v, load_file(str(weights))[k]) for k, v in model.state_dict().items())


def test_encoder_weights_with_a_factory_are_refused(tmp_path):
    from distill.config import RecipeError

    with pytest.raises(RecipeError, match="encoder_weights is for smp models"):
        tiny_recipe(tmp_path, **{"model.encoder_weights": str(tmp_path / "w.safetensors")})


def test_a_missing_teacher_path_is_found_before_any_stage_runs(tmp_path, capfd):
    recipe = write_recipe(tmp_path, teacher=True, **{"train.epochs": 1, "run.compare": "false",
                                                     "run.export": "false"})
    assert main(["run", str(recipe)]) == 0
    before = snapshot(tmp_path / "run")
    capfd.readouterr()
    missing = tmp_path / "nope.onnx"
    for source, path, message in [
        ("onnx", missing, f"teacher.path '{missing}' is not an ONNX file (tried '{missing}')"),
        ("transformers", tmp_path / "no_folder", "is not a model folder (tried"),
    ]:  # with a changed learning rate, the baseline would be retrained first
        assert main(["run", str(recipe), f"teacher.source={source}", f"teacher.path={path}", "train.lr=0.02"]) == 2
        assert message in " ".join(capfd.readouterr().err.split()), source
    assert snapshot(tmp_path / "run") == before


def test_training_a_teacher_given_by_a_path_is_refused(tmp_path, capfd):
    from helpers import onnx_teacher

    onnx_teacher(tmp_path / "teacher.onnx")
    recipe = write_recipe(tmp_path, teacher=True)
    assert main(["train", str(recipe), "--stage", "teacher", "teacher.source=onnx",
                 f"teacher.path={tmp_path / 'teacher.onnx'}"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert (f"teacher.source 'onnx': the teacher is the model teacher.path ('{tmp_path / 'teacher.onnx'}') "
            "gives, which the teacher stage does not train") in err
    assert not (tmp_path / "run").exists()  # it trained a DeepLabV3+ of the schema's defaults


def test_the_advice_for_a_student_without_weights_works_for_every_command_that_gives_it(tmp_path, capfd):
    from safetensors.torch import save_file

    from distill.config import load_recipe
    from distill.models import build_model

    teacher = tmp_path / "teacher.safetensors"  # compare scores a teacher too
    save_file(build_model(load_recipe(write_recipe(tmp_path, teacher=True)).teacher, 4).state_dict(), teacher)
    recipe = write_recipe(tmp_path, teacher=True, **{"teacher.checkpoint": str(teacher)})
    for command in ("eval", "compare", "export"):
        assert main([command, str(recipe)]) == 2
        err = " ".join(capfd.readouterr().err.split())
        assert "the student has no weights" in err and "or pass checkpoint=PATH" in err, command
        # Following it: the file is looked for (compare said `unknown key 'checkpoint'`).
        assert main([command, str(recipe), f"checkpoint={tmp_path / 'w.safetensors'}"]) == 2
        err = " ".join(capfd.readouterr().err.split())
        assert f"eval.checkpoint '{tmp_path / 'w.safetensors'}' does not exist" in err, command


def test_a_new_run_keeps_the_reports_of_weights_from_elsewhere(tmp_path):
    recipe = write_recipe(tmp_path, **{"train.epochs": 1})
    assert main(["train", str(recipe)]) == 0
    folder = tmp_path / "run" / "student"
    outside = tmp_path / "elsewhere" / "candidate.safetensors"
    outside.parent.mkdir()
    outside.write_bytes((folder / "best.safetensors").read_bytes())
    assert main(["eval", str(recipe)]) == 0
    assert main(["eval", str(recipe), f"checkpoint={outside}"]) == 0
    theirs = [p.name for p in folder.glob("eval_*@candidate-*.json")]
    assert len(theirs) == 1
    # A report of this folder's own checkpoint goes with the run that made it.
    assert main(["eval", str(recipe), f"checkpoint={folder / 'checkpoints' / 'latest' / 'model.safetensors'}"]) == 0
    assert len(list(folder.glob("eval_*@model-*.json"))) == 1
    assert main(["train", str(recipe), "train.lr=0.02"]) == 0
    # The report of this folder's best weights went with them; that of another file stays.
    assert sorted(p.name for p in folder.glob("eval_*.json")) == theirs


def test_a_resumed_run_drops_the_reports_of_the_weights_it_rewrites(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, **{"train.epochs": 3, "train.lr": 0.05})
    stop_in_the_second_epoch(monkeypatch)
    assert main(["train", str(recipe), "--stage", "baseline"]) == 130
    monkeypatch.undo()
    folder = tmp_path / "run" / "baseline"
    assert main(["eval", str(recipe), "--stage", "baseline"]) == 0
    assert main(["eval", str(recipe), "--stage", "baseline", f"checkpoint={folder / 'last.safetensors'}"]) == 0
    best = (folder / "best.safetensors").read_bytes()
    assert {p.name for p in folder.glob("eval_*.json")} == {"eval_val.json", "eval_val@last.json"}
    assert main(["train", str(recipe), "--stage", "baseline", f"train.resume={folder}"]) == 0
    # last.safetensors is rewritten; best.safetensors when a later epoch scores higher.
    kept = {p.name for p in folder.glob("eval_*.json")}
    assert kept == (set() if (folder / "best.safetensors").read_bytes() != best else {"eval_val.json"})


def test_eval_names_every_problem_of_its_inputs_at_once(tmp_path):
    from distill.evaluation import evaluate_checkpoint
    from distill.preflight import InputError

    recipe = tiny_recipe(tmp_path / "run", **{"data.dataset": "folder", "data.class_names": "[a, b, c, d]",
                                              "data.root": str(tmp_path / "no_data")})
    with pytest.raises(InputError, match=r"2 problems with the inputs") as caught:
        evaluate_checkpoint(recipe, "student")
    assert "no_data" in str(caught.value) and "has no weights" in str(caught.value)
    assert not (tmp_path / "run").exists()
