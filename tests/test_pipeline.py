"""`distill run`: stages in order, skipped when up to date, redone when inputs change, resumed."""

import json
from pathlib import Path

import pytest

import distill.training as loop
from distill import train
from distill.pipeline import planned_stages, run_pipeline
from distill.run_folder import StageFiles
from helpers import stopped_after_its_first_checkpoint, tiny_recipe

pytestmark = pytest.mark.slow
CACHED = {"teacher.mode": "cache", "data.resize": "[32, 32]"}


def statuses(outcomes):
    return {o.stage: o.status for o in outcomes}


def test_planned_stages_follow_the_recipe(tmp_path):
    assert planned_stages(tiny_recipe(tmp_path)) == ["student", "export"]
    assert planned_stages(tiny_recipe(tmp_path, teacher=True)) == [
        "teacher", "baseline", "student", "compare", "export"]
    assert planned_stages(tiny_recipe(tmp_path, teacher=True, **CACHED, **{"run.baseline": "false"})) == [
        "teacher", "cache", "student", "compare", "export"]


def test_rerun_skips_what_is_done_and_redoes_what_changed(tmp_path):
    recipe = tiny_recipe(tmp_path, teacher=True, **{"train.epochs": 1})
    first = run_pipeline(recipe)
    assert statuses(first) == {"teacher": "trained", "baseline": "trained", "student": "trained",
                               "compare": "done", "export": "done"}
    compare = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert set(compare["models"]) == {"teacher", "student", "baseline"}
    assert (tmp_path / "export" / "student.onnx").is_file()

    again = run_pipeline(recipe)
    assert set(statuses(again).values()) == {"up to date"}
    assert [o.best_miou for o in again[:3]] == [o.best_miou for o in first[:3]]

    # A comparison written by `distill compare` on another split is not the run's: redone.
    from distill.comparison import compare

    compare(recipe, "train", latency_runs=1, warmup_runs=0, num_examples=1)
    assert statuses(run_pipeline(recipe))["compare"] == "done"
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["split"] == "val"

    # A new temperature changes only the distilled student, and so what reads its weights.
    warmer = tiny_recipe(tmp_path, teacher=True, **{"train.epochs": 1, "loss.temperature": 4.0})
    assert statuses(run_pipeline(warmer)) == {"teacher": "up to date", "baseline": "up to date",
                                              "student": "trained", "compare": "done", "export": "done"}


def killed_after_its_first_checkpoint(recipe, monkeypatch) -> None:
    """``distill run`` of ``recipe`` stopped right after its stage's first checkpoint."""
    stopped_after_its_first_checkpoint(lambda: run_pipeline(recipe), monkeypatch)


def test_killed_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, **{"train.epochs": 2, "run.export": "false"})
    killed_after_its_first_checkpoint(recipe, monkeypatch)
    outcome = run_pipeline(recipe)
    assert statuses(outcome) == {"student": "resumed"}
    progress = json.loads((tmp_path / "student" / "checkpoints" / "latest" / "progress.json").read_text())
    assert progress["epoch"] == 2 and progress["step"] == 12


def test_a_run_killed_after_its_checkpoint_before_its_first_validation_is_resumed(tmp_path, monkeypatch):
    # A fresh run into a finished folder, killed (SIGKILL: no handler puts the finished run back)
    # after its first checkpoint, before its first validation: the finished run is still set
    # aside, and the killed run's checkpoint, of the stage's inputs, is resumed, not dropped.
    settings = {"train.epochs": 2, "run.export": "false", "train.eval_every_epochs": 2}
    run_pipeline(tiny_recipe(tmp_path, **settings))
    changed = tiny_recipe(tmp_path, **settings, **{"train.lr": 0.02})
    monkeypatch.setattr(StageFiles, "restore_set_aside", lambda self: None)
    killed_after_its_first_checkpoint(changed, monkeypatch)
    monkeypatch.undo()
    files = StageFiles(tmp_path / "student")
    assert files.killed_run_left() and files.resumable_checkpoint() is not None
    assert statuses(run_pipeline(changed)) == {"student": "resumed"}
    assert files.best.is_file() and not files.set_aside.exists()


def test_a_baseline_that_only_compare_reads_is_given_back_after_a_kill(tmp_path):
    settings = {"train.epochs": 1, "run.export": "false"}
    recipe = tiny_recipe(tmp_path, teacher=True, **settings)
    run_pipeline(recipe)
    baseline = StageFiles(tmp_path / "baseline")
    checkpoint = baseline.resumable_checkpoint()
    baseline.set_aside_earlier_run()  # a fresh baseline run killed after its first checkpoint
    (checkpoint.parent).mkdir(parents=True)
    (baseline.set_aside / "checkpoints").rename(checkpoint.parent)  # of the stage's own inputs
    (tmp_path / "compare" / "done.json").unlink()
    outcome = statuses(run_pipeline(tiny_recipe(tmp_path, teacher=True, **settings, **{"run.baseline": "false"})))
    assert outcome["compare"] == "done" and (tmp_path / "baseline" / "best.safetensors").is_file()


def test_stage_killed_between_the_checkpoint_swaps_resumes_from_the_previous_one(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, **{"train.epochs": 2, "run.export": "false"})
    killed_after_its_first_checkpoint(recipe, monkeypatch)
    checkpoints = tmp_path / "student" / "checkpoints"
    (checkpoints / "latest").rename(checkpoints / ".previous")  # killed between the two renames
    assert statuses(run_pipeline(recipe)) == {"student": "resumed"}
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]  # one run, continued


def test_a_finished_stage_hidden_by_a_run_killed_before_its_weights_comes_back_up_to_date(tmp_path):
    from distill.evaluation import evaluate_checkpoint
    from distill.models import ModelError

    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1, "run.export": "false"})
    assert statuses(run_pipeline(recipe)) == {"student": "trained"}
    files = StageFiles(tmp_path / "student")
    weights = files.best.read_bytes()
    # What a fresh run (another lr) killed by SIGKILL after its first step leaves: the finished
    # run set aside, the killed run's first records in its place, no weights.
    files.set_aside_earlier_run()
    files.metrics.write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ModelError, match=r"a run killed before its first validation set the last finished run "
                                         r"aside in .*\.previous_run; `distill run RECIPE` puts it back"):
        evaluate_checkpoint(recipe, "student")
    assert statuses(run_pipeline(recipe)) == {"student": "up to date"}  # it was retrained from scratch
    assert files.best.read_bytes() == weights and not files.set_aside.exists()
    assert '"loss": 1.0' not in files.metrics.read_text()


def test_a_baseline_hidden_by_a_killed_run_or_a_live_one_is_said_not_left_out(tmp_path):
    from distill.models import ModelError
    from distill.run_folder import exclusive_folder
    from distill.stage_weights import baseline_weights, trained_weights

    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1})
    train(recipe, "baseline")
    files = StageFiles(tmp_path / "baseline")
    assert baseline_weights(recipe) == files.best
    files.set_aside_earlier_run()  # a fresh run's first write: killed there, or still running
    # compare's baseline row: not silently left out of compare.json (it was)
    with pytest.raises(ModelError, match=r"a run killed before its first validation set the last finished"):
        baseline_weights(recipe)
    with exclusive_folder(files.folder):  # a run alive: not called killed
        with pytest.raises(ModelError, match=r"no weights in .*baseline yet: a run is training it now "
                                             r"\(pid \d+ on .*\); wait for its first validation"):
            trained_weights(recipe, "baseline")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_damaged_checkpoint_says_what_distill_run_needs(tmp_path, monkeypatch, suffix):
    from distill.launch import TrainingError

    recipe = tiny_recipe(tmp_path, **{"train.epochs": 2, "run.export": "false"})
    killed_after_its_first_checkpoint(recipe, monkeypatch)
    latest = tmp_path / "student" / "checkpoints" / "latest"
    damaged = next(p for p in sorted(latest.iterdir()) if p.suffix == suffix)  # weights, optimizer
    damaged.write_bytes(damaged.read_bytes()[:100])
    # Not `train.resume`, which distill run refuses, and not retrained over unasked.
    with pytest.raises(TrainingError, match=r"the student stage's checkpoint '.*latest' cannot be read \(.*\): "
                                            r"restore it, or delete it and `distill run` trains the stage"):
        run_pipeline(recipe)
    assert damaged.stat().st_size == 100


def test_stage_whose_checkpoint_no_longer_fits_its_model_trains_anew(tmp_path, monkeypatch, capfd):
    # The factory's code changed between the kill and the rerun (its name and arguments did
    # not): the checkpoint cannot be loaded, and `distill run` cannot be given train.resume.
    import helpers

    recipe = tiny_recipe(tmp_path, **{"train.epochs": 2, "run.export": "false"})
    killed_after_its_first_checkpoint(recipe, monkeypatch)
    monkeypatch.setattr(helpers, "tiny", lambda num_classes: helpers.TinySegmenter(num_classes, 6))
    assert statuses(run_pipeline(recipe)) == {"student": "trained"}
    printed = capfd.readouterr()
    printed = " ".join((printed.out + printed.err).split())
    assert "checkpoint was made from other inputs (train.resume" not in printed
    assert "checkpoint was made from other inputs (holds weights of another model: " in printed


def test_cache_mode_runs_end_to_end(tmp_path):
    recipe = tiny_recipe(tmp_path, teacher=True, **CACHED, **{"train.epochs": 1, "run.baseline": "false",
                                                            "run.export": "false"})
    outcome = statuses(run_pipeline(recipe))
    assert outcome == {"teacher": "trained", "cache": "done", "student": "trained", "compare": "done"}
    assert (tmp_path / "cache" / "manifest.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in records if "loss" in r)
    # Run again: every stage, the store among them, is up to date (the notebook says so).
    assert set(statuses(run_pipeline(recipe)).values()) == {"up to date"}


def test_a_store_folder_of_other_files_is_refused_before_the_teacher_is_redone(tmp_path):
    from distill.cache import CacheError

    recipe = tiny_recipe(tmp_path, teacher=True, **CACHED, **{"train.epochs": 1, "run.baseline": "false",
                                                            "run.export": "false"})
    run_pipeline(recipe)
    (tmp_path / "cache" / "train" / "notes.txt").write_text("mine")
    teacher = {p.name: p.read_bytes() for p in (tmp_path / "teacher").iterdir() if p.is_file()}
    changed = tiny_recipe(tmp_path, teacher=True, **CACHED, **{"train.epochs": 1, "run.baseline": "false",
                                                             "run.export": "false", "teacher_train.lr": 0.02})
    with pytest.raises(CacheError, match=r"train' holds 'notes.txt', which a logit store never writes"):
        run_pipeline(changed)
    assert {p.name: p.read_bytes() for p in (tmp_path / "teacher").iterdir() if p.is_file()} == teacher


def test_weights_retrained_outside_run_make_later_stages_stale(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1, "run.export": "false"})
    assert statuses(run_pipeline(recipe)) == {"student": "trained"}
    loop.train(tiny_recipe(tmp_path, **{"train.epochs": 1, "train.seed": 5}), "student")  # by hand
    assert statuses(run_pipeline(recipe))["student"] != "up to date"


def test_settings_that_only_change_the_run_keep_stages_up_to_date(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.epochs": 1, "run.export": "false"})
    run_pipeline(recipe)
    relaxed = tiny_recipe(tmp_path, **{"train.epochs": 1, "run.export": "false", "data.num_workers": 1,
                                       "train.log_every_steps": 3, "train.cpu_malloc_tuning": "false"})
    assert statuses(run_pipeline(relaxed)) == {"student": "up to date"}


def test_held_out_group_and_teacher_schedule_through_the_cache(tmp_path):
    # Validation on a fold of the pooled splits (groups: the last digit of a sample's name), a
    # teacher trained longer than its student, targets from the cache.
    recipe = tiny_recipe(tmp_path, teacher=True, **CACHED, **{
        "data.train_split": "train+val", "data.val_split": "train+val:fold=0/4",
        "data.group_pattern": "'\\d$'", "cache.splits": "[train+val]", "teacher_train.epochs": 3,
        "train.epochs": 1, "run.baseline": "false", "run.export": "false", "run.compare": "false"})
    statuses(run_pipeline(recipe))
    epochs = {stage: sum("val_miou" in json.loads(line) for line in
                         (tmp_path / stage / "metrics.jsonl").read_text().splitlines())
              for stage in ("teacher", "student")}
    assert epochs == {"teacher": 3, "student": 1}
    from distill.cache.store import split_folder
    from distill.data import build_dataset

    held_out = build_dataset(recipe.data, recipe.data.val_split, train=False)
    val_ids = {held_out.sample_id(i) for i in range(len(held_out))}
    assert {name[-1] for name in val_ids} == {"0", "4", "8"}
    cached = json.loads((split_folder(tmp_path / "cache", "train+val") / "index.json").read_text())
    assert len(cached) == 24 + 13 - len(val_ids) and not val_ids & set(cached)


def test_every_planned_stage_inputs_are_checked_before_the_first_stage(tmp_path):
    # A wrong eval.split (read by compare) and a file where export/ belongs: both named at once,
    # before the teacher is trained.
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "export").write_text("in the way")
    recipe = tiny_recipe(tmp_path, teacher=True, **CACHED, **{"train.epochs": 1, "eval.split": "nosuch",
                                                              "cache.splits": "[train, nosuch2]"})
    with pytest.raises(ValueError, match="3 problems") as caught:
        run_pipeline(recipe)
    message = str(caught.value)
    assert "'nosuch'" in message and "'nosuch2'" in message and "is a file, not a folder" in message
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "cache").exists()


def test_a_killed_stage_whose_inputs_changed_outside_the_recipe_starts_anew(tmp_path, monkeypatch):
    # One more image in an unlabelled folder: the stage's fingerprint is the same, its
    # checkpoint's training samples are not, and every rerun was refused until it was deleted.
    import numpy as np
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(7):
        Image.fromarray(np.full((32, 32, 3), 30 * k, dtype=np.uint8)).save(folder / f"f{k}.png")
    (folder / "f6.png").rename(tmp_path / "f6.png")  # kept back for the rerun
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "train.epochs": 2, "run.baseline": "false", "run.compare": "false", "run.export": "false",
        "data.unlabelled": f"[{{folder: {folder}}}]"})
    save = loop.save_checkpoint

    def student_dies_after_its_first_checkpoint(accelerator, run_dir, state):
        save(accelerator, run_dir, state)
        if Path(run_dir).name == "student":
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", student_dies_after_its_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    (tmp_path / "f6.png").rename(folder / "f6.png")
    assert statuses(run_pipeline(recipe)) == {"teacher": "up to date", "student": "trained"}


def test_how_a_teacher_is_read_redoes_the_student_and_the_comparison_not_the_teacher(tmp_path):
    # teacher.input_size, bgr and class_map shape the wrapper around the model; training the
    # teacher never reads them (a run retrained it for each).
    from distill.pipeline import stage_fingerprint

    recipe = tiny_recipe(tmp_path, teacher=True)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "best.safetensors").write_bytes(b"weights")  # the student reads their hash
    for override in ({"teacher.input_size": "[24, 24]"}, {"teacher.bgr": "true"},
                     {"teacher.class_map": "{0: 0, 1: 1, 2: 2, 3: 3}"}):
        changed = tiny_recipe(tmp_path, teacher=True, **override)
        assert stage_fingerprint(changed, "teacher") == stage_fingerprint(recipe, "teacher"), override
        for stage in ("student", "compare"):
            assert stage_fingerprint(changed, stage) != stage_fingerprint(recipe, stage), (override, stage)


def test_renaming_classes_redoes_no_training_unless_a_class_map_names_them(tmp_path):
    from distill.pipeline import stage_fingerprint

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "best.safetensors").write_bytes(b"weights")
    names = ["background", "circle_stripes", "square_dots", "triangle_solid"]
    recipe = tiny_recipe(tmp_path, teacher=True, **{"data.class_names": str(names)})
    renamed = tiny_recipe(tmp_path, teacher=True, **{"data.class_names": str(["bg", "a", "b", "c"])})
    for stage in ("teacher", "baseline", "student"):
        assert stage_fingerprint(renamed, stage) == stage_fingerprint(recipe, stage), stage
    assert stage_fingerprint(renamed, "compare") != stage_fingerprint(recipe, "compare")  # its tables name them


def test_new_shards_of_a_sharded_teacher_are_other_weights(tmp_path):
    import json

    from distill.pipeline import stage_fingerprint

    folder = tmp_path / "hf_teacher"  # as a Hugging Face download of sharded weights looks
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    shards = [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for shard in shards:
        (folder / shard).write_bytes(b"old weights")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "transformers", "teacher.path": str(folder), "teacher.factory": "null",
        "teacher.factory_kwargs": "{}"})
    before = stage_fingerprint(recipe, "student")
    (folder / shards[1]).write_bytes(b"fine-tuned weights")  # the index is the same
    assert stage_fingerprint(recipe, "student") != before
    # Its processor (the input's normalization, channel order) and config (its classes) too.
    for name, text in (("preprocessor_config.json", '{"do_normalize": false}'), ("config.json", '{"id2label": {}}')):
        before = stage_fingerprint(recipe, "student")
        (folder / name).write_text(text)
        assert stage_fingerprint(recipe, "student") != before, name
    # Not for a checkpoint file that happens to be named so, beside a config of something else.
    from safetensors.torch import save_file

    from helpers import TinySegmenter

    other = tmp_path / "checkpoints"
    other.mkdir()
    save_file(TinySegmenter(4, 12).state_dict(), str(other / "model.safetensors"))
    recipe = tiny_recipe(tmp_path / "run2", teacher=True, **{"teacher.checkpoint": str(other / "model.safetensors")})
    before = stage_fingerprint(recipe, "student")
    (other / "config.json").write_text('{"notes": "of another tool"}')
    assert stage_fingerprint(recipe, "student") == before


def test_a_run_that_is_up_to_date_does_not_load_a_given_teacher_to_check_it(tmp_path, monkeypatch):
    import distill.training
    from helpers import onnx_teacher

    onnx_teacher(tmp_path / "teacher.onnx")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "onnx", "teacher.path": str(tmp_path / "teacher.onnx"), "teacher.factory": "null",
        "teacher.factory_kwargs": "{}", "teacher.class_map": "{0: 0, 1: 1, 2: 2, 3: 3}", "train.epochs": 1,
        "run.compare": "false", "run.export": "false"})
    run_pipeline(recipe)
    loads = []
    real = distill.training.load_teacher
    monkeypatch.setattr(distill.training, "load_teacher", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert set(statuses(run_pipeline(recipe)).values()) == {"up to date"}
    assert not loads  # a multi-GB teacher was loaded on every rerun, on every process
