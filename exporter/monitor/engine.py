"""The daemon's event engine: one thread that owns every ZeroMQ socket of the exporter.

It owns a `Reader` (exporter/monitor/reader.py: one epoll set over all monitor PAIRs,
edge-triggered drains, the reducer under a lock, `snapshot()`, failure handling) and, on
the reader's thread, creates the configured sockets, binds and connects them with retries
and backoff, and applies configs, using the reader only through `ReaderControl`. Other
threads talk to it through the reader's command queue, and read state only via
`snapshot()`.

Failures: an exception raised while serving one socket (its monitor or inbound handler, a
retry timer, a bind/connect) is caught, logged once per socket and counted
(`zmq_exporter_engine_errors_total`); the engine goes on with the other sockets. Should
the thread itself end anyway, `failure` says why, `snapshot().ready` turns false, pending
and later commands fail at once with `EngineStopped` (a reload never waits for a dead
thread), and `on_failure` is called once so the daemon can exit non-zero.

Peers: a listener whose accept() fails for want of descriptors or memory would make libzmq
retry in a loop, one monitor event per try; the engine unbinds it until descriptors are
free again, and holds a few descriptors in reserve for the web server meanwhile (see
EXHAUSTED).

Applying a config is a transaction: everything that can fail (the fd budget, creating each
new socket with its options and monitor) happens before any running socket is touched; if
it fails, what was opened is closed again and the running sockets, their connections and
their counters stay exactly as they were.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import zmq

from exporter.config import Settings, SocketSpec
from exporter.connections.kernel import Expected, Gone, read_connection
from exporter.core.endpoints import EndpointMap, Role
from exporter.core.events import errno_name
from exporter.core.state import (
    EngineSnapshot,
    SocketState,
    apply_event,
    forget_connections,
    record_bind,
)
from exporter.monitor.contexts import BindNames, ContextPool
from exporter.monitor.fdbudget import fd_budget_problem, nofile_limit, open_fds, specs_fds
from exporter.monitor.reader import (
    BATCH,
    COALESCE_SECONDS,
    EngineStopped,
    Handler,
    Reader,
    ReaderControl,
)
from exporter.monitor.sockets import MonitoredSocket, open_socket

__all__ = [
    "BATCH",
    "COALESCE_SECONDS",
    "MAX_BACKOFF_EXPONENT",
    "ApplyError",
    "ApplyResult",
    "Engine",
    "EngineStopped",
    "retry_delay",
]

log = logging.getLogger("zmq_exporter.engine")


@dataclass
class ApplyResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


# 2**MAX_BACKOFF_EXPONENT times any base interval is far above any cap, and the float
# product cannot overflow (it did at attempt 1025 with `base * 2 ** (attempt - 1)`).
MAX_BACKOFF_EXPONENT = 60


# Out of descriptors, a listener cannot accept its queued peers, and libzmq retries the
# accept() at once, in a loop, with an ACCEPT_FAILED monitor event per try (tcp_listener.cpp
# and ipc_listener.cpp, in_event): measured ~1.2 million events/s, more than the reader
# can read, queued in the unbounded monitor pipe (126 bytes each: +60 MB/s). For these
# errnos (descriptors or memory, not the peer) the engine *sheds* that listener: it
# unbinds it, which stops the loop at once, refuses the peers queued in the kernel and
# ends the listener's sessions (libzmq closes the connections still in their handshake at
# once; a handshaken one stops delivering and is closed when its peer next sends, which
# then reconnects; neither emits DISCONNECTED), and binds the same address again once
# descriptors are free.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Descriptors the engine holds open (on /dev/null) while no listener is shed, and closes
# when it sheds one, so that the web server can still answer /-/healthy and /metrics while
# accepted peers hold every other descriptor; taken back before listeners are bound again.
SPARE_FDS = 16
# While shedding: how often the engine looks whether descriptors are free again, and how
# many must be free beyond the spares before shed listeners are bound again.
RESUME_CHECK = 0.5
RESUME_HEADROOM = 16
# A shed within this long of the previous resume counts as the same attack: the next
# resume waits exponentially longer (the bind retry backoff), so peers that refill the
# descriptors at once cost one short burst per backoff interval, not one per check.
SHED_CALM = 10.0
# After a shed, when the engine checks which of the listener's connections libzmq ended
# (then at every resume check, at the resume, and this long after it: a handshaken
# connection of a shed listener stops delivering but is closed only when its peer next
# sends, again without a DISCONNECTED event).
SHED_PRUNE = 0.2
PRUNE_AFTER_RESUME = (1.0, 10.0, 60.0)


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
        # The reader: its thread's life and the snapshots through `_reader`; all the
        # engine does on that thread, through the owner's interface `_control`.
        self._reader = Reader(clock=clock, coalesce=coalesce, on_failure=on_failure)
        self._control: ReaderControl = self._reader
        self._owns_ctx = ctx is None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = ctx if ctx is not None else zmq.Context()
        if self._owns_ctx:  # 3 zmq sockets per monitored socket; the default cap is 1023
            self.ctx.set(zmq.MAX_SOCKETS, self.ctx.get(zmq.SOCKET_LIMIT))
        # Sockets that connect to host names get contexts of their own, and bind() gets
        # host names resolved off this thread: DNS never stalls the others (contexts.py).
        self.contexts = ContextPool(self.ctx)
        self._bind_names = BindNames()
        # File descriptors an apply must leave free (web server, logs, accepted peers).
        self._fd_reserve = fd_reserve
        # (first, max) interval of bind/connect retries, from the config applied last.
        self._backoff = (1.0, 30.0)
        # Engine thread only (their states are read and changed under `reader.hold()`):
        self._sockets: dict[str, MonitoredSocket] = {}
        self._states: dict[str, SocketState] = {}
        self._retry_attempts: dict[tuple[str, str], int] = {}
        # Bound listeners: (socket, configured endpoint) -> the address libzmq bound (what
        # unbind() takes, and what a resume binds again: `:0` keeps its port).
        self._bound: dict[tuple[str, str], str] = {}
        # Listeners shed (unbound until descriptors are free), same keys and values.
        self._shed: dict[tuple[str, str], str] = {}
        self._sheds_in_row = 0
        self._resumed_at = -SHED_CALM
        self._resume_at = 0.0
        self._spares: list[int] = []
        self._take_spares()

    # -- public API, any thread ---------------------------------------------------------

    def start(self) -> None:
        self._reader.start()

    def snapshot(self) -> EngineSnapshot:
        return self._reader.snapshot()

    @property
    def failure(self) -> str | None:
        """Why the thread ended unexpectedly; None while it runs (or never ran)."""
        return self._reader.failure

    def cpu_seconds(self) -> float:
        return self._reader.cpu_seconds()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """The reader's `hold()`: no event is reduced while the block runs."""
        with self._control.hold():
            yield

    def apply(self, settings: Settings) -> Future[ApplyResult]:
        """Make the running sockets match `settings` (validated already). Raises (through
        the future) ApplyError when the config cannot be applied; nothing changed then."""
        return self._control.call(lambda: self._apply(settings))

    def stop(self, timeout: float = 2.0) -> None:
        """Close monitors and sockets in the safe order and end the thread."""
        try:
            if self._reader.alive:
                with contextlib.suppress(EngineStopped):  # it died meanwhile
                    self._control.call(self._close_all).result(timeout)
            self._reader.stop(timeout)
            # Nothing left after a clean shutdown; what a dead thread left otherwise. Safe
            # from this thread only because no other thread uses the sockets any more.
            self._close_all()
        finally:
            self._release_spares()
            self.contexts.terminate()  # bounded: a lookup in progress must not delay exit
        if self._owns_ctx:
            self.ctx.term()

    # -- engine thread ------------------------------------------------------------------

    def _inbound_handler(self, managed: MonitoredSocket) -> Handler:
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
                self._control.count("messages_dropped", dropped)
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
        self._control.set_ready(True)
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
        self._states[spec.name] = state
        self._control.add_socket(spec.name, state)
        # `apply_event` as this module sees it (tests replace it here to inject failures).
        name = spec.name

        def accept_failed(seen: str, err: int) -> None:
            if err in EXHAUSTED:
                self._shed_listener(name, seen, err)

        handler = self._control.monitor_handler(
            managed.monitor, state, apply_event, on_accept_failed=accept_failed
        )
        self._control.register(spec.name, managed.monitor_fd, handler)
        if managed.socket_fd is not None:
            self._control.register(spec.name, managed.socket_fd, self._inbound_handler(managed))
        for endpoint in spec.binds:
            self._attach(managed, state, "bind", endpoint)
        for endpoint in spec.connects:
            self._attach(managed, state, "connect", endpoint)

    def _remove(self, name: str) -> None:
        managed = self._sockets.pop(name)
        for fd in (managed.monitor_fd, managed.socket_fd):
            if fd is not None:
                self._control.unregister(fd)
        self.contexts.close_socket(managed)
        del self._states[name]
        self._control.remove_socket(name)
        for table in (self._retry_attempts, self._bound, self._shed):
            for key in [k for k in table if k[0] == name]:
                del table[key]

    def _attach(
        self,
        managed: MonitoredSocket,
        state: SocketState,
        role: Role,
        endpoint: str,
        address: str | None = None,
    ) -> None:
        """bind()/connect() one endpoint; on failure retry with exponential backoff.
        `address`: bind this address (one bound before) instead of resolving `endpoint`.

        A failed bind() is also counted by its BIND_FAILED monitor event; this path adds
        the retry and one log line per state change (failing / recovered). Any other
        exception is an engine error of this socket, retried the same way."""
        if managed.closed:
            return
        name = managed.spec.name
        key = (name, endpoint)
        if key in self._shed:  # bound again when descriptors are free
            return
        try:
            if role == "bind":
                if address is not None:
                    target = address
                else:
                    # A host name is resolved on a worker thread (ZMQError EAGAIN meanwhile).
                    target = self._bind_names.target(endpoint, managed.spec.options.ipv6)
                if target != endpoint:  # events name the address bound: map it back
                    with self._control.hold():
                        record_bind(state, endpoint, target)
                managed.socket.bind(target)
                resolved = managed.socket.getsockopt_string(zmq.LAST_ENDPOINT)
                with self._control.hold():
                    record_bind(state, endpoint, resolved)
                self._bound[key] = resolved
            else:
                managed.socket.connect(endpoint)
        except Exception as err:
            attempt = self._retry_attempts.get(key, 0) + 1
            self._retry_attempts[key] = attempt
            if isinstance(err, zmq.ZMQError):
                self._control.count("attach_failures")
            else:
                self._control.socket_error(name, role, err)
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
            self._control.schedule(
                delay, lambda: self._attach(managed, state, role, endpoint, address)
            )
            return
        attempts = self._retry_attempts.pop(key, 0)
        log.log(
            logging.INFO if attempts else logging.DEBUG,
            "%s succeeded",
            role,
            extra={"socket": name, "endpoint": endpoint, "failed_attempts": attempts},
        )

    # -- shedding peers when descriptors run out -----------------------------------------

    def _take_spares(self) -> bool:
        """Hold SPARE_FDS descriptors; False (holding none) if they cannot all be had."""
        try:
            while len(self._spares) < SPARE_FDS:
                self._spares.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            self._release_spares()
            return False
        return True

    def _release_spares(self) -> None:
        spares, self._spares = self._spares, []
        for fd in spares:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _shed_listener(self, name: str, seen: str, err: int) -> None:
        """`name`'s listener `seen` could not accept for want of descriptors or memory:
        unbind it until descriptors are free again (see EXHAUSTED)."""
        managed = self._sockets.get(name)
        state = self._states.get(name)
        if managed is None or managed.closed or state is None:
            return
        endpoint = state.endpoint_map.lookup(seen)
        key = (name, endpoint)
        address = self._bound.pop(key, None)
        if address is None:  # shed already (events queued before the unbind), or unknown
            return
        with contextlib.suppress(zmq.ZMQError):  # not bound any more: nothing to stop
            managed.socket.unbind(address)
        first = not self._shed
        self._shed[key] = address
        now = time.monotonic()
        if first:
            calm = now - self._resumed_at > SHED_CALM
            self._sheds_in_row = 1 if calm else self._sheds_in_row + 1
            self._resume_at = now + retry_delay(self._sheds_in_row, *self._backoff)
            self._release_spares()  # for the web server, while peers hold the others
            self._control.schedule(max(RESUME_CHECK, self._resume_at - now), self._try_resume)
        self._control.count("listener_sheds")
        # libzmq ends the listener's connections still in their handshake as it goes, with
        # no DISCONNECTED event: drop them from the gauge once it has (the I/O thread does
        # it within milliseconds), and later again (PRUNE_AFTER_RESUME).
        self._control.schedule(
            SHED_PRUNE, functools.partial(self._prune_gone, managed, endpoint, address)
        )
        log.warning(
            "accept failed for want of resources: listener unbound until peers leave",
            extra={
                "socket": name,
                "endpoint": endpoint,
                "err": errno_name(err),
                "open_fds": open_fds(),
                "nofile": nofile_limit(),
                "retry_in": round(max(RESUME_CHECK, self._resume_at - now), 3),
            },
        )

    def _prune_gone(self, managed: MonitoredSocket, endpoint: str, address: str) -> None:
        """Forget the live connections of a shed listener that the kernel says are gone
        (fd closed, reused, or not a connection on the listener's address any more). An fd
        that cannot be checked (no descriptor free for the check) is kept. Nothing if the
        socket was removed or recreated (a reload) since."""
        name = managed.spec.name
        if managed.closed or self._sockets.get(name) is not managed:
            return
        state = self._states.get(name)
        with self._control.hold():
            ep = state.endpoints.get(endpoint) if state is not None else None
            fds = list(ep.live) if ep is not None else []
        if state is None or not fds:
            return
        try:
            expected = Expected.for_endpoint(address, "bind")
        except ValueError:  # inproc and the like: no kernel connections to check
            return
        gone = []
        for fd in fds:
            found = read_connection(fd, expected)
            if isinstance(found, Gone) and found.reason != "error":
                gone.append(fd)
        if gone:
            with self._control.hold():
                forget_connections(state, endpoint, gone)

    def _try_resume(self) -> None:
        if not self._shed:  # its sockets were removed meanwhile
            self._take_spares()
            return
        free = nofile_limit() - open_fds()
        if free < SPARE_FDS + RESUME_HEADROOM or not self._take_spares():
            for (name, endpoint), address in self._shed.items():
                shed_socket = self._sockets.get(name)
                if shed_socket is not None:
                    self._prune_gone(shed_socket, endpoint, address)
            self._control.schedule(RESUME_CHECK, self._try_resume)
            return
        self._resumed_at = time.monotonic()
        shed, self._shed = self._shed, {}
        for (name, endpoint), address in shed.items():
            managed = self._sockets.get(name)
            state = self._states.get(name)
            if managed is None or state is None or managed.closed:
                continue
            self._prune_gone(managed, endpoint, address)
            self._attach(managed, state, "bind", endpoint, address)
            for delay in PRUNE_AFTER_RESUME:
                self._control.schedule(
                    delay, functools.partial(self._prune_gone, managed, endpoint, address)
                )
        log.info(
            "file descriptors free again: shed listeners bound again",
            extra={"listeners": len(shed), "open_fds": open_fds()},
        )

    def _close_all(self) -> None:
        for name in list(self._sockets):
            self._remove(name)


def _describe(err: BaseException) -> str:
    if isinstance(err, zmq.ZMQError):
        return str(err.strerror)
    return f"{type(err).__name__}: {err}"
