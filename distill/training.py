"""One Accelerate training loop, for a model alone and for distillation into a student.

The shape follows Accelerate's ``complete_cv_example.py``: build, ``prepare``, loop, evaluate,
``save_state``. Only the student, its optimizer and its loaders are prepared; the teacher is a
frozen module moved to the device (see ``distill.teacher``).

Stages and their folders under ``recipe.output_dir``:

- ``teacher``: the teacher's architecture trained alone (CE only);
- ``baseline``: the student trained alone (CE only), the reference distillation must beat;
- ``student``: the student, distilled from the teacher when the recipe has one.

Each stage folder holds ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``best.safetensors`` and
``last.safetensors`` (model weights only), ``best.json`` and ``checkpoints/latest`` (the full
``save_state``, for ``train.resume``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from accelerate import Accelerator
from accelerate.utils import set_seed

from distill._checkpoint import flat_config, made_from, resume_from, save_checkpoint, save_weights
from distill._malloc import tune_cpu_malloc
from distill.data.mixing import cutmix
from distill.config import Recipe, atomic_write_text, save_resolved_recipe
from distill.cache import load_cached_teacher
from distill.data import build_loader, dataset_info, loader_for_dataset
from distill.launch import TrainingError, make_accelerator
from distill.losses import DistillLoss
from distill.evaluation import evaluate_model
from distill.losses.features import FeatureDistillation, FeatureError
from distill.models import STAGES, Stage, build_model, check_class_count, forward_padded, stage_model
from distill.preflight import check_inputs
from distill.progress import console, make_progress, report
from distill.run_folder import StageFiles, exclusive_folder, stage_dir
from distill.teacher import Teacher, load_teacher, refuse_unmapped_count
from distill.teacher.sources import class_map_matrix

def build_optimizer(model: torch.nn.Module, recipe: Recipe, *more: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters (of ``model`` and ``more``, such as the feature
    adapters), as the recipe's ``train`` section says."""
    cfg = recipe.train
    params = [p for m in (model, *more) for p in m.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then poly or cosine decay to 0 at ``total_steps`` (optimizer steps)."""
    cfg = recipe.train

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.scheduler == "poly":
            return (1.0 - progress) ** cfg.poly_power
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StoppedBeforeCheckpoint(KeyboardInterrupt):
    """Ctrl-C before a run from the start saved its first checkpoint, or before its first
    validation when it set an earlier run aside (then dropped with the earlier run's return):
    there is nothing of it to resume. ``earlier_run_restored``: the folder's earlier run, set
    aside, is back as it was."""

    def __init__(self, earlier_run_restored: bool = False) -> None:
        super().__init__(earlier_run_restored)  # in args too: the exception pickles whole
        self.earlier_run_restored = earlier_run_restored


class StoppedWithCheckpoint(KeyboardInterrupt):
    """Ctrl-C once the run has a whole checkpoint in ``resume_folder``: ``train.resume`` of
    that folder carries on (the CLI prints the command)."""

    def __init__(self, resume_folder: str) -> None:
        super().__init__(resume_folder)  # in args too: the exception pickles whole
        self.resume_folder = resume_folder


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    best_miou: float
    final_miou: float
    steps: int
    model: torch.nn.Module  # the trained model, unwrapped (no DDP prefix)


@dataclass
class _Run:
    """Everything one training run is made of, built and checked before it writes anything."""

    recipe: Recipe
    stage: Stage
    dir: Path
    accelerator: Accelerator
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    features: torch.nn.Module | None
    criterion: DistillLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    num_classes: int
    ignore_index: int
    total_steps: int
    teacher_module: bool  # the caller's own teacher, not the recipe's
    started: bool = False  # has the run written its folder yet (see _start_writing)
    validated: bool = False  # has it read the validation split once (see _drop_earlier_run)
    val_given: bool = False  # a val_dataset of the caller's, not data.val_split
    checkpointed: bool = False  # has it saved a checkpoint that train.resume can continue

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def trained(self) -> tuple[torch.nn.Module, ...]:
        return (self.model,) if self.features is None else (self.model, self.features)

    @property
    def files(self) -> StageFiles:
        return StageFiles(self.dir)

    @property
    def resumes_own_run(self) -> bool:
        """``train.resume`` is this stage folder's own checkpoint, whose records it continues (a
        checkpoint from elsewhere starts this folder's records anew)."""
        return _resumes_folder(self.recipe.train.resume, self.dir)

    @property
    def log_path(self) -> Path:
        return self.files.metrics


def _resumes_folder(resume: Path | str | None, folder: Path) -> bool:
    """Whether ``train.resume`` is ``folder`` or a checkpoint inside it."""
    if resume is None:
        return False
    here, there = folder.resolve(), Path(resume).resolve()
    return there == here or here in there.parents


def train(
    recipe: Recipe,
    stage: Stage = "student",
    *,
    teacher: torch.nn.Module | None = None,
    student: torch.nn.Module | None = None,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    fingerprint: str | None = None,
) -> TrainResult:
    """Train the stage's model (distilling when ``stage == 'student'`` and there is a teacher).

    Nothing in the stage folder changes until the first optimizer step has run: a run refused
    for its settings, its data, its weights or a checkpoint it cannot resume leaves the folder
    (a finished run's included) as it was. Python's, numpy's and torch's random generators are
    seeded with ``train.seed`` (Accelerate's ``set_seed``), so that a run can be repeated.

    Args:
        recipe: the settings (:func:`load_recipe`, :func:`recipe_from_dict`).
        stage: ``teacher``, ``baseline`` (the student, CE only) or ``student``.
        teacher: a model of your own to distil from (normalised images -> logits), in place of
            the recipe's ``teacher`` section; it is frozen and run on every batch (its mode,
            ``requires_grad`` flags and device are given back afterwards).
        student: the model to train, in place of the recipe's ``student`` (or ``model``).
        train_dataset, val_dataset: datasets in place of ``data.train_split``/``val_split``;
            items are ``(image, mask)`` pairs or dicts (see :func:`distill.data.loader_for_dataset`).
        fingerprint: what the stage is made from (see ``distill.pipeline``), stored with each
            checkpoint so that ``distill run`` resumes only a checkpoint of the same inputs.
    """
    if stage not in STAGES:  # it names the stage folder, and only "student" distils
        raise TrainingError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    if teacher is not None and stage != "student":
        raise TrainingError(f"a teacher module distils into the student; stage '{stage}' trains alone")
    source = recipe.teacher.source if stage == "teacher" and recipe.teacher is not None else "smp"
    if source not in ("smp", "factory") and student is None:
        given = f"teacher.path ('{recipe.teacher.path}')" if recipe.teacher.path else "teacher.checkpoint"
        raise TrainingError(f"teacher.source '{source}': the teacher is the model {given} gives, which the "
                            "teacher stage does not train (it trains teachers of source smp or factory)")
    cached = stage == "student" and teacher is None and recipe.distills and recipe.teacher.mode == "cache"
    if train_dataset is not None and cached:
        raise TrainingError("teacher.mode 'cache' serves the stored maps of data.train_split's images "
                            "only, not those of a train_dataset of your own: set teacher.mode: stream "
                            "(or pass teacher=) to distil on it")
    recipe = stage_recipe(recipe, stage)
    if train_dataset is None and val_dataset is None:  # the recipe's data: check it with the rest
        check_inputs(recipe, stage, needs_teacher_weights=teacher is None)
    _check_trackers(recipe.train.trackers)
    if recipe.train.cpu_malloc_tuning and not torch.cuda.is_available():
        tune_cpu_malloc()  # before the first large allocation; see distill/_malloc.py
    run_dir = stage_dir(recipe, stage)
    accelerator = make_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed)
    # One writer per stage folder, from before its first write to the end of the run.
    with exclusive_folder(run_dir, accelerator), _given_back(teacher):
        # A run killed before its first validation hid the last finished one; unless this run
        # resumes that killed run's own checkpoint, the finished one comes back.
        if accelerator.is_main_process and not _resumes_folder(recipe.train.resume, run_dir):
            StageFiles(run_dir).recover_killed_run()
        accelerator.wait_for_everyone()
        try:
            run = _set_up(recipe, stage, run_dir, accelerator, teacher=teacher, student=student,
                          train_dataset=train_dataset, val_dataset=val_dataset)
            state = _initial_state(run, fingerprint)
        except KeyboardInterrupt:
            if recipe.train.resume is None:  # a fresh run has written nothing yet: nothing to resume
                raise StoppedBeforeCheckpoint(False) from None
            raise StoppedWithCheckpoint(str(recipe.train.resume)) from None  # untouched: resume it again
        cfg = recipe.train
        try:
            with make_progress(enabled=run.main) as progress:
                bars = (progress.add_task(f"{stage} epochs", total=cfg.epochs, completed=state["epoch"], info=""),
                        progress.add_task("steps", total=len(run.train_loader), info=""))
                for epoch in range(state["epoch"], cfg.epochs):
                    if state["step"] >= run.total_steps:
                        break
                    _train_one_epoch(run, state, epoch, progress, bars[1])
                    _validate_and_checkpoint(run, state, epoch, progress, bars[0])
                    progress.advance(bars[0])
        except BaseException as error:
            restored = False
            if run.main and not run.resumes_own_run:  # not validated yet: the earlier run returns
                restored = run.files.set_aside.is_dir()
                run.files.restore_set_aside()
            if isinstance(error, KeyboardInterrupt):
                # Whether there is a checkpoint of this run to resume decides the CLI's advice.
                if run.resumes_own_run or (run.checkpointed and not restored):
                    raise StoppedWithCheckpoint(str(run.dir)) from None
                raise StoppedBeforeCheckpoint(restored) from None
            raise
        finally:
            if run.features is not None:  # the hooks on the student's and teacher's layers go
                accelerator.unwrap_model(run.features).remove_hooks()
        # Not accelerator.end_training(): it also destroys the process group, which the next stage
        # of `distill run` in this process still needs. The CLI closes the group once, at exit.
        for tracker in accelerator.trackers:
            tracker.finish()
        return TrainResult(run_dir, state["best_miou"], state["last_miou"], state["step"],
                           _released(accelerator, run.model))


def _released(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The trained module as a plain one: no DDP wrapper, no autocast wrapper on its forward and
    no mark of having been prepared (a later ``train(student=...)`` would skip preparing it)."""
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    forward = vars(model).get("forward")
    if getattr(forward, "__func__", None) is type(model).forward:
        del model.forward  # the class's own, bound again by unwrap_model
    vars(model).pop("_is_accelerate_prepared", None)
    return model


@contextlib.contextmanager
def _given_back(module: torch.nn.Module | None) -> Iterator[None]:
    """A teacher module of the caller's is frozen, put in eval mode and moved to the device for
    the run; afterwards its mode, ``requires_grad`` flags and device are as the caller left them."""
    if module is None or isinstance(module, Teacher):  # a Teacher is distill's own wrapper
        yield
        return
    training, grads = module.training, [p.requires_grad for p in module.parameters()]
    device = next((p.device for p in module.parameters()), None)
    contiguous = all(p.is_contiguous() for p in module.parameters())  # train.channels_last converts it
    try:
        yield
    finally:
        module.train(training)
        for parameter, flag in zip(module.parameters(), grads):
            parameter.requires_grad_(flag)
        if device is not None:
            module.to(device)
        if contiguous:
            module.to(memory_format=torch.contiguous_format)


def stage_recipe(recipe: Recipe, stage: Stage) -> Recipe:
    """The recipe a stage trains with: the teacher its own schedule and every mask (the
    few-labels switch is the students')."""
    if stage != "teacher":
        return recipe
    data = recipe.data.model_copy(update={"labelled_fraction": 1.0})
    return recipe.model_copy(update={"train": recipe.teacher_schedule(), "teacher_train": {}, "data": data})


def _set_up(recipe: Recipe, stage: Stage, run_dir: Path, accelerator: Accelerator, *,
            teacher: torch.nn.Module | None, student: torch.nn.Module | None,
            train_dataset: Dataset | None, val_dataset: Dataset | None) -> _Run:
    """Build the model, its teacher, the loss, the loaders and the optimizer; check the schedule."""
    cfg = recipe.train
    info = dataset_info(recipe.data)
    caller_teacher = teacher is not None
    size = recipe.data.crop_size or recipe.data.resize  # what the models will see
    if student is not None:  # (a teacher of another count is refused by the loss, naming both)
        check_class_count(student, info.num_classes, "the student given to train()", size)
    model = student if student is not None else build_model(stage_model(recipe, stage), info.num_classes)
    if accelerator.num_processes > 1:
        _freeze_unreached(model)
    # The teacher serves targets for a batch: a module of the caller's, the recipe's model run on
    # every batch, or its logits replayed from the cache; the loop never asks which.
    if teacher is not None:
        teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher, channels_last=cfg.channels_last)
    elif stage == "student" and recipe.distills:
        if recipe.teacher.mode == "cache":
            teacher = load_cached_teacher(recipe, info.num_classes)
        else:
            teacher = load_teacher(recipe, info.num_classes)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    features = None  # the feature term's adapters, trained beside the student, never saved with it
    if teacher is not None and recipe.loss.feature.kind != "none":
        features = feature_distillation(recipe, model, teacher, info.ignore_index)

    if train_dataset is not None:
        train_loader = loader_for_dataset(train_dataset, recipe.data, train=True, seed=cfg.seed)
    else:
        # Images without masks teach through the teacher alone: only a distilled student sees them.
        train_loader = build_loader(recipe.data, recipe.data.train_split, train=True, seed=cfg.seed,
                                    unlabelled=teacher is not None)
    if val_dataset is not None:
        val_loader = loader_for_dataset(val_dataset, recipe.data, train=False, seed=cfg.seed)
    else:
        val_loader = build_loader(recipe.data, recipe.data.val_split, train=False, seed=cfg.seed,
                                  label_resolution=recipe.eval.resolution == "label")
    optimizer = build_optimizer(model, recipe, *([features] if features is not None else []))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if features is not None:  # prepared (DDP, device) and so in save_state's checkpoint too
        features = accelerator.prepare(features)
    if accelerator.num_processes > 1:
        # Each replica its own dropout and drop-path masks: under one seed every process drew the
        # same. The data order (the sampler's seed, taken in prepare) and augmentation
        # ((seed, epoch, index)) do not use this generator; save_state keeps it per process.
        torch.manual_seed(cfg.seed + accelerator.process_index)
    if teacher is not None:
        criterion = DistillLoss.from_config(recipe.loss, ignore_index=info.ignore_index, features=features)
    else:  # plain training: CE at weight 1 (the recipe's weights are the distillation's balance)
        criterion = DistillLoss(ce_weight=1.0, kd_weight=0.0, ignore_index=info.ignore_index,
                                class_weights=recipe.loss.class_weights)
    total_steps = schedule_steps(recipe, len(train_loader), len(train_loader.dataset), accelerator.num_processes,
                                 "the train_dataset given" if train_dataset is not None else None)
    # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would
    # step it once per process), and registered so that save_state/load_state include it.
    scheduler = build_scheduler(optimizer, recipe, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    return _Run(recipe, stage, run_dir, accelerator, model, teacher, features, criterion, optimizer,
                scheduler, train_loader, val_loader, info.num_classes, info.ignore_index, total_steps,
                teacher_module=caller_teacher, val_given=val_dataset is not None)


def schedule_steps(recipe: Recipe, batches: int, images: int, num_processes: int,
                   source: str | None = None) -> int:
    """The run's optimizer steps from its training batches per process, or a TrainingError when
    they make no schedule (no batch at all, or a warm-up that never ends). ``source``: what the
    images are, when not ``data.train_split`` (a dataset of the caller's)."""
    cfg = recipe.train
    if batches == 0:
        raise TrainingError(
            f"no training batch: {images} images in {source or f'split {recipe.data.train_split!r}'} do not fill "
            f"one batch of {recipe.data.batch_size} on each of {num_processes} processes (lower data.batch_size)"
        )
    total_steps = min(cfg.max_steps or math.inf, steps_per_epoch(batches, cfg.grad_accum_steps) * cfg.epochs)
    if cfg.warmup_steps >= total_steps:
        raise TrainingError(
            f"train.warmup_steps {cfg.warmup_steps} is not below the run's {int(total_steps)} "
            "optimizer steps: the learning rate would never leave its warm-up"
        )
    return int(total_steps)


def check_schedule(recipe: Recipe, stage: Stage, num_processes: int = 1) -> None:
    """The set-up refusals of a stage that need no model: its training data fill a batch and its
    warm-up ends before the run does. ``distill run`` asks this of every stage before the first
    one writes, so that a later stage's refusal cannot come after an earlier one was redone.

    Raises:
        DataError, TrainingError: naming the setting to change.
    """
    recipe = stage_recipe(recipe, stage)
    loader = build_loader(recipe.data, recipe.data.train_split, train=True, seed=recipe.train.seed,
                          unlabelled=stage == "student" and recipe.distills)
    # Each process's share as Accelerate shards the batches: a sampler that drops the last partial
    # batch drops the last partial round too; others have it padded to a full round.
    drops = getattr(loader.batch_sampler, "drop_last", False)
    share = len(loader) // num_processes if drops else math.ceil(len(loader) / num_processes)
    schedule_steps(recipe, share, len(loader.dataset), num_processes)


def check_models(recipe: Recipe, stage: Stage) -> None:
    """The set-up refusals that need the stage's models, built without their weights: an unknown
    encoder, architecture or factory, a class map naming a class the models lack, a feature pair
    a model does not have. ``distill run`` asks this of every training stage before the first one
    writes (a misspelt student encoder must not be found after the teacher was retrained).

    Raises:
        ModelError, TrainingError: naming the setting to change.
    """
    info = dataset_info(recipe.data)
    unweighted = {"encoder_weights": None, "checkpoint": None}  # nothing read or downloaded
    model = build_model(stage_model(recipe, stage).model_copy(update=unweighted), info.num_classes)
    spec = recipe.teacher
    if stage != "student" or not recipe.distills:
        return
    features = recipe.loss.feature.kind != "none" and spec.mode == "stream"
    if spec.source not in ("smp", "factory"):
        # A teacher given by a path (hub, transformers, ONNX, torchvision) is known only once
        # loaded: its class names and count come from the file. A cached run's cache stage loads
        # it before any student trains; a streamed one would first meet it after the baseline.
        if spec.mode == "stream":
            teacher = load_teacher(recipe, info.num_classes)  # refuses a class map it does not fit
            if features:
                feature_distillation(recipe, model, teacher, info.ignore_index)
        return
    teacher_classes = len(spec.class_names) if spec.class_names else info.num_classes
    if spec.class_map is None:  # as teacher_from_recipe refuses it, before the baseline trains
        refuse_unmapped_count(teacher_classes, info.num_classes, counted_by="teacher.class_names")
    if spec.class_map is not None:
        names = spec.class_names or [str(k) for k in range(teacher_classes)]
        class_map_matrix(spec.class_map, names, info.class_names)
    if features:
        teacher = Teacher(build_model(spec.model_copy(update=unweighted), teacher_classes))
        feature_distillation(recipe, model, teacher, info.ignore_index)  # the run's own check


def steps_per_epoch(micro_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in an epoch: its last step takes the micro-batches that are left."""
    return math.ceil(micro_batches / grad_accum_steps)


def _initial_state(run: _Run, fingerprint: str | None) -> dict:
    """A fresh run's progress, or a checkpoint's (refused when made from other settings)."""
    cfg = run.recipe.train
    inputs = made_from(run.recipe, run.stage, steps_per_epoch(len(run.train_loader), cfg.grad_accum_steps),
                       len(run.train_loader.dataset), run.accelerator.num_processes,
                       teacher_module=run.teacher_module)
    state = {"epoch": 0, "step": 0, "best_miou": -1.0, "last_miou": float("nan"),
             "fingerprint": fingerprint, "made_from": inputs}
    if cfg.resume is not None:
        state = resume_from(run.accelerator, Path(cfg.resume), inputs)
        if not run.resumes_own_run and state["step"] >= run.total_steps:
            # Nothing would be trained or written: the folder would not hold what is reported.
            raise TrainingError(f"train.resume '{cfg.resume}' is a finished run (step {state['step']} "
                                f"of {run.total_steps}): nothing is left to train into {run.dir}")
        if not run.resumes_own_run or _best_after(run.files.best_record, state["step"]):
            # This folder's best weights are those it will write: another run's, or those the
            # stopped run wrote after its checkpoint (a trajectory the replay may not retrace),
            # which replaced the best the checkpoint's score belongs to (dropped in _start_writing).
            state["best_miou"] = -1.0
        if run.main:
            console.print(f"resumed from {cfg.resume} at epoch {state['epoch']}, step {state['step']}")
    return state


def _best_after(record: Path, step: int) -> bool:
    """Whether ``best.json`` says the best weights were written after optimizer step ``step``."""
    try:
        return int(json.loads(record.read_text())["step"]) > step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _start_writing(run: _Run, state: dict) -> None:
    """The run's first writes, once its first optimizer step has run: everything it is made of
    was built, read and used, so a refusal can no longer come from its inputs.

    A run resumed from its own folder's checkpoint keeps its ``metrics.jsonl`` up to the
    checkpoint (later lines are logged again); any other run begins a new one, and sets aside
    the weights, records and checkpoints of an earlier run in the folder (dropped once it writes
    weights of its own), so that the folder never mixes two runs.
    """
    run.started = True
    if run.main and not run.resumes_own_run:
        # The earlier run's checkpoint goes too: resumed after this run stops before its own
        # first one, it would bring back that run's epoch, step and best score without its
        # weights; and its tracker logs, before this run's trackers open theirs. Set aside, not
        # deleted, until this run writes weights of its own: bad data read after the first step
        # (a later batch, the validation split) must not cost the earlier run (see train()).
        run.files.set_aside_earlier_run()
    if run.recipe.train.trackers:
        # A resumed run logs again from the step after its checkpoint: TensorBoard drops what
        # the stopped run logged from there, so no step has two values.
        purge = {"tensorboard": {"purge_step": state["step"]}} if run.resumes_own_run else {}
        run.accelerator.init_trackers(run.files.tracker_logs.name, init_kwargs=purge,
                                      config=flat_config(json.loads(run.recipe.model_dump_json())))
    if not run.main:
        return
    _warn_about_padding(run.recipe)
    run.dir.mkdir(parents=True, exist_ok=True)
    if run.resumes_own_run:
        if _best_after(run.files.best_record, state["step"]):
            for path in (run.files.best, run.files.best_record):
                path.unlink(missing_ok=True)
            run.files.drop_reports_of(run.files.best)
        if run.log_path.is_file():
            kept = [line for line in run.log_path.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and json.loads(line)["step"] < state["step"]]
            atomic_write_text(run.log_path, "".join(kept))
    else:
        atomic_write_text(run.log_path, "")
    save_resolved_recipe(run.recipe, run.dir)


def _train_one_epoch(run: _Run, state: dict, epoch: int, progress, steps_bar) -> None:
    """One pass over the training loader: a distillation step per micro-batch, an optimizer
    step per ``grad_accum_steps`` of them, a metrics line every ``log_every_steps``."""
    cfg, accelerator, loader = run.recipe.train, run.accelerator, run.train_loader
    loader.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):  # distill's datasets: augmentation epoch
        loader.dataset.set_epoch(epoch)
    for module in run.trained:
        module.train()
    progress.reset(steps_bar, total=len(loader))
    window_start, window_images = time.perf_counter(), 0
    group_sums, group_size = {}, 0  # the loss parts of the optimizer step's micro-batches
    for number, batch in enumerate(loader):
        if run.recipe.data.cutmix > 0:  # on the device batch; the streamed teacher sees it mixed
            batch = cutmix(batch, run.recipe.data.cutmix,
                           _batch_generator(cfg.seed, accelerator.process_index, epoch, number))
        with accelerator.accumulate(*run.trained):
            parts = distillation_step(batch, run.model, run.teacher, run.criterion, accelerator, cfg.channels_last)
            _check_finite(parts, state["step"] + 1, batch, accelerator)  # counted from 1, as metrics.jsonl
            # Accelerate divides every micro-batch's loss by grad_accum_steps; the epoch's last
            # group may hold fewer micro-batches, whose mean needs the rest of that factor.
            group = min(cfg.grad_accum_steps, len(loader) - number // cfg.grad_accum_steps * cfg.grad_accum_steps)
            accelerator.backward(parts["loss"] * (cfg.grad_accum_steps / group))
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_([p for m in run.trained for p in m.parameters()], cfg.max_grad_norm)
            step_lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses (logged below)
            run.optimizer.step()
            if accelerator.sync_gradients:
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        group_sums = {k: group_sums.get(k, 0.0) + v.detach() for k, v in parts.items()}
        group_size += 1
        window_images += batch["image"].shape[0] * accelerator.num_processes
        progress.advance(steps_bar)
        if not accelerator.sync_gradients:
            continue
        # The step's loss is the mean of its micro-batches' (what the gradient is of), not the last's.
        step_parts = {k: v / group_size for k, v in group_sums.items()}
        group_sums, group_size = {}, 0
        state["step"] += 1
        if not run.started:
            _start_writing(run, state)
        if state["step"] % cfg.log_every_steps == 0 or state["step"] == run.total_steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "epoch": epoch + 1,  # counted from 1, as the console counts
                "step": state["step"],
                "lr": step_lr,
                "images_per_s": window_images / max(elapsed, 1e-9),
                **{k: float(accelerator.reduce(v, "mean")) for k, v in step_parts.items()},
            }
            _log(accelerator, run.log_path, record)
            progress.update(steps_bar, info=_format(record))
            report(f"{run.stage} epoch {epoch + 1}/{cfg.epochs} step {state['step']}/{run.total_steps}: "
                   f"{_format(record)}", enabled=run.main)
            window_start, window_images = time.perf_counter(), 0
        if state["step"] >= run.total_steps:
            break
    state["epoch"] = epoch + 1


def _validate_and_checkpoint(run: _Run, state: dict, epoch: int, progress, epochs_bar) -> None:
    """Score the epoch's model when due (keeping the best weights), and save the checkpoint."""
    cfg, accelerator = run.recipe.train, run.accelerator
    unwrapped = accelerator.unwrap_model(run.model)
    last_epoch = state["epoch"] == cfg.epochs or state["step"] >= run.total_steps
    if state["epoch"] % cfg.eval_every_epochs == 0 or last_epoch:
        scores = evaluate_model(run.model, run.val_loader, accelerator,
                                num_classes=run.num_classes, ignore_index=run.ignore_index)
        if not math.isfinite(scores.miou):  # before any weights are written or the earlier run dropped
            which = "the val_dataset given" if run.val_given else f"data.val_split '{run.recipe.data.val_split}'"
            raise TrainingError(f"{which} has no labelled pixel (every mask is data.ignore_index "
                                f"{run.ignore_index}): its mIoU is undefined, so no weights can be scored")
        state["last_miou"] = scores.miou
        _log(accelerator, run.log_path, {"epoch": epoch + 1, "step": state["step"], "val_miou": scores.miou,
                                         "val_pixel_accuracy": scores.pixel_accuracy})
        run.validated = True
        if scores.miou > state["best_miou"]:
            state["best_miou"] = scores.miou
            save_weights(accelerator, unwrapped, run.files.best)
            _drop_earlier_run(run)
            if run.main:
                run.files.drop_reports_of(run.files.best)
                atomic_write_text(run.files.best_record, json.dumps(
                    {"epoch": epoch + 1, "step": state["step"], "miou": scores.miou}, indent=2))
        summary = f"val mIoU {100 * scores.miou:.1f} (best {100 * state['best_miou']:.1f})"
        progress.update(epochs_bar, info=summary)
        report(f"{run.stage} epoch {epoch + 1}/{cfg.epochs}: {summary}", enabled=run.main)
    if state["epoch"] % cfg.checkpoint_every_epochs == 0 or last_epoch:
        save_weights(accelerator, unwrapped, run.files.last)
        _drop_earlier_run(run)
        if run.main:
            run.files.drop_reports_of(run.files.last)
        save_checkpoint(accelerator, run.dir, state)
        run.checkpointed = True  # this run can be resumed from its folder


def _drop_earlier_run(run: _Run) -> None:
    """Once this run has written weights and read every split, the earlier run it set aside is
    gone for good: bad data in the validation split, met after a checkpoint when
    ``eval_every_epochs`` is the larger, still gives the earlier run back."""
    if run.main and run.validated:
        run.files.drop_set_aside()


# The package each Accelerate tracker needs (tensorboard: either writer).
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                     "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "aim": ("aim",)}


def _check_trackers(trackers: list[str]) -> None:
    """Refuse a tracker whose package is missing (Accelerate would only warn and go on untracked)."""
    import importlib.util

    for tracker in trackers:
        if not any(importlib.util.find_spec(p) for p in _TRACKER_PACKAGES[tracker]):
            raise TrainingError(f"train.trackers: '{tracker}' is not installed (pip install "
                                f"{_TRACKER_PACKAGES[tracker][0]}), so the run would not be tracked")


def distillation_step(
    batch: dict,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    criterion: DistillLoss,
    accelerator: Accelerator,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """The teacher's targets, the student's logits, and ``criterion``'s loss of the two:
    ``ce_weight * CE(student, labels) + kd_weight * T^2 * KL(teacher || student)`` (or CWD, DIST),
    ``[+ feature_weight * feature term]``, as :class:`DistillLoss` says.

    Returns the loss parts (``loss``, ``ce``, ``kd``, and ``feature`` with a feature term);
    without a teacher ``kd`` is 0 and not computed. The teacher (streamed or cached) runs under
    the same autocast as the student.
    """
    images = batch["image"]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        teacher_logits = teacher(batch) if teacher is not None else None
        student_logits = forward_padded(student, images)  # any crop size, not only multiples of 32
        if student_logits.shape[-2:] != images.shape[-2:]:
            # A map coarser than its input (SegFormer without its upsampling): taken to the
            # labels' pixels, as evaluation scores it and as such models' own training does.
            student_logits = torch.nn.functional.interpolate(
                student_logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        share = _share_of_global_mean(accelerator) if accelerator.num_processes > 1 else None
        size = tuple(images.shape[-2:])
        teacher_size = getattr(teacher, "input_size", None) or size
        return criterion(student_logits, batch["mask"], teacher_logits, share=share,
                         kd_target=batch.get("kd_mask"), feature_sizes=(size, teacher_size))


def feature_distillation(recipe: Recipe, student: torch.nn.Module, teacher: Teacher,
                         ignore_index: int) -> FeatureDistillation:
    """The recipe's feature term between ``student`` and the streamed ``teacher``'s model."""
    cfg = recipe.loss.feature
    if not isinstance(teacher, Teacher):
        raise TrainingError("loss.feature needs a streamed teacher (teacher.mode stream)")
    try:
        return FeatureDistillation(student, teacher.model, cfg.pairs, kind=cfg.kind, tau=cfg.tau,
                                   ignore_index=ignore_index)
    except FeatureError as error:
        raise TrainingError(f"loss.feature.pairs: {error}") from None


def _freeze_unreached(model: torch.nn.Module) -> None:
    """Stop training parameters that no forward reaches (an smp encoder cut short by
    ``encoder_depth`` keeps its deeper stages): DDP waits for a gradient of every trainable
    parameter and would stop the run at the second step. One small forward and backward, in eval
    mode so that no batch-norm statistic moves."""
    was_training = model.training
    parameter = next(model.parameters(), None)
    if parameter is None:
        return
    model.eval()
    try:
        forward_padded(model, torch.zeros(1, 3, 64, 64, device=parameter.device)).float().sum().backward()
    except Exception:  # a model that cannot take this image is left as it is
        model.zero_grad(set_to_none=True)
        return
    finally:
        model.train(was_training)
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None


def _batch_generator(seed: int, process: int, epoch: int, number: int) -> torch.Generator:
    """A random source for one batch's mixing, the same when a resumed run replays the batch."""
    key = 0
    for part in (seed, process, epoch, number):
        key = (key * 1_000_003 + part) % 2**63
    return torch.Generator().manual_seed(key)


def _share_of_global_mean(accelerator: Accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``count -> count * world_size / (sum of count over processes)``, for DistillLoss.

    Processes' crops hold different numbers of labelled pixels (void, and padding where a crop
    is larger than the rescaled image); weighting each process's mean by its share makes
    N processes train exactly like one with the whole batch, up to summation order.
    """
    def share(count: torch.Tensor) -> torch.Tensor:
        count = count.detach().float().reshape(1)
        total = accelerator.reduce(count.clone(), "sum")
        return (count * accelerator.num_processes / total.clamp_min(1)).squeeze(0)

    return share


def _check_finite(parts: dict[str, torch.Tensor], step: int, batch: dict, accelerator: Accelerator) -> None:
    # Reduced over processes so that every rank stops together (a rank that raised alone would
    # leave the others waiting in the gradient all-reduce).
    # A count of failing processes: Accelerate's reduce knows "sum", "mean" and "max" only (any
    # other word sums), so a "min" of finite flags let one process's NaN through.
    failing = (~torch.isfinite(parts["loss"].detach())).float()
    if accelerator.num_processes > 1:
        failing = accelerator.reduce(failing, "sum")
    if not failing.item():
        return
    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
    raise TrainingError(
        f"non-finite loss at optimizer step {step} ({values} on process {accelerator.process_index}); batch sample indices "
        f"{batch['index'].tolist()}. The last checkpoint was left intact."
    )


def _format(record: dict) -> str:
    losses = " ".join(f"{k} {record[k]:.4f}" for k in ("loss", "ce", "kd", "pseudo") if k in record)
    return f"{losses} lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s"


def _log(accelerator: Accelerator, path: Path, record: dict) -> None:
    if accelerator.log_with:
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=record["step"])
    if accelerator.is_main_process:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _warn_about_padding(recipe: Recipe) -> None:
    """Say once when training crops are larger than the largest rescaled frame (mostly padding)."""
    data = recipe.data
    if data.crop_size is None or data.resize is None:
        return
    largest = [round(side * data.scale_range[1]) for side in data.resize]
    if data.crop_size[0] > largest[0] or data.crop_size[1] > largest[1]:
        console.print(f"[yellow]warning[/]: data.crop_size {list(data.crop_size)} is larger than "
                      f"the frame at its largest scale ({largest}, data.resize {list(data.resize)} x "
                      f"{data.scale_range[1]}): part of every crop is padding, which trains nothing")


