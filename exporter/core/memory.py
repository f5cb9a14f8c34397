"""Giving the C allocator's free memory back to the kernel.

glibc's malloc keeps what a process frees in its arenas and returns it only from the top
of a heap, so after a burst (a storm's queued monitor events, a render that rebuilt many
sockets) the resident size stays at its peak. `trim_memory()` calls glibc's
`malloc_trim(0)`; where the C library has none (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["trim_memory"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim from the symbols the process has loaded already (no library
    search, which would run `ldconfig`), or None: musl and others have none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim: list[Callable[[int], int] | None] = []  # looked up at the first trim


def trim_memory() -> bool:
    """Give the allocator's free memory back to the kernel; False where it cannot."""
    if not _malloc_trim:
        _malloc_trim.append(_find_malloc_trim())
    trim = _malloc_trim[0]
    if trim is None:
        return False
    trim(0)
    return True
