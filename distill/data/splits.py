"""Split selectors: which samples a recipe's ``data.train_split`` / ``data.val_split`` names.

A selector is one split of the dataset's layout, several pooled with ``+``, and optionally a
group of their samples after a colon::

    val                             the layout's split `val`
    train+val                       both splits, pooled
    train+val:prefix=0006R0         the pooled samples whose file name starts with 0006R0
    train+val:prefix=0006R0,0001TP  ... with either prefix
    train+val:list=holdout.txt      the samples named in a list file (one file name or stem a line)
    train+val:fold=1/3              fold 1 of 3 (0-based) over the groups of `data.group_pattern`

Groups exist because frames of one video sequence (one city, one camera) are near-duplicates:
validating on frames of a sequence the model trained on measures memory, not generalisation.
Holding out whole groups measures what a model does on scenes it never saw. A fold takes every
``num_folds``-th group in sorted order, starting at the fold's index.

This module only parses and selects over sample names; :func:`distill.data.build_dataset` reads
the layout and removes a held-out group from the training split.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

_logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KINDS = ("prefix", "list", "fold")


class SplitError(ValueError):
    """A split selector is malformed or selects nothing; the message names it."""


@dataclass(frozen=True)
class SplitSelector:
    """A parsed selector: the layout splits it pools and the group it keeps (if any)."""

    text: str
    splits: tuple[str, ...]
    kind: str | None = None  # None (every sample), "prefix", "list" or "fold"
    prefixes: tuple[str, ...] = ()
    list_file: Path | None = None
    fold: int = 0
    num_folds: int = 1

    @property
    def is_group(self) -> bool:
        """True when the selector keeps a group of its splits' samples, not all of them."""
        return self.kind is not None


def parse_split(text: str) -> SplitSelector:
    """Parse ``SPLIT[+SPLIT...][:prefix=A,B | :list=FILE | :fold=K/N]`` (see the module doc).

    Raises:
        SplitError: the selector is malformed; the message quotes it and says what is expected.
    """
    head, sep, group = text.partition(":")
    splits = tuple(part.strip() for part in head.split("+"))
    if not head or any(not _NAME.fullmatch(s) for s in splits):
        raise SplitError(f"split '{text}': '{head}' must be split names joined by '+' (e.g. train+val)")
    if any(not s.strip(".") for s in splits):  # a folder layout's images/. would be every split
        raise SplitError(f"split '{text}': '.' and '..' are folders, not split names")
    twice = sorted({s for s in splits if splits.count(s) > 1})
    if twice:  # every sample would be trained on (or scored) twice
        raise SplitError(f"split '{text}' names '{twice[0]}' twice")
    if not sep:
        return SplitSelector(text, splits)
    kind, eq, value = group.partition("=")
    if kind not in _KINDS or not eq or not value:
        raise SplitError(f"split '{text}': the group after ':' must be prefix=A[,B...], list=FILE "
                         f"or fold=K/N, not '{group}'")
    if kind == "prefix":
        prefixes = tuple(p.strip() for p in value.split(","))
        if any(not p for p in prefixes):
            raise SplitError(f"split '{text}': empty prefix in '{value}'")
        return SplitSelector(text, splits, kind, prefixes=prefixes)
    if kind == "list":
        return SplitSelector(text, splits, kind, list_file=Path(value).expanduser())
    match = re.fullmatch(r"(\d+)/(\d+)", value)
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise SplitError(f"split '{text}': fold must be K/N with 0 <= K < N, not '{value}'")
    return SplitSelector(text, splits, kind, fold=int(match[1]), num_folds=int(match[2]))


def file_safe(split: str) -> str:
    """``split`` as a file or folder name: a selector such as ``train+val:fold=1/3`` is made
    safe, with a hash of the original so that two selectors never share a name."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", split)
    if safe != split or not safe.strip("."):  # '.' or '..' would name the folder itself or its parent
        safe = f"{safe}-{hashlib.sha256(split.encode()).hexdigest()[:8]}"
    return safe


def sample_group(sample_id: str, pattern: str) -> str:
    """The group of a sample: the first match of ``pattern`` in its file name (the whole name if none).

    A pattern with a capture group returns that group, e.g. ``^(.+)_\\d+`` for ``seq_000123.png``.
    """
    name = PurePosixPath(sample_id).name
    match = re.search(pattern, name)
    if match is None:
        return name
    return match.group(1) if match.groups() else match.group(0)


def select(selector: SplitSelector, ids: Sequence[str], *, group_pattern: str) -> list[int]:
    """Indices into ``ids`` (sample ids of the pooled splits) that ``selector`` keeps, in order.

    Raises:
        SplitError: the list file is missing, or the group selects no sample (the message lists
            the groups there are, so a typo is easy to see).
    """
    if selector.kind is None:
        return list(range(len(ids)))
    names = [PurePosixPath(i).name for i in ids]
    if selector.kind == "prefix":
        kept = [k for k, name in enumerate(names) if name.startswith(selector.prefixes)]
    elif selector.kind == "list":
        kept = _listed(selector, ids, names)
    else:
        groups = sorted({sample_group(i, group_pattern) for i in ids})
        chosen = set(groups[selector.fold :: selector.num_folds])
        kept = [k for k, i in enumerate(ids) if sample_group(i, group_pattern) in chosen]
    if not kept:
        groups = sorted({sample_group(i, group_pattern) for i in ids})
        shown = ", ".join(groups[:12]) + (" ..." if len(groups) > 12 else "")
        raise SplitError(f"split '{selector.text}' selects none of the {len(ids)} samples of "
                         f"{'+'.join(selector.splits)} (their groups by data.group_pattern: {shown})")
    return kept


def _listed(selector: SplitSelector, ids: Sequence[str], names: Sequence[str]) -> list[int]:
    path = selector.list_file
    assert path is not None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is no sample name
    except OSError as error:
        raise SplitError(f"split '{selector.text}': cannot read list file '{path}' "
                         f"({error.strerror or error})") from None
    wanted = {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
    # A line may name a sample by its id (path under the root), file name or file stem.
    kept = [k for k, (i, name) in enumerate(zip(ids, names))
            if i in wanted or name in wanted or name.rsplit(".", 1)[0] in wanted]
    matched = {ids[k] for k in kept} | {names[k] for k in kept} | {names[k].rsplit(".", 1)[0] for k in kept}
    unknown = sorted(wanted - matched)
    if unknown:
        raise SplitError(f"list file '{path}' names {len(unknown)} sample(s) not in "
                         f"{'+'.join(selector.splits)}, e.g. '{unknown[0]}'")
    return kept


# Selections of a sample source (anything with __len__, sample_id and load)


def first_samples(source: Any, count: int | None) -> Any:
    if count is None or len(source) <= count:
        return source
    if isinstance(source, Subset):
        return Subset(source.rows[:count])
    return Subset([(source, k) for k in range(count)])


def without_samples(source: Any, held_out: Any, split: str, held_text: str
             ) -> Any:
    excluded = {held_out.sample_id(k) for k in range(len(held_out))}
    rows = [(source, k) for k in range(len(source)) if source.sample_id(k) not in excluded]
    if not rows:
        raise SplitError(f"data.train_split '{split}' has no sample left once the held-out "
                        f"data.val_split '{held_text}' is removed")
    if len(rows) < len(source):
        _logger.info("%s: %d of %d samples held out by data.val_split %s", split,
                    len(source) - len(rows), len(source), held_text)
    return Subset(rows)


class Subset:
    """Chosen samples of one or more sources, in order (a pooled or grouped split)."""

    def __init__(self, rows: list[tuple[Any, int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def sample_id(self, index: int) -> str:
        source, k = self.rows[index]
        return source.sample_id(k)

    def load(self, index: int) -> tuple[Any, Any]:
        source, k = self.rows[index]
        return source.load(k)

    def is_labelled(self, index: int) -> bool:
        """False for an image without a mask (see :mod:`distill.data.unlabelled`)."""
        return is_labelled(*self.rows[index])

    def repeat(self, index: int) -> int:
        """How many times sample ``index`` is drawn per pass (``data.unlabelled[].repeat``)."""
        return repeat(*self.rows[index])


def is_labelled(source: Any, index: int) -> bool:
    """Whether sample ``index`` of ``source`` has a real mask."""
    if hasattr(source, "is_labelled"):
        return source.is_labelled(index)
    return getattr(source, "labelled", True)


def image_file(source: Any, index: int) -> Path | None:
    """The resolved path of sample ``index``'s image file, for sources that read files."""
    if isinstance(source, Subset):
        return image_file(*source.rows[index])
    pairs = getattr(source, "pairs", None)  # a layout's (image, mask) files
    if pairs is not None:
        return Path(pairs[index][0]).resolve()
    paths = getattr(source, "paths", None)  # a folder of images
    return paths[index].resolve() if paths is not None else None


def repeat(source: Any, index: int) -> int:
    """How many times sample ``index`` of ``source`` is drawn per pass of the mixed batches."""
    count = getattr(source, "repeat", 1)
    return count(index) if callable(count) else count
