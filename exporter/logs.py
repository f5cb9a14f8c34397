"""Structured logs on stderr, as logfmt (the Prometheus exporters' default) or JSON.

Levels are written as Prometheus' exporters write them (`debug`, `info`, `warn`, `error`),
and logfmt values are plain text: a list is its items joined by commas, None is `null`,
never a Python repr.

Writing never blocks the thread that logs, once the daemon runs (`start_async_logging`):
a record is formatted by the thread that logs it and its line put on a bounded in-memory
queue (`QUEUE_SIZE` lines); one writer thread writes the lines to fd 2. A stderr that
nobody drains (a stuck log driver, a stopped `| less`, a full journald pipe) then blocks
only that writer: when the queue is full, lines are dropped and counted
(`dropped()`, `zmq_exporter_log_messages_dropped_total`) instead of stalling the engine
thread, whose unread monitors would stall every socket of its context. `stop_logging`
writes what is queued on exit, within a timeout. Before `start_async_logging` (config
checks, startup errors) lines are written synchronously, as the user expects them before
the exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# `--log.level` takes `warn` and `warning`; lines say `warn`.
LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
}
_LEVEL_NAMES = {"warning": "warn"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": _LEVEL_NAMES.get(record.levelname.lower(), record.levelname.lower()),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


def _logfmt_value(value: object) -> str:
    text = _plain(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _plain(value: object) -> str:
    """A value as logfmt text: collections as comma-separated items (`added=a,b`), mappings
    as `k:v` items, None as `null`, booleans as `true`/`false`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ",".join(f"{_plain(k)}:{_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return ",".join(_plain(item) for item in items)
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


# Lines the queue holds at most (a few MB at most: lines are a few hundred bytes).
QUEUE_SIZE = 10_000
# How long exit waits for the queued lines to be written (a stuck stderr must not block it).
FLUSH_TIMEOUT = 1.0
# Lines the writer takes off the queue for one write().
_BATCH = 256


def setup_logging(level: str, fmt: str) -> None:
    """Synchronous logging to stderr (startup: a bad config's error is written before the
    exit); `start_async_logging` then takes writing off the threads that log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


class AsyncStderrHandler(logging.Handler):
    """Formats on the logging thread, queues the line (bounded; full: dropped and counted)
    and writes on a writer thread of its own, straight to the file descriptor: the writer
    never holds `sys.stderr`'s lock, so interpreter exit cannot wait for it."""

    def __init__(self, fd: int, maxsize: int = QUEUE_SIZE) -> None:
        super().__init__()
        self._fd = fd
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize)
        self._count_lock = threading.Lock()
        self._dropped = 0
        # Lines queued and lines done with (written or dropped by a failed write); guarded by
        # _done: flush() waits for `_finished` to reach `_queued`.
        self._done = threading.Condition()
        self._queued = 0
        self._finished = 0
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        errors = getattr(sys.stderr, "errors", None) or "backslashreplace"
        self._encoding, self._errors = encoding, errors
        self._closed = False
        self._thread = threading.Thread(
            target=self._write_loop, name="zmq-exporter-log", daemon=True
        )
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # counted, not reported: handleError writes to stderr
            with self._count_lock:
                self._dropped += 1
            return
        with self._done:
            self._queued += 1
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            with self._count_lock:
                self._dropped += 1
            self._finish(1)

    def dropped(self) -> int:
        """Lines dropped since start: the queue was full, or stderr refused them."""
        with self._count_lock:
            return self._dropped

    def queued(self) -> int:
        """Lines waiting to be written (approximate)."""
        return self._queue.qsize()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:  # type: ignore[override]
        """Wait until every line queued so far is written, `timeout` seconds at most; True
        if they all were."""
        if self._closed:
            return self._finished >= self._queued
        deadline = time.monotonic() + timeout
        with self._done:
            target = self._queued
            while self._finished < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def close(self) -> None:
        """Ends the writer once it has written what is queued (it is a daemon thread: a
        stuck stderr leaves it to the exit). `stop_logging` flushes first, within its
        timeout; `logging.shutdown`'s flush and close return at once afterwards."""
        self._closed = True
        # Full: a stuck stderr; the writer is a daemon thread, left to the exit.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # ends the writer once it is idle
        super().close()

    def _finish(self, lines: int) -> None:
        with self._done:
            self._finished += lines
            self._done.notify_all()

    def _write_loop(self) -> None:
        get = self._queue.get
        for _ in iter(int, 1):  # for ever; ends at the None that close() queues
            lines: list[str] = []
            first = get()
            if first is None:
                return
            lines.append(first)
            try:
                for _ in range(_BATCH - 1):
                    line = self._queue.get_nowait()
                    if line is None:
                        self._write(lines)
                        return
                    lines.append(line)
            except queue.Empty:
                pass
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        data = memoryview("".join(lines).encode(self._encoding, self._errors))
        try:
            for _ in range(len(data) + 1):  # each write() writes at least a byte
                if not data:
                    break
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError:  # stderr closed or gone (EPIPE, EBADF): these lines are lost
            with self._count_lock:
                self._dropped += len(lines)
        finally:
            self._finish(len(lines))


_async: AsyncStderrHandler | None = None  # the handler start_async_logging installed
_stopped = False


def start_async_logging(maxsize: int = QUEUE_SIZE) -> AsyncStderrHandler:
    """From now on every thread's log lines go through the bounded queue to the writer
    thread, formatted as before (the root handler's formatter and level are kept)."""
    global _async, _stopped
    root = logging.getLogger()
    handler = AsyncStderrHandler(sys.stderr.fileno(), maxsize)
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    sys.stderr.flush()  # what was written synchronously comes first
    root.handlers[:] = [handler]
    _async, _stopped = handler, False
    return handler


def stop_logging(timeout: float = FLUSH_TIMEOUT) -> bool:
    """On exit: write every line queued so far, `timeout` seconds at most; True if all were
    written. Later lines are written synchronously if stderr drained, dropped otherwise
    (the exit must not block on a stuck stderr)."""
    global _stopped
    handler = _async
    if handler is None or _stopped:
        return True
    _stopped = True
    written = handler.flush(timeout)
    root = logging.getLogger()
    if written:
        sync = logging.StreamHandler(sys.stderr)
        sync.setFormatter(handler.formatter)
        root.handlers[:] = [sync]
    else:
        root.handlers[:] = [logging.NullHandler()]
    handler.close()
    return written


def dropped_log_lines() -> int:
    """Log lines dropped since start: the queue was full or stderr refused them (0 while
    logging is synchronous)."""
    handler = _async
    return handler.dropped() if handler is not None else 0
