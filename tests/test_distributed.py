"""Real 2-process runs on CPU through `accelerate launch` (gloo), compared with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.config import save_resolved_recipe
from distill.evaluation import evaluate_checkpoint
from distill.training import train
from helpers import onnx_teacher, tiny_recipe

# Exactly the README's command, through the `accelerate` console script of this environment: it
# imports timm (so torchvision) before distill, which the start-up hook `make` installs allows.
LAUNCH = [
    str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
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
from distill.launch import end_launched_process
from accelerate import PartialState
from distill.config import load_recipe
from distill.training import train

recipe = load_recipe(sys.argv[1])
result = train(recipe, "student")
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
rank = PartialState().process_index
with open(f"params_rank{rank}.txt", "w") as file:
    file.write(digest)
end_launched_process()  # as `distill` does: the interpreter's teardown can race gloo's threads
"""


def distil_in_two_processes(recipe, tmp_path) -> list[dict]:
    """Train the teacher here, distil the student in 2 processes; check both end with the same
    parameters and return the student's logged steps."""
    train(recipe, "teacher")
    path = save_resolved_recipe(recipe, tmp_path)
    (tmp_path / "run_distill.py").write_text(SCRIPT)
    launch(["run_distill.py", str(path)], tmp_path)
    digests = [(tmp_path / f"params_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_two_process_training_matches_one_process_at_the_same_global_batch(tmp_path):
    # Batch 2 on each of 2 processes vs batch 4 on one, same seed: the seedable sampler gives the
    # same shuffled order (process p takes the p-th half of each global batch) and augmentation
    # depends on (seed, epoch, index) only, so each step sees the same 4 samples, crops and flips.
    # Rescaled crops pad with void pixels, so the processes hold different numbers of labelled
    # pixels: the loss weights each process's mean by its share of them (DistillLoss `share`),
    # which makes the averaged gradients those of one mean over all 4 samples. What is left is
    # float32 summation order (the gloo all-reduce, convolutions over 2 vs 4 samples), amplified
    # a little by AdamW. (Without the share: 1.1e-2 max abs after these 12 steps.)
    # BatchNorm is kept out: it normalises by each process's 2 samples, not the 4, and
    # Accelerate does not convert it to SyncBatchNorm (0.037 in the weights, 0.09 in the running
    # variance with the default `tiny`); hence a model without BatchNorm.
    settings = {"model.factory": "helpers:tiny_without_batch_norm", "data.scale_range": "[0.6,1.25]"}
    single = train(tiny_recipe(tmp_path / "one", **settings, **{"data.batch_size": 4}), "student")
    two = tiny_recipe(tmp_path / "two", **settings, **{"data.batch_size": 2})
    launch(["-m", "distill", "train", str(save_resolved_recipe(two, tmp_path / "two"))], tmp_path)
    run = tmp_path / "two" / "student"
    progress = json.loads((run / "checkpoints" / "latest" / "progress.json").read_text())
    assert single.steps == progress["step"] == 12  # 24 images, 4 per step, 2 epochs
    ones = single.model.state_dict()
    twos = load_file(str(run / "last.safetensors"))
    assert ones.keys() == twos.keys()
    difference = max(float((ones[k] - twos[k]).abs().max()) for k in ones)
    assert difference < 1e-5, difference


def test_two_process_run_goes_through_every_stage(tmp_path):
    # `distill run` runs its stages in one process group: none may close it for the next (the
    # teacher's training once did, and the cache stage then failed with "Default process group
    # has not been initialized").
    recipe = tiny_recipe(tmp_path, teacher=True, **{"teacher.mode": "cache", "data.resize": "[32, 32]",
                                                    "train.epochs": 1, "run.baseline": "true"})
    result = launch(["-m", "distill", "run", str(save_resolved_recipe(recipe, tmp_path))], tmp_path)
    for stage in ("teacher", "baseline", "student"):
        assert (tmp_path / stage / "best.safetensors").is_file(), result.stdout[-2000:]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["complete"] is True
    comparison = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert {"teacher", "student", "baseline"} <= set(comparison["models"])
    assert (tmp_path / "export" / "student.onnx").stat().st_size > 0


def test_launcher_mismatch_is_detected(tmp_path, monkeypatch):
    import distill.launch as loop
    from distill.launch import make_accelerator

    class OneProcess:  # what each process sees when the launcher's group did not form
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(loop, "Accelerator", OneProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(loop.TrainingError, match="started 2 processes but they did not form one process group"):
        make_accelerator(tiny_recipe(tmp_path))


def test_two_process_distillation_on_mixed_batches(tmp_path):
    # Half the masks, the rest and 8 synthetic images unlabelled: mixed batches of 4 (2 labelled,
    # 2 unlabelled); 12 labelled images make a baseline's 3 batches, 1 step per epoch over 2
    # processes (the partial round dropped, as the baseline's), so 2 steps in 2 epochs.
    recipe = tiny_recipe(tmp_path, teacher=True, **{"train.epochs": 2, "data.labelled_fraction": 0.5,
                                                     "data.unlabelled": "[{synthetic: 8}]"})
    steps = distil_in_two_processes(recipe, tmp_path)
    assert [r["step"] for r in steps] == [2]
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in steps)


def test_two_process_feature_distillation(tmp_path):
    # The adapters are a second prepared module (DDP) beside the student: both processes step
    # them together, and the hooks read the features under the DDP wrapper.
    from test_features import smp_recipe

    # (distil_in_two_processes checks that both processes end with the same parameters.)
    recipe = smp_recipe(tmp_path, **{"loss.feature": "{kind: cwd, pairs: [[-1, -1], [decoder, decoder]]}"})
    steps = distil_in_two_processes(recipe, tmp_path)
    # 24 images, 4 per process and 2 processes: 3 optimizer steps, each one logged once.
    assert [r["step"] for r in steps] == [2, 3]
    assert all(r["feature"] > 0 and r["kd"] > 0 for r in steps)
    adapters = load_file(str(tmp_path / "student" / "checkpoints" / "latest" / "model_1.safetensors"))
    assert "adapters.1.0.weight" in adapters


def test_two_process_run_with_a_teacher_from_an_onnx_file(tmp_path):
    # A teacher the user already has: no teacher stage; both processes cache it through
    # onnxruntime, train the student on the store, and compare scores it beside the student.
    onnx_file = tmp_path / "teacher.onnx"
    onnx_teacher(onnx_file)
    recipe = tiny_recipe(tmp_path, teacher=True, **{
        "teacher.source": "onnx", "teacher.path": str(onnx_file), "teacher.mode": "cache", "data.resize": "[32, 32]",
        "train.epochs": 1, "export.formats": "[safetensors]"})
    result = launch(["-m", "distill", "run", str(save_resolved_recipe(recipe, tmp_path))], tmp_path)
    assert not (tmp_path / "teacher").exists(), result.stdout[-2000:]  # nothing to train
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["complete"] is True
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in records if "loss" in r)
    comparison = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert {"teacher", "student"} <= set(comparison["models"])
