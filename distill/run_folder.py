"""The run folder: where each stage, its weights, the cache, the comparison and the export live,
and one writer per folder.

Layout of ``output_dir``: ``<stage>/`` for teacher, baseline and student (``recipe.yaml``,
``metrics.jsonl``, ``best.safetensors``, ``last.safetensors``, ``checkpoints/latest/``),
``cache/`` (unless ``cache.dir``), ``compare/`` and ``export/``. Every module asks here.

Two runs writing one stage folder interleave ``metrics.jsonl`` and leave weights from one run
beside the recipe of the other. ``filelock`` holds an OS lock on ``.<folder>.lock`` beside it
(released by the OS when the process dies, so a killed run never leaves a stale lock); ``.<folder>.lock.json``
beside it says who holds it, for the refusal's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from distill.config import RECIPE_FILE



@dataclass(frozen=True)
class StageFiles:
    """Every file of a training stage's folder, named here once."""

    folder: Path

    @property
    def recipe(self) -> Path:
        """The fully resolved recipe the stage ran with."""
        return self.folder / RECIPE_FILE

    @property
    def metrics(self) -> Path:
        """One JSON line per logged step and per evaluation."""
        return self.folder / "metrics.jsonl"

    @property
    def best(self) -> Path:
        """The weights of the best validation mIoU."""
        return self.folder / "best.safetensors"

    @property
    def best_record(self) -> Path:
        """When the best weights were made, and their mIoU."""
        return self.folder / "best.json"

    @property
    def last(self) -> Path:
        """The weights of the last checkpoint."""
        return self.folder / "last.safetensors"

    @property
    def done(self) -> Path:
        """``distill run``'s record of a finished stage: its fingerprint and weights' hash."""
        return self.folder / "done.json"

    @property
    def checkpoints(self) -> Path:
        """``latest/`` (Accelerate ``save_state`` + ``progress.json``) and its swap folders."""
        return self.folder / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest"

    def resumable_checkpoint(self) -> Path | None:
        """``latest/``, or the checkpoint a kill between its two swap renames left in
        ``.previous/``; None when the folder holds neither."""
        for candidate in (self.latest, self.checkpoints / ".previous"):
            if candidate.is_dir():
                return candidate
        return None

    def eval_reports(self) -> tuple[Path, ...]:
        """``distill eval``'s reports of this folder's weights, one per split."""
        return tuple(sorted(self.folder.glob("eval_*.json")))

    def reports_of(self, weights: Path) -> tuple[Path, ...]:
        """The reports that scored ``weights`` (this folder's best or last file)."""
        if weights == self.best:
            return tuple(p for p in self.eval_reports() if "@" not in p.name)
        return tuple(sorted(self.folder.glob(f"eval_*@{weights.stem}.json")))

    def drop_reports_of(self, weights: Path) -> None:
        """Delete the reports that scored ``weights`` (this folder's best or last file), which
        were just rewritten: a resumed run's new best must not sit beside the old one's scores."""
        for report in self.reports_of(weights):
            report.unlink(missing_ok=True)

    def run_records(self) -> tuple[Path, ...]:
        """What a run from the start replaces: an earlier run's weights and records (its
        evaluation reports among them)."""
        return (self.metrics, self.best, self.best_record, self.last, self.done, self.tracker_logs,
                *self.own_reports())

    def own_reports(self) -> tuple[Path, ...]:
        """The eval reports of weights inside this folder (best, last, a checkpoint's), which a
        new run replaces; those of weights from elsewhere stay (their report names the file)."""
        here = self.folder.resolve()
        own = list(dict.fromkeys((*self.reports_of(self.best), *self.reports_of(self.last))))
        for report in self.eval_reports():
            if report in own:
                continue
            try:
                scored = Path(json.loads(report.read_text())["checkpoint"]).resolve()
            except (OSError, ValueError, KeyError, TypeError):
                scored = None  # unreadable: named like this folder's own or not, as the name says
            if "@" not in report.name or (scored is not None and here in scored.parents):
                own.append(report)
        return tuple(own)

    @property
    def tracker_logs(self) -> Path:
        """Where Accelerate's file trackers (TensorBoard) log: ``distill-<stage>/``."""
        return self.folder / f"distill-{self.folder.name}"

    @property
    def set_aside(self) -> Path:
        """An earlier run's files while a run from the start has not yet written weights."""
        return self.folder / ".previous_run"

    @property
    def _moving(self) -> Path:
        """Files on their way into or out of :attr:`set_aside`: with the folder's, the earlier run."""
        return self.folder / ".previous_run.moving"

    def set_aside_earlier_run(self) -> None:
        """Move an earlier run's weights, records, recipe and checkpoints into :attr:`set_aside`.

        A run from the start calls this at its first write and :meth:`drop_set_aside` once it has
        written weights and been validated: bad data met in between (a mask read in a later batch, the validation
        split) puts the earlier run back (:meth:`restore_set_aside`) as it was. A folder already
        holding a set-aside run belongs to a run killed before its first validation: what was set
        aside is still the last finished run, and the killed run's records are dropped. Files
        move through one folder renamed whole, so a kill between two moves loses nothing.
        """
        self._finish_interrupted_move()
        own = (*self.run_records(), self.recipe, self.checkpoints)
        if self.set_aside.is_dir():
            for path in own:
                _remove(path)
            return
        earlier = [path for path in own if path.exists()]
        if not earlier:
            return
        self._moving.mkdir()
        for path in earlier:
            os.replace(path, self._moving / path.name)
        os.replace(self._moving, self.set_aside)

    def restore_set_aside(self) -> None:
        """Put a set-aside earlier run back in place of this run's records (no weights yet)."""
        self._finish_interrupted_move()
        if not self.set_aside.is_dir():
            return
        for path in (*self.run_records(), self.recipe, self.checkpoints):
            _remove(path)
        os.replace(self.set_aside, self._moving)
        self._finish_interrupted_move()

    def killed_run_left(self) -> bool:
        """A run from the start was killed before it was validated once: the last finished run
        is still set aside, and the folder holds only the killed run's first records (and
        perhaps a checkpoint and ``last.safetensors``, which alone do not replace a finished run)."""
        return self.set_aside.is_dir() and not self.best.exists()

    def writer(self) -> str | None:
        """Who holds this folder's lock (:func:`exclusive_folder`), or None when no run does."""
        lock_file = self.folder.parent / f".{self.folder.name}.lock"
        if not lock_file.exists():
            return None
        probe = FileLock(lock_file, timeout=0)
        try:
            probe.acquire()
            probe.release()
        except Timeout:
            return _holder(lock_file.with_name(lock_file.name + ".json"))
        except OSError:  # a lock that cannot be taken here (read-only): no writer known
            return None
        return None

    def settled(self) -> bool:
        """No killed run's leftovers, and no files on their way back (:meth:`recover_killed_run`
        moves them one by one): what processes other than the one recovering wait for."""
        return not (self.killed_run_left() or self._moving.exists())

    def recover_killed_run(self) -> bool:
        """Put the last finished run back after such a kill (call it holding the folder's lock:
        a run alive before its first validation looks the same); returns whether it did."""
        if not self.killed_run_left():
            return False
        self.restore_set_aside()
        return True

    def drop_set_aside(self) -> None:
        """This run has written weights and been validated: the earlier one is gone for good."""
        shutil.rmtree(self.set_aside, ignore_errors=True)

    def _finish_interrupted_move(self) -> None:
        """Files left on their way (a kill or Ctrl-C between two moves) go back into the folder:
        whether being set aside or restored, they and the folder's files are the earlier run."""
        if not self._moving.is_dir():
            return
        for path in self._moving.iterdir():
            os.replace(path, self.folder / path.name)
        self._moving.rmdir()


def _remove(path: Path) -> None:
    """Delete a file or a folder, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


PROGRESS_FILE = "progress.json"  # inside a checkpoint folder: epoch, step, best, made_from


def not_a_checkpoint_folder(path: Path) -> str:
    """The refusal of a ``train.resume`` that is not a folder (preflight and the resume share it)."""
    return f"train.resume '{path}' is not a checkpoint folder (tried '{Path(path).absolute()}')"


def stage_files(recipe: Any, stage: str) -> StageFiles:
    """The files of ``<output_dir>/<stage>``."""
    return StageFiles(stage_dir(recipe, stage))


def stage_dir(recipe: Any, stage: str) -> Path:
    """``<output_dir>/<stage>``: a training stage's folder (teacher, baseline, student)."""
    return Path(recipe.output_dir) / stage


def cache_dir(recipe: Any) -> Path:
    """``cache.dir``, or ``<output_dir>/cache``."""
    return Path(recipe.cache.dir) if recipe.cache.dir is not None else Path(recipe.output_dir) / "cache"


def compare_dir(recipe: Any) -> Path:
    """``<output_dir>/compare``."""
    return Path(recipe.output_dir) / "compare"


def export_dir(recipe: Any) -> Path:
    """``<output_dir>/export``."""
    return Path(recipe.output_dir) / "export"


class UnwritableFolderError(ValueError):
    """A command's output folder cannot be created or written; the message names it and why."""


def ensure_writable_folder(folder: Path, what: str,
                           error: type[Exception] = UnwritableFolderError) -> None:
    """Prove that ``folder`` can be created and written before any expensive work, creating
    nothing (a refused command leaves no empty folder behind); else raise ``error``."""
    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise error(f"cannot write the {what} to {folder}: '{existing}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as problem:
        raise error(f"cannot write the {what} to {folder}: {problem.strerror or problem}") from None


class FolderBusyError(RuntimeError):
    """Another run is writing the folder; the message names it and its holder."""


@contextmanager
def exclusive_folder(folder: Path, accelerator: Any = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; :class:`FolderBusyError` at once if another run has it.

    The lock is ``.<name>.lock`` beside the folder, not in it: a refused run creates no stage
    folder, and the export, which swaps its folder in whole, keeps its lock while it does.

    Under several processes the main one takes the lock and tells the others, so that every
    process stops together instead of the others waiting in a collective.
    """
    folder = Path(folder)
    main = accelerator is None or accelerator.is_main_process
    lock, holder, problem = None, None, None
    lock_file = folder.parent / f".{folder.name}.lock"
    record = lock_file.with_name(lock_file.name + ".json")
    created: list[Path] = []  # parent folders this call makes, removed again if nothing is written
    if main:
        try:
            ensure_writable_folder(folder, "run")  # a file in the way, or no permission: said as such
            created = [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]
            folder.parent.mkdir(parents=True, exist_ok=True)
            candidate = FileLock(lock_file, timeout=0)
            candidate.acquire()
            lock = candidate
        except Timeout:
            holder = _holder(record)
        except UnwritableFolderError as error:
            problem = str(error)
        except OSError as error:  # a read-only or missing parent: said below, on every process
            problem = f"cannot lock '{folder}' for writing: {error.strerror or error}"
        if lock is not None:
            with contextlib.suppress(OSError):  # the record only names the holder for others
                record.write_text(json.dumps(
                    {"pid": os.getpid(), "host": socket.gethostname(),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}) + "\n")
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder, problem = broadcast_object_list([holder, problem])
    if problem is not None:
        raise UnwritableFolderError(problem)
    if holder is not None:
        raise FolderBusyError(f"'{folder}' is being written by another run ({holder}); wait for it "
                              "to finish, or choose another output_dir")
    try:
        yield
    finally:
        if lock is not None:
            record.unlink(missing_ok=True)
            if not folder.exists():
                # Nothing was written (a refused run): leave no lock file or folder behind. The
                # file goes while still locked, so no other run can hold a lock on it then.
                lock_file.unlink(missing_ok=True)
            lock.release()
            for parent in created:  # deepest first
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _holder(record: Path) -> str:
    try:
        info = json.loads(record.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
