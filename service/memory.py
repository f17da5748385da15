"""The worker's memory handed back to the system after a large request.

glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MB) and its trim threshold to
twice that, so after the first large body the next ones' arrays come from the heap, which is not given back
(``release_memory`` trims it after each large request, but the blocks still in use pin the rest). Fixing the mmap
threshold turns both rises off. Measured by ``bench/service_probe.py`` (one worker, the committed model), the
server's peaks over its large requests, its resident memory after them, and eight 1,000-plan requests at once:
as glibc sets it, 325-427 MiB, 332 MiB and 424 MiB; fixed at 32 MB, 253-365, 228 and 350; fixed at 128 kB,
244-346, 228 and 342, but the largest request (64 series x 244 samples x 96 steps, its ONNX Runtime without an
arena, in process) took 11.4 s against 9.2 (32 MB: 9.9 s). An operator's ``MALLOC_MMAP_THRESHOLD_`` is left as set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024  # the highest glibc's own rise reaches on 64 bits, fixed


def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs ldconfig)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


LIBC = _libc()
MALLOPT: Callable[..., int] | None = getattr(LIBC, "mallopt", None)  # None where the C library is not glibc
MALLOC_TRIM: Callable[..., int] | None = getattr(LIBC, "malloc_trim", None)


def fix_mmap_threshold() -> str:
    """Fix glibc's mmap threshold (which stops its rise and the trim threshold's); returns what was done, for
    the start-up log."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return "left as MALLOC_MMAP_THRESHOLD_ sets it"
    if not sys.platform.startswith("linux"):
        return f"left as it is ({sys.platform} has no glibc)"
    if MALLOPT is None:
        return "left as it is (no glibc mallopt)"
    if not MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "left as it is (mallopt refused)"
    return f"fixed at {MMAP_THRESHOLD // 2**20} MB"


def release_memory() -> None:
    """Hand freed heap pages back to the system after a large request (glibc keeps them otherwise)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
