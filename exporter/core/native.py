"""Real OS threads, locks and epoll, also in a process that gevent monkey-patched.

`gevent.monkey.patch_all()` turns `threading.Thread` into greenlets, the locks, events and
`queue.SimpleQueue` into greenlet-only objects, `time.sleep` into a hub switch, and removes
`select.epoll`. The exporter's background threads (the monitor reader, the connection
sampler, the relay sender) block in epoll, zmq_poll and timed waits: run as greenlets they
would block the hub (the whole application), and greenlet locks shared with an OS thread
are not made for it. So everything those threads share or block on is built here from the
originals gevent saved (`gevent.monkey.get_original`), and they run on real OS threads.

Outside gevent every factory returns the standard library's object, unchanged. This module
never imports gevent: it looks at `sys.modules` for a `gevent.monkey` that an application
imported, at the time an object is made (an application may patch after importing us).

Waits on these objects from the application's greenlets (a `Future.result()` of a reader
command, a scrape taking the reader's snapshot lock) block the hub for as long as they
take: a command round trip with the reader (tens of microseconds when idle) or one reduced
batch. They never yield, so a greenlet never holds one of these locks across a switch.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

__all__ = [
    "Condition",
    "Event",
    "Future",
    "Lock",
    "NativeThread",
    "SimpleQueue",
    "Thread",
    "epoll",
    "green",
    "sleep",
]


def green() -> bool:
    """True when gevent has patched `threading` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def original(module: str, name: str) -> Any:
    """`module.name` as it was before gevent patched it (as it is, without gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def Lock() -> threading.Lock:
    lock: threading.Lock = original("_thread", "allocate_lock")()
    return lock


def SimpleQueue() -> Any:
    """`queue.SimpleQueue()` (C, lock-free between OS threads)."""
    return original("queue", "SimpleQueue")()


def epoll() -> Any:
    """`select.epoll()`, which gevent's patch of `select` removes."""
    return original("select", "epoll")()


def sleep(seconds: float) -> None:
    original("time", "sleep")(seconds)


class Condition:
    """The part of `threading.Condition` that `Event` and `concurrent.futures.Future` use,
    on real locks (threading's own allocates its waiters' locks from the patched module)."""

    def __init__(self) -> None:
        self._lock = Lock()
        self._waiters: deque[threading.Lock] = deque()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        waiter = Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        try:
            got = waiter.acquire(True, -1 if timeout is None else max(0.0, timeout))
        finally:
            self._lock.acquire()
        if not got:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                got = True  # notified just after the timeout
        return got

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self.wait(left)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        for _ in range(min(n, len(self._waiters))):
            self._waiters.popleft().release()

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


def Event() -> threading.Event:
    event: threading.Event = original("threading", "Event")()
    if green():
        event._cond = Condition()  # type: ignore[attr-defined]  # CPython's Event uses only this
    return event


def Future() -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if green():
        future._condition = Condition()  # type: ignore[assignment]
    return future


class NativeThread:
    """The part of `threading.Thread` the exporter uses, started with the original
    `_thread.start_new_thread`: a real OS thread whatever gevent patched. Like a daemon
    thread, the interpreter does not wait for it at exit."""

    def __init__(self, target: Callable[[], object], name: str, daemon: bool = True) -> None:
        self._target = target
        self.name = name
        self.daemon = daemon
        self._ident: int | None = None
        self.native_id: int | None = None
        self._started = Lock()
        self._started.acquire()
        self._done = Lock()
        self._done.acquire()
        self._alive = False

    @property
    def ident(self) -> int | None:
        return self._ident

    def start(self) -> None:
        self._alive = True
        original("_thread", "start_new_thread")(self._bootstrap, ())
        self._started.acquire()  # ident is known once start() returns, as for Thread

    def _bootstrap(self) -> None:
        self._ident = original("_thread", "get_ident")()
        self.native_id = original("_thread", "get_native_id")()
        _set_os_name(self.name)
        self._started.release()
        try:
            self._target()
        finally:
            self._alive = False
            self._done.release()

    def is_alive(self) -> bool:
        return self._alive

    def join(self, timeout: float | None = None) -> None:
        if self._done.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._done.release()

    def __repr__(self) -> str:
        return f"<NativeThread {self.name!r} {'alive' if self._alive else 'ended'}>"


def _set_os_name(name: str) -> None:
    """The thread's name as `ps -T` and /proc/<pid>/task/*/comm show it (15 bytes)."""
    try:
        with open(f"/proc/self/task/{original('_thread', 'get_native_id')()}/comm", "wb") as f:
            f.write(name.encode()[:15])
    except OSError:
        pass


class ThreadLike(Protocol):
    """What the exporter uses of a thread: `threading.Thread` and `NativeThread` alike."""

    name: str

    @property
    def ident(self) -> int | None: ...

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


def Thread(target: Callable[[], object], name: str, daemon: bool = True) -> ThreadLike:
    """`threading.Thread(target=..., name=..., daemon=...)`, or a NativeThread under gevent."""
    if green():
        return NativeThread(target, name, daemon)
    return threading.Thread(target=target, name=name, daemon=daemon)
