"""Giving freed memory back to the system after renders that rebuilt many sockets.

glibc's malloc keeps what a process frees in its arenas (one per thread that allocated,
up to 8 per core) and returns it only from the top of a heap. A scrape that rebuilds many
sockets' text (a relay sidecar under churn: every relayed socket's state replaced between
two scrapes) allocates and frees tens of megabytes among long-lived objects, so the
resident size grows to the peak and stays there: with 20,000 relayed sockets, 22.7 KB per
socket after churn, 14.3 KB once `malloc_trim(0)` returned the free pages (5 ms at 500 MB).

Public names:
- `Trimmer`: `note(built)` after each render with the renderer's running count of sockets
  rebuilt; returns True when it trimmed (at most once per `min_interval` seconds, and only
  once `threshold` sockets were rebuilt since the last trim).
- `trim()`: `malloc_trim(0)` where the C library has it (glibc); False elsewhere (musl,
  macOS), where it does nothing.
"""

from __future__ import annotations

import threading
import time

from exporter.core.memory import trim_memory

__all__ = ["Trimmer", "trim"]


def trim() -> bool:
    """Return the free pages of every malloc arena to the system (glibc's
    `malloc_trim(0)`, `core.memory.trim_memory`); False where the C library cannot."""
    return trim_memory()


class Trimmer:
    """Calls `trim()` once enough sockets were rebuilt since the last time: a scrape of
    idle sockets frees little and never trims; a scrape after churn does, once. The
    garbage of a render is freed when its response has been sent, so the trim that
    returns it is the one noted by a later render."""

    def __init__(self, threshold: int = 1000, min_interval: float = 1.0) -> None:
        self.threshold = threshold
        self.min_interval = min_interval
        self.trims = 0  # for tests and benchmarks
        self._lock = threading.Lock()
        self._mark = 0  # the renderer's `built` at the last trim
        self._last = float("-inf")  # monotonic time of the last trim
        self._pending = False  # enough rebuilt since the last trim: trim at the next note

    def note(self, built: int) -> bool:
        """After a render: `built` is the renderer's running count of rebuilt sockets.
        Trims if an earlier render armed it (and `min_interval` passed), then arms for
        the next one if this render brought the count `threshold` past the last mark."""
        with self._lock:
            now = time.monotonic()
            due = self._pending and now - self._last >= self.min_interval
            if due:
                self._pending = False
                self._last = now
            if built - self._mark >= self.threshold:
                self._pending = True
                self._mark = built
        if not due:
            return False
        trimmed = trim()
        if trimmed:
            self.trims += 1
        return trimmed
