"""The monitor reader: one thread that reads monitor PAIRs and reduces their events.

It reads every PAIR through one epoll set (each PAIR's `zmq.FD`, drained until EAGAIN), so
the cost is O(1) per event and nothing while idle, whatever the number of sockets and
whatever context each PAIR belongs to (an fd is an fd). Other threads talk to it through a
command queue and an eventfd, and read state only via `snapshot()`, which copies under a
lock that the reader holds only while reducing a batch of events.

Two users build on it:
- the daemon's `Engine` (exporter/monitor/engine.py), which also owns the watched sockets: it
  creates them, binds, connects, retries and applies configs on this same thread, through
  the reader's owner interface (`ReaderControl`);
- library mode (exporter/library.py), which owns no socket: the application's thread calls
  `socket.monitor()` and hands the PAIR over with `watch()`. The reader then owns only
  that PAIR and never touches the application's socket (libzmq sockets are not
  thread-safe). A watched PAIR whose monitor ends (MONITOR_STOPPED: the socket was closed
  or its monitor disabled) or whose context is being terminated (ETERM: `ctx.term()`) is
  closed by the reader at once, so `ctx.term()` never waits for it; its counters stay.

Public names: `Reader` (`start`, `watch`, `unwatch`, `watching`, `snapshot`, `hold`,
`cpu_seconds`, `failure`, `stop`, and the `ReaderControl` methods), `ReaderControl`,
`EngineStopped`, `BATCH`, `COALESCE_SECONDS`, `TRIM_BURST`.

Memory: events queued in the monitor pipes are freed as they are read, but glibc keeps
the freed memory in its arenas; after a large burst the reader calls `malloc_trim(0)` so
that RSS comes back down (see TRIM_BURST).

Failures: an exception raised while serving one PAIR is caught, logged once per socket and
counted (`zmq_exporter_engine_errors_total`); the reader goes on with the others. Should
the thread itself end anyway, `failure` says why, `snapshot().ready` turns false, pending
and later commands fail at once with `EngineStopped`, and `on_failure` is called once.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import select
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import zmq

from exporter.core import native
from exporter.core.events import MONITOR_HEAD, Event
from exporter.core.memory import trim_memory
from exporter.core.state import (
    EngineSnapshot,
    ReaderStats,
    SocketSnapshot,
    SocketState,
    apply_event,
    snapshot_socket,
)

T = TypeVar("T")

log = logging.getLogger("zmq_exporter.engine")

# Messages read from one monitor before moving on to the next ready one: bounds the lock
# hold time and keeps one stormy socket from starving the others.
BATCH = 256
# After a pass that drained every monitor, the reader waits this long (answering commands
# only) before it looks again, so the events that arrive meanwhile are read in one batch
# instead of one wakeup each. In a storm that cuts the reader's CPU per event ~3x; under
# 1,000 connections/s it keeps the reader at ~1% of a core (bench/: app_throughput). The
# price: state lags the events by at most this much (Prometheus scrapes every few
# seconds). Nothing is lost or blocked meanwhile: the monitor pipes are unbounded.
COALESCE_SECONDS = 0.05
# A burst of at least this many events (what had queued in the monitor pipes, ~126 bytes
# each in libzmq's pipe chunks, freed once read) is followed by glibc's malloc_trim(0),
# at most once per TRIM_INTERVAL: freed memory goes back to the kernel instead of staying
# in the allocator's arenas, so RSS comes down after a storm rather than staying at its peak.
TRIM_BURST = 20_000
TRIM_INTERVAL = 10.0
# unwatch() reads what is still queued before it closes the PAIR (the MONITOR_STOPPED
# that disable_monitor() just sent, a storm's backlog), for at most this long.
UNWATCH_DRAIN_SECONDS = 1.0

Reduce = Callable[[SocketState, int, int, str, float], None]
Handler = Callable[[], tuple[bool, int]]

_STOPPED = int(Event.MONITOR_STOPPED)
_ACCEPT_FAILED = int(Event.ACCEPT_FAILED)


class EngineStopped(RuntimeError):
    """A command sent to a reader (or engine) whose thread has ended."""


# The reader's counters an owner adds to (ReaderStats fields).
OwnerCount = Literal["messages_dropped", "attach_failures", "listener_sheds"]


class ReaderControl(Protocol):
    """What the owner of the reader's sockets (the daemon's Engine) uses of the reader.
    `call` from any thread; the others on the reader thread (in a command or a timer),
    except `hold`, which any thread may take."""

    def call(self, fn: Callable[[], T]) -> Future[T]: ...
    def schedule(self, delay: float, callback: Callable[[], None]) -> None: ...
    def hold(self) -> contextlib.AbstractContextManager[None]: ...
    def add_socket(self, name: str, state: SocketState) -> None: ...
    def remove_socket(self, name: str) -> None: ...
    def set_ready(self, ready: bool) -> None: ...
    def register(self, name: str, fd: int, handler: Handler) -> None: ...
    def unregister(self, fd: int) -> None: ...
    def monitor_handler(
        self,
        pair: zmq.Socket[bytes],
        state: SocketState,
        reduce: Reduce = ...,
        on_end: Callable[[str], None] | None = None,
        on_accept_failed: Callable[[str, int], None] | None = None,
    ) -> Handler: ...
    def socket_error(self, name: str, where: str, err: Exception) -> None: ...
    def count(self, what: OwnerCount, n: int = 1) -> None: ...


@dataclass
class _Watch:
    """A PAIR handed to the reader with `watch()`; the reader owns and closes it."""

    pair: zmq.Socket[bytes]
    fd: int
    ended: str = ""  # why the reader closed the PAIR already: "stopped" or "terminated"


class Reader:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        coalesce: float = COALESCE_SECONDS,
        on_failure: Callable[[str], None] | None = None,
        thread_name: str = "zmq-exporter-engine",
    ) -> None:
        self._clock = clock
        self._coalesce = coalesce
        self._on_failure = on_failure
        self._lock = native.Lock()
        # Guarded by _lock:
        self._states: dict[str, SocketState] = {}
        self._stats = ReaderStats()
        self._ready = False
        self._failure: str | None = None
        # The last SocketSnapshot of each socket, with the state it was taken from:
        self._snapshots: dict[str, tuple[SocketState, SocketSnapshot]] = {}
        # Reader thread only:
        self._handlers: dict[int, tuple[str, Handler]] = {}
        self._watches: dict[str, _Watch] = {}
        self._burst = 0
        self._trimmed_at = -TRIM_INTERVAL
        self._ready_fds: deque[int] = deque()
        self._ready_set: set[int] = set()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._errors_logged: set[str] = set()  # sockets whose first error was logged
        self._epoll = native.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._commands_only = native.epoll()  # waits for commands while coalescing
        self._commands_only.register(self._wake_fd, select.EPOLLIN)
        # Commands and the futures they complete; _command_lock orders them against the
        # thread's death, so no command is left waiting on a dead thread.
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            native.SimpleQueue()
        )
        self._command_lock = native.Lock()
        self._running = False
        self._thread = native.Thread(target=self._run, name=thread_name, daemon=True)

    # -- public API, any thread ---------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._thread.start()

    @property
    def failure(self) -> str | None:
        """Why the thread ended unexpectedly; None while it runs (or never ran)."""
        with self._lock:
            return self._failure

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def watch(self, name: str, pair: zmq.Socket[bytes], state: SocketState) -> Future[None]:
        """Read the monitor PAIR `pair` (connected already, RCVHWM=0) into `state`, shown as
        socket `name`. From now on the reader owns `pair`: the caller must not use it
        again. Fails (through the future) with ValueError if `name` is taken."""
        return self.call(lambda: self._watch(name, pair, state))

    def unwatch(self, name: str) -> Future[None]:
        """Read what is still queued on `name`'s PAIR (bounded), close it and drop the
        socket's state: its series disappear. A name not watched is ignored."""
        return self.call(lambda: self._unwatch(name))

    def watching(self, name: str) -> Future[str | None]:
        """None while `name`'s PAIR is read; "stopped" or "terminated" once the reader
        closed it (MONITOR_STOPPED or ETERM); "unknown" for a name not watched."""
        return self.call(lambda: self._watch_status(name))

    def stop(self, timeout: float = 2.0) -> None:
        """Close every watched PAIR and end the thread (library mode never needs it; tests
        and the relay do)."""
        try:
            if self._thread.is_alive():
                with contextlib.suppress(EngineStopped):
                    self.call(self._stop_watches).result(timeout)
                self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"reader thread did not stop within {timeout} s")
            self._close_watches()
        finally:
            self._close_fds()

    def cpu_seconds(self) -> float:
        """CPU time the thread has used so far (bench/ measures the reader by it)."""
        ident = self._thread.ident
        if ident is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(ident))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the reader back while the block runs: it blocks before reducing its next
        batch, and snapshots wait too. For changing a state other than by an event (an
        application's bind resolved, a listener's connections found gone: no event is
        reduced in between), and for bench/ and tests, a reader infinitely slower than
        any storm (nothing is lost meanwhile)."""
        with self._lock:
            yield

    def forget_snapshot(self, name: str) -> None:
        """With `hold()` held: `name`'s state changed other than by an event (library
        mode learned an endpoint), so the next snapshot copies it anew."""
        self._snapshots.pop(name, None)

    def snapshot(self) -> EngineSnapshot:
        """A consistent copy of the state. A socket that had no event since the previous
        snapshot gets the very same `SocketSnapshot` object again (`SocketState.events`
        counts every event applied, and nothing else changes what is rendered), so an
        idle socket costs a dict lookup here and renderers can cache by identity."""
        with self._lock:
            cache = self._snapshots
            sockets = []
            for name, state in self._states.items():
                cached = cache.get(name)
                if cached is not None and cached[0] is state and cached[1].events == state.events:
                    sockets.append(cached[1])
                    continue
                snap = snapshot_socket(state)
                cache[name] = (state, snap)
                sockets.append(snap)
            if len(cache) > len(self._states):  # sockets removed since
                for name in [n for n in cache if n not in self._states]:
                    del cache[name]
            stats = ReaderStats(**vars(self._stats))
            ready = self._ready and self._failure is None
            return EngineSnapshot(tuple(sockets), stats, ready, self._failure)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the reader thread; its result (or exception) through the future."""
        future: Future[T] = native.Future()
        with self._command_lock:
            failure = self._failure
            if failure is None:
                self._commands.put((fn, future))
        if failure is not None:
            future.set_exception(EngineStopped(f"engine thread ended: {failure}"))
            return future
        os.eventfd_write(self._wake_fd, 1)
        return future

    # -- reader thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._running:
                self._poll_once()
        except BaseException as err:  # anything that ends the thread
            self._died(err)

    def _died(self, err: BaseException) -> None:
        reason = f"{type(err).__name__}: {err}"
        log.critical(
            "engine thread ended; the exporter is unready and exits",
            exc_info=err,
            extra={"err": reason},
        )
        with self._command_lock, self._lock:
            self._failure = reason
            self._ready = False
        self._fail_pending(reason)
        # Watched PAIRs belong to the application's contexts: left open, they would make
        # its ctx.term() wait for ever. This thread owned them; nothing reads them now.
        self._close_watches()
        if self._on_failure is not None:
            self._on_failure(reason)

    def _fail_pending(self, reason: str) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped(f"engine thread ended: {reason}"))

    def _poll_once(self) -> None:
        if self._ready_fds:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        else:
            timeout = -1
        for fd, _mask in self._epoll.poll(timeout):
            if fd == self._wake_fd:
                self._run_commands()
            elif fd in self._handlers and fd not in self._ready_set:
                self._ready_set.add(fd)
                self._ready_fds.append(fd)
        self._run_timers()
        if self._drain_ready() and not self._ready_fds and self._coalesce > 0:
            self._wait_for_commands(self._coalesce)

    def _wait_for_commands(self, seconds: float) -> None:
        if self._timers:
            seconds = min(seconds, max(0.0, self._timers[0][0] - time.monotonic()))
        if self._commands_only.poll(seconds):
            self._run_commands()

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as err:
                future.set_exception(err)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    # -- the owner's interface (ReaderControl), reader thread --------------------------

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` on the reader thread `delay` seconds from now."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))

    def add_socket(self, name: str, state: SocketState) -> None:
        """Show `state` as socket `name` (the owner reduces into it through a handler)."""
        with self._lock:
            self._states[name] = state

    def remove_socket(self, name: str) -> None:
        """Stop showing socket `name`: its series disappear."""
        with self._lock:
            self._states.pop(name, None)
        self._errors_logged.discard(name)

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = ready

    def count(self, what: OwnerCount, n: int = 1) -> None:
        """Add `n` to one of the reader's counters (shown in every snapshot's stats)."""
        with self._lock:
            setattr(self._stats, what, getattr(self._stats, what) + n)

    def socket_error(self, name: str, where: str, err: Exception) -> None:
        """Count an unexpected exception of one socket; log it the first time only, so a
        socket that fails on every event cannot flood the log."""
        with self._lock:
            self._stats.engine_errors += 1
        first = name not in self._errors_logged
        self._errors_logged.add(name)
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "unexpected error serving a socket; counted, the engine goes on",
            exc_info=err if first else None,
            extra={"socket": name, "in": where, "err": f"{type(err).__name__}: {err}"},
        )

    def _drain_ready(self) -> int:
        """One pass over the ready fds, at most BATCH messages each; fds that still have
        messages stay ready for the next pass (edge-triggered: drain until EAGAIN).
        Returns the number of monitor events read."""
        if not self._ready_fds:
            return 0
        events = 0
        for _ in range(len(self._ready_fds)):
            fd = self._ready_fds.popleft()
            entry = self._handlers.get(fd)
            more = False
            if entry is not None:
                try:
                    more, count = entry[1]()
                except Exception as err:
                    # Not retried at once: an fd that fails on every read would spin. The
                    # next edge (new event or message) tries again.
                    self.socket_error(entry[0], "reader", err)
                    more, count = False, 0
                events += count
            if more:
                self._ready_fds.append(fd)
            else:
                self._ready_set.discard(fd)
        # A burst runs from the first ready fd until all are drained again; its size is
        # the backlog the reader found (events queued in libzmq's unbounded monitor pipes).
        self._burst += events
        with self._lock:
            stats = self._stats
            stats.wakeups += 1
            stats.events += events
            stats.backlog = self._burst
            stats.backlog_max = max(stats.backlog_max, self._burst)
        if not self._ready_fds:
            if self._burst >= TRIM_BURST:
                now = time.monotonic()
                if now - self._trimmed_at >= TRIM_INTERVAL:
                    self._trimmed_at = now
                    if trim_memory():
                        with self._lock:
                            self._stats.memory_trims += 1
            self._burst = 0
        return events

    def monitor_handler(
        self,
        pair: zmq.Socket[bytes],
        state: SocketState,
        reduce: Reduce = apply_event,
        on_end: Callable[[str], None] | None = None,
        on_accept_failed: Callable[[str, int], None] | None = None,
    ) -> Handler:
        """Drains one monitor PAIR into `state` with `reduce`. With `on_end`, the end of
        the monitor is reported instead of raised: "stopped" after MONITOR_STOPPED (the
        last event a monitor sends), "terminated" when the PAIR's context is being
        terminated (ETERM; `ctx.term()` waits until the PAIR is closed). With
        `on_accept_failed`, every ACCEPT_FAILED is also reported as (endpoint as libzmq
        names it, errno), after its batch is reduced and outside the lock."""
        recv = pair.recv
        noblock = zmq.NOBLOCK
        unpack_head = MONITOR_HEAD.unpack_from

        def drain() -> tuple[bool, int]:
            frames: list[tuple[bytes, bytes]] = []
            more = True
            ended = ""
            try:
                for _ in range(BATCH):
                    try:
                        head = recv(noblock)
                    except zmq.Again:
                        more = False
                        break
                    frames.append((head, recv()))  # frame 2 arrives atomically with frame 1
            except zmq.ContextTerminated:
                if on_end is None:
                    raise
                more, ended = False, "terminated"
            if frames:
                now = self._clock()
                failed: set[tuple[str, int]] = set()  # a storm repeats one pair
                with self._lock:
                    for head, endpoint in frames:
                        event_id, value = unpack_head(head)
                        seen = endpoint.decode()
                        reduce(state, event_id, value, seen, now)
                        if event_id == _ACCEPT_FAILED:
                            failed.add((seen, value))
                if failed and on_accept_failed is not None:
                    for seen, value in failed:
                        on_accept_failed(seen, value)
                # MONITOR_STOPPED is the last event of a monitor: if it came, it is last.
                if on_end is not None and unpack_head(frames[-1][0])[0] == _STOPPED:
                    more, ended = False, ended or "stopped"
            if ended and on_end is not None:
                on_end(ended)
            return more, len(frames)

        return drain

    def register(self, name: str, fd: int, handler: Handler) -> None:
        """Call `handler` whenever `fd` (edge-triggered, as zmq.FD is) is readable, until
        it reports no more; its errors are counted as socket `name`'s."""
        self._handlers[fd] = (name, handler)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        # Events may already be queued; an edge-triggered fd would not report them.
        if fd not in self._ready_set:
            self._ready_set.add(fd)
            self._ready_fds.append(fd)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and not self._epoll.closed:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        # A stale entry left in _ready_fds is skipped (no handler) or, if the fd number was
        # reused meanwhile, costs one read that finds nothing.
        self._ready_set.discard(fd)

    # -- watched PAIRs (reader thread) ---------------------------------------------------

    def _watch(self, name: str, pair: zmq.Socket[bytes], state: SocketState) -> None:
        if name in self._states:
            raise ValueError(f"a socket named {name!r} is watched already")
        fd = int(pair.getsockopt(zmq.FD))
        watch = _Watch(pair, fd)
        self._watches[name] = watch
        with self._lock:
            self._states[name] = state
            self._ready = True

        def on_end(why: str) -> None:
            self._end_watch(watch, why)

        self.register(name, fd, self.monitor_handler(pair, state, on_end=on_end))

    def _end_watch(self, watch: _Watch, why: str) -> None:
        """Close a watched PAIR whose monitor ended; the socket's state stays."""
        if watch.ended:
            return
        watch.ended = why
        self.unregister(watch.fd)
        watch.pair.close(linger=0)

    def _watch_status(self, name: str) -> str | None:
        watch = self._watches.get(name)
        if watch is None:
            return "unknown"
        return watch.ended or None

    def _unwatch(self, name: str) -> None:
        watch = self._watches.pop(name, None)
        if watch is None:
            return
        if not watch.ended:
            entry = self._handlers.get(watch.fd)
            deadline = time.monotonic() + UNWATCH_DRAIN_SECONDS
            events = 0
            while entry is not None and not watch.ended and time.monotonic() < deadline:
                try:
                    more, count = entry[1]()
                except Exception as err:
                    self.socket_error(name, "reader", err)
                    break
                events += count
                if not more:
                    break
            with self._lock:
                self._stats.events += events
            self._end_watch(watch, "unwatched")
        with self._lock:
            self._states.pop(name, None)
        self._errors_logged.discard(name)

    def _stop_watches(self) -> None:
        for name in list(self._watches):
            self._unwatch(name)
        self._timers.clear()
        self._running = False
        with self._lock:
            self._ready = False

    def _close_watches(self) -> None:
        """After the thread ended: close what it left open (no other thread uses them)."""
        for watch in self._watches.values():
            if not watch.ended:
                watch.ended = "closed"
                watch.pair.close(linger=0)

    def _close_fds(self) -> None:
        if not self._epoll.closed:
            self._epoll.close()
            self._commands_only.close()
            os.close(self._wake_fd)
