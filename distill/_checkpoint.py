"""Training checkpoints: weights and ``save_state`` folders written atomically, what a stage is
made from, and resuming only a checkpoint made from the same settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from accelerate import Accelerator
from safetensors.torch import save

from distill._io import atomic_write_bytes, swap_in_folder
from distill.config import Recipe, atomic_write_text
from distill.launch import TrainingError
from distill.fingerprint import stage_inputs
from distill.run_folder import PROGRESS_FILE, StageFiles, not_a_checkpoint_folder


def save_weights(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> None:
    """Model weights alone (no optimizer, no wrapper prefixes), atomically, by the main process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, save(state))
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict) -> None:
    """``save_state`` into a fresh folder, then swap it in for ``checkpoints/latest``.

    A kill at any moment leaves either the previous complete checkpoint or the new one.
    """
    files = StageFiles(run_dir)
    final = files.latest
    staging = files.checkpoints / ".incoming"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every rank's random_states_<i>.pkl is in before the swap
    if accelerator.is_main_process:
        atomic_write_text(staging / PROGRESS_FILE, json.dumps(state, indent=2))
        swap_in_folder(staging, final, files.checkpoints / ".previous")
    accelerator.wait_for_everyone()


def made_from(recipe: Recipe, stage: str, steps_per_epoch: int, samples: int, processes: int,
              *, teacher_module: bool = False) -> dict[str, object]:
    """What a checkpoint's progress depends on, as flat keys: a resume must match every one."""
    return {**flat_config(stage_inputs(recipe, stage, teacher_module=teacher_module)), "training samples": samples,
            "steps per epoch": steps_per_epoch, "processes": processes}


class CheckpointMismatch(TrainingError):
    """``train.resume`` names a checkpoint made from other inputs (settings, data, processes)."""


class CheckpointUnreadable(TrainingError):
    """``train.resume`` names a checkpoint whose files cannot be read (truncated, damaged)."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"train.resume '{folder}' cannot be read: {reason}")
        self.folder, self.reason = folder, reason

    def __reduce__(self):  # pickled by process pools: rebuilt from its two fields
        return type(self), (self.folder, self.reason)


def resume_from(accelerator: Accelerator, folder: Path, inputs: dict[str, object]) -> dict:
    """Load a ``save_state`` folder (or a stage folder's latest checkpoint) and its progress,
    refusing one made from other settings (the schedule would silently go wrong)."""
    if not folder.is_dir():
        raise TrainingError(not_a_checkpoint_folder(folder))
    folder = StageFiles(folder).resumable_checkpoint() or folder  # a stage folder, or a checkpoint
    progress_file = folder / PROGRESS_FILE
    if not progress_file.is_file():
        raise TrainingError(f"train.resume '{folder}' holds no progress.json: not a distill checkpoint")
    progress = json.loads(progress_file.read_text())
    recorded = progress.get("made_from") or {}
    changed = [f"{key}: checkpoint {recorded.get(key)!r}, now {inputs.get(key)!r}"
               for key in sorted(set(recorded) | set(inputs)) if recorded.get(key) != inputs.get(key)]
    if recorded and changed:
        raise CheckpointMismatch(f"train.resume '{folder}' was made with other settings; resume with the "
                            "same ones, or start a fresh run:\n  - " + "\n  - ".join(changed))
    try:
        accelerator.load_state(str(folder))
    except torch.cuda.OutOfMemoryError:
        raise  # the device, not the checkpoint: resuming later must still find it
    except SafetensorError as error:  # a truncated or damaged weights file
        raise CheckpointUnreadable(folder, str(error)[:400]) from None
    except (RuntimeError, KeyError, ValueError) as error:  # load_state_dict of another model
        first = str(error).strip().splitlines()
        if not isinstance(error, KeyError) and "loading state_dict" not in str(error):
            # A damaged file (a truncated zip...), not another model: not for a fresh start.
            raise CheckpointUnreadable(folder, ' '.join(first[:2])[:400]) from None
        # A CheckpointMismatch too: the model's code changed under the same settings (a factory
        # edited, a library renaming parameters), so `distill run` starts the stage anew.
        raise CheckpointMismatch(f"train.resume '{folder}' holds weights of another model: "
                            f"{' '.join(first[:2])[:400]}") from None
    return progress


def flat_config(tree: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """The recipe as dotted keys with scalar values: what trackers (TensorBoard hparams) accept."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:  # None and lists
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat
