"""One writer per run folder: a lock held for the whole of a stage, naming its holder.

Two runs writing one stage folder interleave ``metrics.jsonl`` and leave weights from one run
beside the recipe of the other. ``filelock`` holds an OS lock on ``<folder>/.lock`` (released
by the OS when the process dies, so a killed run never leaves a stale lock); ``.lock.json``
beside it says who holds it, for the refusal's message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout


class FolderBusyError(RuntimeError):
    """Another run is writing the folder; the message names it and its holder."""


@contextmanager
def exclusive_folder(folder: Path, accelerator: Any = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; :class:`FolderBusyError` at once if another run has it.

    Under several processes the main one takes the lock and tells the others, so that every
    process stops together instead of the others waiting in a collective.
    """
    folder = Path(folder)
    main = accelerator is None or accelerator.is_main_process
    lock, holder = None, None
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = _holder(folder)
        else:
            (folder / ".lock.json").write_text(json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join(sys.argv)}) + "\n")
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = broadcast_object_list([holder])[0]
    if holder is not None:
        raise FolderBusyError(f"'{folder}' is being written by another run ({holder}); wait for it "
                              "to finish, or choose another output_dir")
    try:
        yield
    finally:
        if lock is not None:
            (folder / ".lock.json").unlink(missing_ok=True)
            lock.release()


def _holder(folder: Path) -> str:
    try:
        info = json.loads((folder / ".lock.json").read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
