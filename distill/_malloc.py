"""glibc malloc settings for CPU training (Linux only), applied at start-up with ``mallopt``.

Why: with glibc's defaults, the large activation buffers of a training step are mmap'ed and
unmapped on every step, and up to ~40% of CPU time went to page faults on this project's machines
(the settings below made train steps faster, most at large resolutions). Keeping freed memory in
the heap costs some resident memory. Switch it off with
``train.cpu_malloc_tuning=false``; ``bench/throughput.py`` measures both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_applied: dict[str, int] | None = None


def tune_cpu_malloc() -> dict[str, int]:
    """Raise glibc's mmap and trim thresholds and its top pad; returns what was set ({} if none)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt takes a C int, and glibc caps the mmap threshold at 32 MiB on 64-bit systems (larger
    # values are refused); setting it also turns off glibc's dynamic threshold.
    for name, option, value in (
        ("mmap_threshold", _M_MMAP_THRESHOLD, 32 * 1024 * 1024),
        ("trim_threshold", _M_TRIM_THRESHOLD, 2**31 - 1),
        ("top_pad", _M_TOP_PAD, 1024 * 1024 * 1024),
    ):
        if mallopt(option, value) == 1:
            _applied[name] = value
    return _applied
