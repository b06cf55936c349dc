"""Checks of plain arguments shared by layers that must not import each other (the losses and
the teacher both take a temperature)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_number(name: str, value: Any, *, allow_zero: bool) -> float:
    """``value`` as a float if it is a finite real number (not a bool), > 0 (or >= 0 with
    ``allow_zero``); else a ValueError naming ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
