"""The event engine: one thread that owns every ZeroMQ socket of the exporter.

It reads all monitor PAIRs through one epoll set (each PAIR's `zmq.FD`, drained until
EAGAIN), so the cost is O(1) per event and nothing while idle, whatever the number of
sockets. It also runs bind/connect retries with backoff and applies configs. Other threads
talk to it through a command queue and an eventfd, and read state only via `snapshot()`,
which copies under a lock that the engine holds only while reducing a batch of events.

Failures: an exception raised while serving one socket (its monitor or inbound handler, a
retry timer, a bind/connect) is caught, logged once per socket and counted
(`zmq_exporter_engine_errors_total`); the engine goes on with the other sockets. Should
the thread itself end anyway, `failure` says why, `snapshot().ready` turns false, pending
and later commands fail at once with `EngineStopped` (a reload never waits for a dead
thread), and `on_failure` is called once so the daemon can exit non-zero.

Applying a config is a transaction: everything that can fail (the fd budget, creating each
new socket with its options and monitor) happens before any running socket is touched; if
it fails, what was opened is closed again and the running sockets, their connections and
their counters stay exactly as they were.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import zmq

from exporter.config import Settings, SocketSpec
from exporter.contexts import BindNames, ContextPool
from exporter.endpoints import EndpointMap, Role
from exporter.events import MONITOR_HEAD
from exporter.fdbudget import fd_budget_problem, open_fds, specs_fds
from exporter.sockets import MonitoredSocket, open_socket
from exporter.state import (
    EngineSnapshot,
    ReaderStats,
    SocketSnapshot,
    SocketState,
    apply_event,
    record_bind,
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


@dataclass
class ApplyResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


# 2**MAX_BACKOFF_EXPONENT times any base interval is far above any cap, and the float
# product cannot overflow (it did at attempt 1025 with `base * 2 ** (attempt - 1)`).
MAX_BACKOFF_EXPONENT = 60


class EngineStopped(RuntimeError):
    """A command sent to an engine whose thread has ended."""


class ApplyError(RuntimeError):
    """A config could not be applied; nothing running was changed."""


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: `base * 2**(attempt-1)`, at most `cap`, for any attempt >= 1."""
    exponent = min(max(attempt - 1, 0), MAX_BACKOFF_EXPONENT)
    return min(base * float(1 << exponent), cap)


class Engine:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        clock: Callable[[], float] = time.time,
        coalesce: float = COALESCE_SECONDS,
        on_failure: Callable[[str], None] | None = None,
        fd_reserve: int = 0,
    ) -> None:
        self._owns_ctx = ctx is None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = ctx if ctx is not None else zmq.Context()
        if self._owns_ctx:  # 3 zmq sockets per monitored socket; the default cap is 1023
            self.ctx.set(zmq.MAX_SOCKETS, self.ctx.get(zmq.SOCKET_LIMIT))
        # Sockets that connect to host names get contexts of their own, and bind() gets
        # host names resolved off this thread: DNS never stalls the others (contexts.py).
        self.contexts = ContextPool(self.ctx)
        self._bind_names = BindNames()
        self._clock = clock
        self._coalesce = coalesce
        self._on_failure = on_failure
        # File descriptors an apply must leave free (web server, logs, accepted peers).
        self._fd_reserve = fd_reserve
        self._lock = threading.Lock()
        # Guarded by _lock:
        self._states: dict[str, SocketState] = {}
        self._stats = ReaderStats()
        self._ready = False
        # (first, max) interval of bind/connect retries, from the config applied last.
        self._backoff = (1.0, 30.0)
        self._failure: str | None = None
        # The last SocketSnapshot of each socket, with the state it was taken from:
        self._snapshots: dict[str, tuple[SocketState, SocketSnapshot]] = {}
        # Engine thread only:
        self._sockets: dict[str, MonitoredSocket] = {}
        self._handlers: dict[int, tuple[str, Callable[[], tuple[bool, int]]]] = {}
        self._burst = 0
        self._ready_fds: deque[int] = deque()
        self._ready_set: set[int] = set()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._retry_attempts: dict[tuple[str, str], int] = {}
        self._errors_logged: set[str] = set()  # sockets whose first error was logged
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._commands_only = select.epoll()  # waits for commands while coalescing
        self._commands_only.register(self._wake_fd, select.EPOLLIN)
        # Commands and the futures they complete; _command_lock orders them against the
        # thread's death, so no command is left waiting on a dead thread.
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._command_lock = threading.Lock()
        self._running = False
        self._thread = threading.Thread(target=self._run, name="zmq-exporter-engine", daemon=True)

    # -- public API, any thread ---------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def apply(self, settings: Settings) -> Future[ApplyResult]:
        """Make the running sockets match `settings` (validated already). Raises (through
        the future) ApplyError when the config cannot be applied; nothing changed then."""
        return self._call(lambda: self._apply(settings))

    @property
    def failure(self) -> str | None:
        """Why the engine thread ended unexpectedly; None while it runs (or never ran)."""
        with self._lock:
            return self._failure

    def stop(self, timeout: float = 2.0) -> None:
        """Close monitors and sockets in the safe order and end the thread."""
        try:
            if self._thread.is_alive():
                with contextlib.suppress(EngineStopped):  # it died meanwhile
                    self._call(self._shutdown).result(timeout)
                self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"engine thread did not stop within {timeout} s")
            # Nothing left after a clean shutdown; what a dead thread left otherwise. Safe
            # from this thread only because no other thread uses the sockets any more.
            self._close_all()
        finally:
            self._close_fds()
            self.contexts.terminate()  # bounded: a lookup in progress must not delay exit
        if self._owns_ctx:
            self.ctx.term()

    def cpu_seconds(self) -> float:
        """CPU time the engine thread has used so far (bench/ measures the reader by it)."""
        ident = self._thread.ident
        if ident is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(ident))

    @contextlib.contextmanager
    def stall_reader(self) -> Iterator[None]:
        """Hold the reader back while the block runs: it blocks before reducing its next
        batch, a reader infinitely slower than any storm (bench/ and tests use it to show
        that nothing is lost meanwhile). Snapshots wait too."""
        with self._lock:
            yield

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

    def _call(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._command_lock:
            failure = self._failure
            if failure is None:
                self._commands.put((fn, future))
        if failure is not None:
            future.set_exception(EngineStopped(f"engine thread ended: {failure}"))
            return future
        os.eventfd_write(self._wake_fd, 1)
        return future

    # -- engine thread ------------------------------------------------------------------

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

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))

    def _socket_error(self, name: str, where: str, err: Exception) -> None:
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
                    self._socket_error(entry[0], "reader", err)
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
            self._burst = 0
        return events

    def _monitor_handler(
        self, managed: MonitoredSocket, state: SocketState
    ) -> Callable[[], tuple[bool, int]]:
        recv = managed.monitor.recv
        noblock = zmq.NOBLOCK
        unpack_head = MONITOR_HEAD.unpack_from

        def drain() -> tuple[bool, int]:
            frames: list[tuple[bytes, bytes]] = []
            more = True
            for _ in range(BATCH):
                try:
                    head = recv(noblock)
                except zmq.Again:
                    more = False
                    break
                frames.append((head, recv()))  # frame 2 arrives atomically with frame 1
            if frames:
                now = self._clock()
                with self._lock:
                    for head, endpoint in frames:
                        event_id, value = unpack_head(head)
                        apply_event(state, event_id, value, endpoint.decode(), now)
            return more, len(frames)

        return drain

    def _inbound_handler(self, managed: MonitoredSocket) -> Callable[[], tuple[bool, int]]:
        sock = managed.socket

        def drain() -> tuple[bool, int]:
            dropped = 0
            more = True
            for _ in range(BATCH):
                try:
                    frame = sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    more = False
                    break
                if not frame.more:  # count messages, not frames (a ROUTER gets two)
                    dropped += 1
            if dropped:
                with self._lock:
                    self._stats.messages_dropped += dropped
            return more, 0

        return drain

    # -- applying configs ----------------------------------------------------------------

    def _apply(self, settings: Settings) -> ApplyResult:
        result = ApplyResult()
        wanted = {spec.name: spec for spec in settings.sockets}
        for name, managed in self._sockets.items():
            if name not in wanted:
                result.removed.append(name)
            elif wanted[name] != managed.spec:
                result.recreated.append(name)
        result.added = [s.name for s in settings.sockets if s.name not in self._sockets]
        opening = {*result.added, *result.recreated}
        to_open = [s for s in settings.sockets if s.name in opening]
        # Phase 1, nothing running touched yet: everything that can fail.
        self._check_fd_budget(to_open)
        opened: list[MonitoredSocket] = []
        try:
            for spec in to_open:
                opened.append(self.contexts.open_socket(spec, open_socket))
        except Exception as err:
            for managed in opened:
                self.contexts.close_socket(managed)
            where = spec.name  # the socket that failed
            raise ApplyError(f"socket {where!r}: cannot be created: {_describe(err)}") from err
        # Phase 2: swap. Closing and registering do not fail short of the kernel running
        # out of memory; a bind/connect that fails is retried with backoff.
        for name in (*result.removed, *result.recreated):
            self._remove(name)
        self._backoff = (
            settings.global_.bind_retry_interval,
            settings.global_.bind_retry_max_interval,
        )
        for managed in opened:
            self._install(managed)
        result.unchanged = [s.name for s in settings.sockets if s.name not in opening]
        with self._lock:
            self._ready = True
        return result

    def _check_fd_budget(self, to_open: list[SocketSpec]) -> None:
        problem = fd_budget_problem(open_fds(), specs_fds(to_open), self._fd_reserve)
        if problem is not None:
            raise ApplyError(problem)

    def _install(self, managed: MonitoredSocket) -> None:
        spec = managed.spec
        state = SocketState(
            name=spec.name,
            socket_type=spec.socket_type,
            labels=dict(spec.labels),
            endpoint_map=EndpointMap(spec.binds, spec.connects),
        )
        self._sockets[spec.name] = managed
        with self._lock:
            self._states[spec.name] = state
        self._register(spec.name, managed.monitor_fd, self._monitor_handler(managed, state))
        if managed.socket_fd is not None:
            self._register(spec.name, managed.socket_fd, self._inbound_handler(managed))
        for endpoint in spec.binds:
            self._attach(managed, state, "bind", endpoint)
        for endpoint in spec.connects:
            self._attach(managed, state, "connect", endpoint)

    def _register(self, name: str, fd: int, handler: Callable[[], tuple[bool, int]]) -> None:
        self._handlers[fd] = (name, handler)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        # Events may already be queued; an edge-triggered fd would not report them.
        if fd not in self._ready_set:
            self._ready_set.add(fd)
            self._ready_fds.append(fd)

    def _remove(self, name: str) -> None:
        managed = self._sockets.pop(name)
        for fd in (managed.monitor_fd, managed.socket_fd):
            if fd is not None and self._handlers.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
                self._ready_set.discard(fd)
        self.contexts.close_socket(managed)
        with self._lock:
            del self._states[name]
        for key in [k for k in self._retry_attempts if k[0] == name]:
            del self._retry_attempts[key]
        self._errors_logged.discard(name)

    def _attach(
        self,
        managed: MonitoredSocket,
        state: SocketState,
        role: Role,
        endpoint: str,
    ) -> None:
        """bind()/connect() one endpoint; on failure retry with exponential backoff.

        A failed bind() is also counted by its BIND_FAILED monitor event; this path adds
        the retry and one log line per state change (failing / recovered). Any other
        exception is an engine error of this socket, retried the same way."""
        if managed.closed:
            return
        name = managed.spec.name
        key = (name, endpoint)
        try:
            if role == "bind":
                # A host name is resolved on a worker thread (ZMQError EAGAIN meanwhile).
                target = self._bind_names.target(endpoint, managed.spec.options.ipv6)
                if target != endpoint:  # events name the address bound: map it back
                    with self._lock:
                        record_bind(state, endpoint, target)
                managed.socket.bind(target)
                resolved = managed.socket.getsockopt_string(zmq.LAST_ENDPOINT)
                with self._lock:
                    record_bind(state, endpoint, resolved)
            else:
                managed.socket.connect(endpoint)
        except Exception as err:
            attempt = self._retry_attempts.get(key, 0) + 1
            self._retry_attempts[key] = attempt
            if isinstance(err, zmq.ZMQError):
                with self._lock:
                    self._stats.attach_failures += 1
            else:
                self._socket_error(name, role, err)
            delay = retry_delay(attempt, *self._backoff)
            log.log(
                logging.WARNING if attempt == 1 else logging.DEBUG,
                "%s failed; retrying with backoff",
                role,
                extra={
                    "socket": name,
                    "endpoint": endpoint,
                    "err": _describe(err),
                    "attempt": attempt,
                    "retry_in": delay,
                },
            )
            self._schedule(delay, lambda: self._attach(managed, state, role, endpoint))
            return
        attempts = self._retry_attempts.pop(key, 0)
        log.log(
            logging.INFO if attempts else logging.DEBUG,
            "%s succeeded",
            role,
            extra={"socket": name, "endpoint": endpoint, "failed_attempts": attempts},
        )

    def _shutdown(self) -> ApplyResult:
        result = ApplyResult(removed=list(self._sockets))
        self._close_all()
        self._timers.clear()
        self._running = False
        with self._lock:
            self._ready = False
        return result

    def _close_all(self) -> None:
        for name in list(self._sockets):
            self._remove(name)

    def _close_fds(self) -> None:
        if not self._epoll.closed:
            self._epoll.close()
            self._commands_only.close()
            os.close(self._wake_fd)


def _describe(err: BaseException) -> str:
    if isinstance(err, zmq.ZMQError):
        return str(err.strerror)
    return f"{type(err).__name__}: {err}"
