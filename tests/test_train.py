"""The Accelerate loop: run folder contents, resume, distillation, errors (single process)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.config import recipe_to_yaml
from distill.evaluation import evaluate_checkpoint
from distill.teacher import Teacher
from distill.training import TrainingError, build_scheduler, train
from helpers import TinySegmenter, stopped_after_its_first_checkpoint, tiny_recipe


def test_run_folder_holds_recipe_metrics_and_weights(tmp_path):
    recipe = tiny_recipe(tmp_path)
    result = train(recipe, "student")
    run = tmp_path / "student"
    assert yaml.safe_load((run / "recipe.yaml").read_text()) == yaml.safe_load(recipe_to_yaml(recipe))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_miou" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]  # 24 images / batch 4 = 6 steps/epoch
    assert all(r["kd"] == 0.0 and r["loss"] == pytest.approx(r["ce"]) and r["images_per_s"] > 0 for r in steps)
    assert len(evals) == 2 and result.steps == 12
    best = json.loads((run / "best.json").read_text())
    assert best["miou"] == max(r["val_miou"] for r in evals) == result.best_miou
    # best.safetensors holds plain model weights that a fresh model loads, and its eval agrees.
    weights = load_file(str(run / "best.safetensors"))
    assert set(weights) == set(TinySegmenter(4).state_dict())
    scores, report = evaluate_checkpoint(recipe, "student")
    assert scores.miou == pytest.approx(best["miou"], abs=1e-12)
    assert json.loads(report.read_text())["miou"] == pytest.approx(best["miou"])


def test_resume_continues_to_the_same_final_state(tmp_path, monkeypatch):
    straight = train(tiny_recipe(tmp_path / "a"), "student")
    stopped_after_its_first_checkpoint(lambda: train(tiny_recipe(tmp_path / "b"), "student"), monkeypatch)
    checkpoint = tmp_path / "b" / "student" / "checkpoints" / "latest"
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == 6
    resumed = train(tiny_recipe(tmp_path / "b", **{"train.resume": str(checkpoint)}), "student")
    assert resumed.steps == straight.steps == 12
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_best_weights_written_after_the_resumed_checkpoint_are_replaced(tmp_path, monkeypatch):
    # The stopped run's best came after its checkpoint (its step says so) and beat the score the
    # checkpoint remembers: the replay may not retrace that trajectory, so the resumed run picks
    # its best afresh rather than keep weights its own metrics never show.
    stopped_after_its_first_checkpoint(lambda: train(tiny_recipe(tmp_path), "student"), monkeypatch)
    folder = tmp_path / "student"
    checkpoint = folder / "checkpoints" / "latest"
    progress = json.loads((checkpoint / "progress.json").read_text())
    (checkpoint / "progress.json").write_text(json.dumps({**progress, "best_miou": 1.0}))
    (folder / "best.json").write_text(json.dumps({"epoch": 2, "step": progress["step"] + 3, "miou": 1.0}))
    future = (folder / "best.safetensors").read_bytes() + b" "
    (folder / "best.safetensors").write_bytes(future)
    resumed = train(tiny_recipe(tmp_path, **{"train.resume": str(checkpoint)}), "student")
    record = json.loads((folder / "best.json").read_text())
    assert (folder / "best.safetensors").read_bytes() != future
    assert record["step"] == resumed.steps and record["miou"] == resumed.best_miou == resumed.final_miou


def test_non_finite_loss_stops_with_step_parts_and_indices(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"model.factory": "helpers:nan_model"})
    with pytest.raises(TrainingError, match=r"non-finite loss at optimizer step 1 \(loss=nan, ce=nan, kd=0 on process 0\); batch sample indices \[\d+, \d+, \d+, \d+\]"):
        train(recipe, "student")


def test_a_non_finite_loss_on_a_dataset_of_your_own_names_its_items(tmp_path):
    # (image, mask) pairs carry no index of their own: the loader gives each its place.
    pairs = [(torch.rand(3, 32, 32), torch.zeros(32, 32, dtype=torch.long)) for _ in range(4)]
    pairs[2] = (torch.full((3, 32, 32), float("nan")), pairs[2][1])
    recipe = tiny_recipe(tmp_path, **{"data.batch_size": 4})
    with pytest.raises(TrainingError, match=r"batch sample indices \[(\d+, ){3}\d+\]") as caught:
        train(recipe, "baseline", train_dataset=pairs, val_dataset=pairs)
    assert sorted(int(i) for i in str(caught.value).rsplit("[", 1)[1].split("]")[0].split(", ")) == [0, 1, 2, 3]


def test_a_subset_and_a_stream_of_your_own_train_and_score(tmp_path):
    # A Subset has its own __getitems__ (batched fetching); a stream has no length and no index.
    from torch.utils.data import IterableDataset, Subset

    pairs = [(torch.rand(3, 32, 32), torch.randint(0, 4, (32, 32))) for _ in range(12)]

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(pairs[8:])

    result = train(tiny_recipe(tmp_path, **{"data.batch_size": 4}), "baseline",
                   train_dataset=Subset(pairs, range(8)), val_dataset=Stream())
    assert result.steps == 2 * tiny_recipe(tmp_path).train.epochs and 0 <= result.final_miou <= 1


def test_a_non_finite_loss_on_another_process_stops_this_one():
    # Process 0's loss is finite, process 1's NaN. Reductions as Accelerate's: "max" takes the
    # maximum, every other word sums ("mean" then divides), so there is no "min".
    from distill.training import _check_finite

    class TwoProcesses:
        num_processes, process_index = 2, 0

        def reduce(self, tensor, reduction):
            # The other process's flag says the opposite of this one's, whichever way it is written.
            other = 1 - tensor
            total = torch.maximum(tensor, other) if reduction == "max" else tensor + other
            return total / 2 if reduction == "mean" else total

    parts = {"loss": torch.tensor(0.5), "ce": torch.tensor(0.5)}
    with pytest.raises(TrainingError, match=r"non-finite loss at optimizer step 3 \(loss=0.5, ce=0.5 on process 0\)"):
        _check_finite(parts, 3, {"index": torch.tensor([0, 1])}, TwoProcesses())


def test_distillation_uses_a_frozen_teacher_and_saves_only_the_student(tmp_path):
    recipe = tiny_recipe(tmp_path, teacher=True)
    teacher_run = train(recipe, "teacher")
    teacher_weights = load_file(str(teacher_run.run_dir / "best.safetensors"))
    result = train(recipe, "student")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["kd"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["ce"] + r["kd"], rel=1e-5) for r in steps)
    student = load_file(str(result.run_dir / "best.safetensors"))
    assert set(student) == set(TinySegmenter(4, 6).state_dict())  # no teacher keys, no prefixes
    assert student["body.0.weight"].shape[0] == 6
    # The teacher's weights on disk are untouched by the student's training.
    after = load_file(str(teacher_run.run_dir / "best.safetensors"))
    assert all(torch.equal(teacher_weights[k], after[k]) for k in teacher_weights)


def test_missing_teacher_weights_is_a_clear_error(tmp_path):
    from distill.models import ModelError

    with pytest.raises(ModelError, match=r"Train it first with `distill train RECIPE --stage teacher`"):
        train(tiny_recipe(tmp_path, teacher=True), "student")


def test_teacher_stays_frozen_in_eval_and_renormalizes():
    model = TinySegmenter(3)
    teacher = Teacher(model, data_mean=(0.5, 0.5, 0.5), data_std=(0.25, 0.25, 0.25),
                      teacher_mean=(0.0, 0.0, 0.0), teacher_std=(1.0, 1.0, 1.0))
    parent = torch.nn.ModuleDict({"teacher": teacher}).train()
    assert parent.training and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.randn(2, 3, 32, 32)
    logits = teacher({"image": images})
    assert not logits.requires_grad
    raw = images * 0.25 + 0.5  # what the teacher must see: its own normalization of the raw image
    assert torch.allclose(logits, model(raw), atol=1e-6)
    assert teacher.state_dict().keys() == {f"model.{k}" for k in model.state_dict()}


def test_scheduler_warms_up_then_decays_to_zero(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.warmup_steps": 4, "train.scheduler": "cosine"})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, recipe, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0) and rates[-1] < 0.01
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    # It was read after the scheduler stepped: the next step's rate, and 0 for the last step.
    import json

    recipe = tiny_recipe(tmp_path, **{"train.warmup_steps": 4, "train.epochs": 1, "train.log_every_steps": 1})
    train(recipe, "student")
    logged = [r["lr"] for r in map(json.loads, (tmp_path / "student" / "metrics.jsonl").read_text().splitlines())
              if "lr" in r]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr)
    scheduler = build_scheduler(optimizer, recipe, total_steps=len(logged))
    used = []
    for _ in logged:  # an independent run of the same schedule
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert logged == pytest.approx(used) and logged[0] == pytest.approx(recipe.train.lr / 4) and logged[-1] > 0


def test_fp16_on_cpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    with pytest.raises(TrainingError, match="fp16' needs a GPU; use 'bf16'"):
        train(tiny_recipe(tmp_path, **{"train.mixed_precision": "fp16"}), "student")


def test_bf16_autocast_trains(tmp_path):
    result = train(tiny_recipe(tmp_path, teacher=False, **{"train.mixed_precision": "bf16", "train.epochs": 1}), "student")
    assert result.steps == 6 and result.best_miou == result.best_miou  # finite, not NaN


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    result = train(tiny_recipe(tmp_path, **{"train.epochs": 1, "train.trackers": "[tensorboard]"}), "student")
    events = list(result.run_dir.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss", "ce", "lr", "val_miou"} <= set(accumulator.Tags()["scalars"])


def _tensorboard_scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for run in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(e.step, round(e.value, 6)) for e in accumulator.Scalars(tag)]
    return sorted(values)


def test_tensorboard_logs_hold_one_run_after_a_rerun_and_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import distill.training

    common = {"train.epochs": 2, "train.trackers": "[tensorboard]", "train.log_every_steps": 1}
    train(tiny_recipe(tmp_path, **common), "student")
    result = train(tiny_recipe(tmp_path, **common, **{"train.lr": 0.05}), "student")  # a new run, same folder
    logged = [(r["step"], round(r["lr"], 6)) for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if "lr" in r]
    assert _tensorboard_scalars(result.run_dir, "lr") == logged  # not the first run's 12 values too
    # Stopped at the end of its second epoch (steps 7-12 logged, the checkpoint still the first
    # epoch's), then resumed: steps 7-12 are logged again, and each step is there once.
    real = distill.training._validate_and_checkpoint

    def stop_after_the_first(run, state, epoch, *args):
        if epoch == 1:
            raise RuntimeError("stopped")
        real(run, state, epoch, *args)

    monkeypatch.setattr(distill.training, "_validate_and_checkpoint", stop_after_the_first)
    with pytest.raises(RuntimeError, match="stopped"):
        train(tiny_recipe(tmp_path / "b", **common), "student")
    monkeypatch.setattr(distill.training, "_validate_and_checkpoint", real)
    run_dir = tmp_path / "b" / "student"
    train(tiny_recipe(tmp_path / "b", **common, **{"train.resume": str(run_dir)}), "student")
    steps = [step for step, _ in _tensorboard_scalars(run_dir, "lr")]
    assert steps == list(range(1, 13))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    result = train(tiny_recipe(tmp_path, **{"train.epochs": 1, "train.grad_accum_steps": 2,
                                            "train.log_every_steps": 1}), "student")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 3  # 6 micro-batches, 2 per optimizer step
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_gradient_accumulation_logs_the_mean_of_the_steps_micro_batches(tmp_path, monkeypatch):
    import distill.training

    real, seen = distill.training.distillation_step, []

    def recorded(*args, **kwargs):
        parts = real(*args, **kwargs)
        seen.append(float(parts["ce"]))
        return parts

    monkeypatch.setattr(distill.training, "distillation_step", recorded)
    result = train(tiny_recipe(tmp_path, **{"train.epochs": 1, "train.grad_accum_steps": 2,
                                            "train.log_every_steps": 1}), "student")
    logged = [json.loads(line)["ce"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"ce"' in line]
    assert len(seen) == 6 and seen[0] != seen[1]  # micro-batches of different losses
    assert logged == pytest.approx([(seen[i] + seen[i + 1]) / 2 for i in (0, 2, 4)], rel=1e-6)


def test_split_smaller_than_a_batch_is_a_clear_error(tmp_path):
    from distill.data import DataError

    with pytest.raises((TrainingError, DataError), match=r"(?i)batch"):
        train(tiny_recipe(tmp_path, **{"data.synthetic.num_train": 3}), "student")


def test_eval_of_an_external_teacher_uses_its_normalization(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)  # random weights: varied predictions (a briefly trained one is all background)
    save_file(TinySegmenter(4, 12).state_dict(), str(tmp_path / "teacher.safetensors"))
    given = {"teacher.checkpoint": str(tmp_path / "teacher.safetensors")}

    def teacher_scores(folder: str, **overrides: str):
        return evaluate_checkpoint(tiny_recipe(tmp_path / folder, teacher=True, **given, **overrides),
                                   "teacher")[0].confusion

    # A teacher that wants raw pixels (mean 0, std 1) sees exactly what it sees when the data
    # itself is left raw; without the mapping it would see ImageNet-normalized pixels.
    external = teacher_scores("a", **{"teacher.mean": "[0, 0, 0]", "teacher.std": "[1, 1, 1]"})
    raw_data = teacher_scores("b", **{"data.mean": "[0, 0, 0]", "data.std": "[1, 1, 1]"})
    assert torch.equal(external, raw_data)
    assert not torch.equal(external, teacher_scores("c"))  # the mapping changed the predictions


def test_compiled_teacher_matches_eager_and_keeps_its_keys(monkeypatch):
    # Dynamo traces the teacher as under the default backend; aot_eager skips inductor's C++
    # build of the kernels (a minute on 2 cores), which says nothing of distill.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **kwargs: compile_module(self, *args, **{**kwargs, "backend": "aot_eager"}))
    torch.manual_seed(0)
    model = TinySegmenter(4, 12)
    copy = TinySegmenter(4, 12)
    copy.load_state_dict(model.state_dict())
    eager, compiled = Teacher(model), Teacher(copy, compile=True)  # compiles at the first call
    batch = {"image": torch.randn(2, 3, 40, 40)}  # not a multiple of 32: the padded path
    assert torch.allclose(compiled(batch), eager(batch), atol=1e-5)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert not compiled.model.training  # still frozen in eval


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    from distill.run_folder import FolderBusyError, exclusive_folder

    recipe = tiny_recipe(tmp_path)
    with exclusive_folder(tmp_path / "student"):  # another run holds the stage folder
        with pytest.raises(FolderBusyError, match=r"'.*student' is being written by another run \(pid \d+ on "):
            train(recipe, "student")
        assert not (tmp_path / "student" / "metrics.jsonl").exists()
    train(recipe, "student")  # released: the next run goes ahead
    assert not (tmp_path / ".student.lock.json").exists()


def test_a_refused_run_leaves_the_finished_run_as_it_was(tmp_path):
    from distill.data import DataError

    train(tiny_recipe(tmp_path), "student")
    before = {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir() if p.is_file()}
    with pytest.raises(DataError, match="fewer than data.batch_size 1000"):
        train(tiny_recipe(tmp_path, **{"data.batch_size": 1000}), "student")
    after = {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir() if p.is_file()}
    assert after == before  # recipe.yaml still describes the weights beside it


def test_warmup_beyond_the_run_and_missing_trackers_are_refused_before_any_write(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(TrainingError, match=r"train.warmup_steps 50 is not below the run's 12 optimizer steps"):
        train(tiny_recipe(tmp_path, **{"train.warmup_steps": 50}), "student")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb",) else real_find_spec(name, *a))
    with pytest.raises(TrainingError, match=r"train.trackers: 'wandb' is not installed"):
        train(tiny_recipe(tmp_path, **{"train.trackers": "[wandb]"}), "student")
    assert not (tmp_path / "student" / "recipe.yaml").exists()


def test_resume_with_other_settings_names_each_change(tmp_path):
    train(tiny_recipe(tmp_path), "student")
    checkpoint = str(tmp_path / "student" / "checkpoints" / "latest")
    changed = tiny_recipe(tmp_path / "b", **{"train.resume": checkpoint, "data.batch_size": 2, "train.epochs": 3})
    with pytest.raises(TrainingError) as caught:
        train(changed, "student")
    message = str(caught.value)
    assert "was made with other settings" in message
    assert "data.batch_size: checkpoint 4, now 2" in message and "train.epochs: checkpoint 2, now 3" in message
    assert "steps per epoch: checkpoint 6, now 12" in message


def test_resume_of_another_architecture_is_a_clear_error(tmp_path):
    train(tiny_recipe(tmp_path), "student")
    progress_file = tmp_path / "student" / "checkpoints" / "latest" / "progress.json"
    progress = json.loads(progress_file.read_text())
    progress.pop("made_from")  # as a checkpoint of an older distill: only the weights can tell
    progress_file.write_text(json.dumps(progress))
    wider = tiny_recipe(tmp_path / "b", **{"train.resume": str(progress_file.parent),
                                            "model.factory_kwargs": "{width: 16}"})
    with pytest.raises(TrainingError, match="holds weights of another model"):
        train(wider, "student")


def test_crops_larger_than_the_frame_are_warned_about(tmp_path, capfd):
    train(tiny_recipe(tmp_path, **{"data.resize": "[16, 16]", "data.scale_range": "[1.0, 1.0]",
                                    "data.crop_size": "[32, 32]", "train.epochs": 1}), "student")
    err = " ".join(capfd.readouterr().err.split())
    assert "data.crop_size [32, 32] is larger than the frame at its largest scale ([16, 16]" in err


def test_a_refused_run_creates_no_stage_folder(tmp_path):
    from distill.data import DataError

    with pytest.raises(DataError):
        train(tiny_recipe(tmp_path, **{"data.batch_size": 1000}), "student")
    assert not (tmp_path / "student").exists()
