"""Processes and devices: the Accelerator a recipe asks for, and the helpers of a launched run.

Everything that runs models (training, caching, evaluation, comparison) gets its Accelerator here,
so none of them needs to import the training loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from distill._malloc import tune_cpu_malloc  # public here: the process's allocator setting

if TYPE_CHECKING:
    from distill.config import Recipe

__all__ = ["TrainingError", "end_launched_process", "in_process_group", "is_launch_main",
           "make_accelerator", "tune_cpu_malloc"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a launcher mismatch); the message says why."""


def is_launch_main() -> bool:
    """True in the main process of an ``accelerate launch`` (or a plain run), before any
    Accelerator exists: for output that one process writes or prints for all."""
    return int(os.environ.get("RANK", "0")) == 0


def make_accelerator(recipe: Recipe, project_dir: Path | None = None) -> Accelerator:
    """An Accelerator for the recipe, with a check that every launched process joined it.

    ``accelerate launch --num_processes 2`` without the CPU switch on a machine without a GPU
    starts two unrelated single-process runs that write the same files. On such a machine we ask
    for the CPU backend ourselves (gloo) whenever several processes were launched, and stop if the
    process group still does not match the launcher's ``WORLD_SIZE``.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("train.mixed_precision 'fp16' needs a GPU; use 'bf16' (or 'no') on CPU")
    # Accelerate keeps one global state per process; clear its mixed-precision part so that
    # several runs in one process (the stages of `distill run`, tests) may each choose their own.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available() and launched > 1,
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum_steps,
        log_with=list(recipe.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(project_dir or recipe.output_dir)),
        # The sampler's shuffle is then a function of (seed, epoch): a resumed run sees the same
        # order as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.num_processes != launched:
        raise TrainingError(
            f"the launcher started {launched} processes but they did not form one process group "
            f"(this process sees {accelerator.num_processes}). On CPU launch with "
            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 --mixed_precision no --dynamo_backend no ...`."
        )
    return accelerator



def in_process_group() -> bool:
    """True in a process of a multi-process launch once its process group exists."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_launched_process(code: int = 0) -> NoReturn:
    """End a process of a multi-process launch now, without the interpreter's teardown.

    For scripts of your own that call distill under ``accelerate launch``: call it last.

    A gloo worker thread releases a finished collective's tensors a moment after the caller's
    wait returns; if the interpreter is finalizing by then, the thread cannot take the GIL and
    the process aborts ("terminate called without an active exception", SIGABRT) after all its
    work is done, which fails the whole launch. destroy_process_group() does not join those
    threads (torch 2.13), so the only safe way out is to skip finalization: every file is
    written atomically and closed, trackers are finished, and loader workers exit with their
    parent.
    """
    if in_process_group():
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
