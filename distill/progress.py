"""Progress bars and console output (rich), printed by the main process only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
if not console.is_terminal:  # logs and CI: long lines rather than rich's default 80 columns
    console.width = 120
T = TypeVar("T")


def live_bars() -> bool:
    """Live bars only on a terminal; logs and CI get plain lines instead (see ``report``)."""
    return console.is_terminal


def report(message: str, *, enabled: bool = True) -> None:
    """Print a progress line where no live bar shows it (not a terminal)."""
    if enabled and not live_bars():
        console.print(message, highlight=False)


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar with a free-text ``info`` field (loss, lr, images/s)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not (enabled and live_bars()),
        transient=False,
    )


def track(items: Iterable[T], label: str | None, *, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a progress bar when ``label`` is given and ``enabled``."""
    if not label or not enabled or not live_bars():
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(label, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)
