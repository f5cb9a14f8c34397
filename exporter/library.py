"""Library mode: a Python application instruments its own sockets in one call.

    handle = exporter.instrument(sock, "backend", labels={"team": "payments"})
    sock.bind("tcp://*:5555")
    ...
    handle.close()  # from the thread that uses `sock`, before closing `sock`

The same reader and reducer as the daemon's (exporter/monitor/reader.py, exporter/core/state.py),
and
the same families and label names, served by one prometheus_client Collector per registry
and, with `meter_provider`, by OTel observable instruments named as the daemon's OTLP
output.

Who is connected: `connections_table()` (all instrumented sockets, or one
socket or endpoint) and `Instrumentation.connections()` return the live connections as the
daemon's /api/v1/connections rows,
read by the daemon's ConnectionTable (exporter/connections/table.py)
over this reader's snapshot: the same fd checks and pins, one table per process. The
daemon's six per-endpoint `zmq_connection*` families, its sampler self-metrics and
`zmq_exporter_connection_reads_gone_total` come from one ConnectionSampler per process over
that table (exporter/connections/sampler.py), a daemon thread started by the first collect of a
registry (or OTel callback) that shows an instrumented socket, and not in a forked child
until it collects there; each registry and meter provider gets its own sockets' series.
`configure_connections()` sets it as the daemon's `connections:` section (default: on,
every 2 s, no per-peer series).

Threads: `instrument()` and `Instrumentation.close()` run on the caller's thread, which is
the only one that touches the application's socket (`socket.monitor()`,
`disable_monitor()`); one background reader per process, started by the first
`instrument()`, owns nothing but the monitor PAIRs. Each PAIR lives in its socket's own
context (inproc reaches only that context) with RCVHWM=0, so an event burst queues in
memory and never blocks the application's I/O thread; it is created outside the context's
socket list, so `ctx.destroy()` does not close it from the application's thread, and the
reader closes it itself when the monitor stops (the socket was closed) or the context is
being terminated (`ctx.term()`), so `term()` never waits for it.

Misuse, each with a defined outcome (tests/library/test_library.py):
- the socket closed without `close()`: its counters stay, its gauges drop to 0 (the
  monitor's MONITOR_STOPPED), until `close()` or until a new socket takes its name;
- `ctx.term()`/`ctx.destroy()` with instrumented sockets open: the reader closes their
  PAIRs; `term()` returns once the application has closed its own sockets;
- fork: the child starts with no instrumented socket and no reader; the parent's handles
  are inert there (their `close()` does nothing) and the parent's sockets must not be used
  in the child (libzmq's rule). The child instruments the sockets it creates;
- the same socket twice while instrumented, a closed socket, a name in use:
  `InstrumentError` (a ValueError).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import zmq
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from exporter import messages as message_counting
from exporter._version import __version__
from exporter.config.keys import Z85_KEY
from exporter.config.model import ConnectionsConfig, label_name_problem
from exporter.connections.sampler import ConnectionSampler, reads_gone_family
from exporter.connections.table import ConnectionTable
from exporter.core import metrics
from exporter.core.endpoints import LearningEndpointMap
from exporter.core.events import ALL_EVENTS_MASK, EVENT_BY_NAME, Event, events_mask
from exporter.core.state import (
    EngineSnapshot,
    ReaderStats,
    SocketSnapshot,
    SocketState,
    record_endpoint,
)
from exporter.monitor.reader import EngineStopped, Reader
from exporter.monitor.sockets import attach_monitor, build_labels
from exporter.render.prometheus import StateCollector, render_self, render_sockets
from exporter.render.rows import row_labels, socket_rows

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

__all__ = [
    "InstrumentError",
    "Instrumentation",
    "configure_connections",
    "connections_table",
    "instrument",
    "reader",
]

log = logging.getLogger("zmq_exporter.library")

T = TypeVar("T")

# How long instrument() and close() wait for the reader to take or give back a PAIR. It
# answers commands within its coalescing pause (50 ms) plus one batch; this is a bound.
COMMAND_TIMEOUT = 5.0
READER_THREAD = "zmq-exporter-reader"
SAMPLER_THREAD = "zmq-exporter-library-connection-sampler"


class InstrumentError(ValueError):
    """The application asked for something library mode cannot do (the message says what)."""


@dataclass
class _Process:
    """Library state of this process. A forked child gets a fresh one (`_after_fork`)
    that keeps the exports: collectors stay registered on inherited registries."""

    reader: Reader | None = None
    handles: dict[str, Instrumentation] = field(default_factory=dict)
    # Collectors and OTel instruments, one per registry / meter provider (by id; the
    # object is kept alive with it so the id stays unique).
    collectors: dict[int, tuple[CollectorRegistry, _LibraryCollector]] = field(default_factory=dict)
    meters: dict[int, tuple[object, _OtelExport]] = field(default_factory=dict)
    # Names of the sockets shown by each registry / meter provider; replaced, never
    # changed, so scrapes read them without the lock.
    shown: dict[int, frozenset[str]] = field(default_factory=dict)
    # Relay senders, one per relay endpoint: relay.RelaySender.
    relays: dict[str, Any] = field(default_factory=dict)
    # Names of every instrumented socket (replaced, never changed, like `shown`), and the
    # connection table over them, made on first use.
    instrumented: frozenset[str] = frozenset()
    # Names of the sockets instrumented after they had bound or connected (`_late`).
    late: frozenset[str] = frozenset()
    table: ConnectionTable | None = None
    # The connection sampler over `table`, started by the first collect of a
    # registry (or OTel callback) that shows an instrumented socket; never in a child.
    sampler: ConnectionSampler | None = None

    def show(self) -> None:
        shown: dict[int, set[str]] = {}
        for name, handle in self.handles.items():
            for key in (id(handle.registry), id(handle.meter_provider)):
                shown.setdefault(key, set()).add(name)
        self.shown = {key: frozenset(names) for key, names in shown.items()}
        self.instrumented = frozenset(self.handles)
        self.late = frozenset(n for n, h in self.handles.items() if h.late is not None)


_lock = threading.RLock()
_process = _Process()


def _after_fork() -> None:
    """In a forked child: no reader thread exists, and the parent's sockets and PAIRs
    belong to contexts the child must not use. Start afresh; keep the exports."""
    global _lock, _process
    old = _process
    _lock = threading.RLock()  # the parent's may have been held by another thread
    _process = _Process(collectors=old.collectors, meters=old.meters)
    # The parent's sampler thread does not exist here; the child starts its own on its
    # first collect. The settings (`configure_connections`) are the process's and stay.
    if old.reader is not None:
        old.reader._close_fds()  # the child's copies of its epoll and eventfd


os.register_at_fork(after_in_child=_after_fork)


def reader() -> Reader | None:
    """The process's reader, once an `instrument()` started it (bench/ and tests read its
    CPU time and counters)."""
    return _process.reader


def _reader() -> Reader:
    """The process's reader, started on first use. Called with `_lock` held."""
    current = _process.reader
    if current is None or current.failure is not None:
        if current is not None:
            log.error("the monitor reader had ended; starting a new one: %s", current.failure)
        current = Reader(thread_name=READER_THREAD)
        current.start()
        _process.reader = current
    return current


def _wait(future: Future[T], what: str) -> T:
    try:
        return future.result(COMMAND_TIMEOUT)
    except FutureTimeout:
        raise RuntimeError(f"the reader did not {what} within {COMMAND_TIMEOUT} s") from None


class Instrumentation:
    """One instrumented socket. `close()` (or leaving the `with` block) detaches the
    monitor in the safe order, from the thread that uses the socket; twice is fine."""

    def __init__(
        self,
        name: str,
        sock: zmq.Socket[Any],
        pair: zmq.Socket[bytes],
        state: SocketState,
        registry: CollectorRegistry | None,
        meter_provider: object | None,
    ) -> None:
        self.name = name
        self.labels = dict(state.labels)
        self.registry = registry
        self.meter_provider = meter_provider
        self._socket = weakref.ref(sock)
        self._underlying = int(sock.underlying)
        self._pair = pair
        self._state = state
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()
        self.relay: str | None = None  # the relay endpoint its state is sent to
        self.late: str | None = None  # instrumented after a bind/connect: its last endpoint
        # With instrument(..., messages=True): the socket's message counts (its class is
        # swapped for a counting subclass until close(); exporter/messages/).
        self.message_counts: message_counting.MessageCounts | None = None

    def __repr__(self) -> str:
        return f"<Instrumentation {self.name!r}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _socket_open(self) -> zmq.Socket[Any] | None:
        sock = self._socket()
        return None if sock is None or sock.closed else sock

    def _live(self) -> bool:
        """Still watching an open socket (not closed, not inherited through fork)."""
        return not self._closed and self._pid == os.getpid() and self._socket_open() is not None

    def bind(self, endpoint: str) -> None:
        """`socket.bind(endpoint)`, its series labelled `endpoint` as given (as the daemon
        labels a configured bind: `tcp://*:5555`, not the `tcp://0.0.0.0:5555` libzmq
        reports). From the socket's thread, like `socket.bind`."""
        self._attach("bind", endpoint)

    def connect(self, endpoint: str) -> None:
        """`socket.connect(endpoint)`, its series labelled `endpoint` as given from the
        first event on."""
        self._attach("connect", endpoint)

    def _attach(self, role: str, endpoint: str) -> None:
        sock = self._socket_open()
        if sock is None or self._closed:
            raise InstrumentError(f"{self!r}: the socket is closed or no longer instrumented")
        current = _process.reader
        if current is None or self._pid != os.getpid():
            raise InstrumentError(f"{self!r} belongs to the parent process (fork)")
        # The reader is held while the socket binds: the events the bind sends wait until
        # the endpoint map knows what they name.
        with current.hold():
            try:
                if role == "bind":
                    sock.bind(endpoint)
                else:
                    sock.connect(endpoint)
            except BaseException:
                record_endpoint(self._state, endpoint, "bind" if role == "bind" else "connect")
                current.forget_snapshot(self.name)
                raise
            if role == "bind":
                resolved = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                record_endpoint(self._state, endpoint, "bind", resolved)
            else:
                record_endpoint(self._state, endpoint, "connect")
            current.forget_snapshot(self.name)

    def snapshot(self) -> SocketSnapshot | None:
        """This socket's current state (None once closed)."""
        current = _process.reader
        if current is None or self._closed or self._pid != os.getpid():
            return None
        for sock in current.snapshot().sockets:
            if sock.name == self.name and _process.handles.get(self.name) is self:
                return sock
        return None

    def connections(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """This socket's live connections read from the kernel now: `connections_table(
        socket=self.name, endpoint=endpoint)`; [] once closed (or in a forked child)."""
        if self._closed or self._pid != os.getpid() or _process.handles.get(self.name) is not self:
            return []
        return connections_table(self.name, endpoint)

    def close(self) -> None:
        """Detach: `socket.disable_monitor()` here, then the reader reads what is queued
        and closes the PAIR, then the socket's series disappear. The socket stays open
        (closing it is the application's business, after this)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._pid != os.getpid():
            return  # inherited through fork: the parent's socket is not ours to touch
        counted = self._socket()
        if counted is not None and self.message_counts is not None:
            message_counting.uncount(counted)  # the socket's own class again
        sock = self._socket_open()
        if sock is not None:
            # ETERM: its context is being terminated; the reader closes the PAIR anyway.
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        # Under the lock until the reader gave the PAIR back: an instrument() of the same
        # name meanwhile must not find it still watched.
        with _lock:
            if _process.handles.get(self.name) is not self:
                return  # replaced already (its socket had been closed)
            del _process.handles[self.name]
            _process.show()
            current = _process.reader
            if current is None:
                return
            try:
                _wait(current.unwatch(self.name), "release the monitor")
            except EngineStopped:
                self._pair.close(linger=0)  # the reader ended: nothing else uses the PAIR


def _mask(events: Iterable[str | Event] | None) -> int:
    if events is None:
        return ALL_EVENTS_MASK
    try:
        return events_mask([events] if isinstance(events, str) else events)
    except KeyError as err:
        raise InstrumentError(
            f"unknown event {err.args[0]!r}; expected 'all' or some of {', '.join(EVENT_BY_NAME)}"
        ) from None


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, val in (labels or {}).items():
        problem = (
            label_name_problem(key)
            if isinstance(key, str)
            else f"invalid label name {key!r} (expected a str)"
        )
        if problem is not None:
            raise InstrumentError(problem)
        if not isinstance(val, str):
            raise InstrumentError(f"label {key!r}: value must be a str, not {type(val).__name__}")
        out[key] = val
    return out


def instrument(
    socket: zmq.Socket[Any],
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    events: Iterable[str | Event] | None = None,
    registry: CollectorRegistry | None = REGISTRY,
    meter_provider: MeterProvider | None = None,
    relay: str | None = None,
    relay_id: str | None = None,
    relay_server_key: str | None = None,
    messages: bool | None = None,
) -> Instrumentation:
    """Watch `socket`'s monitor events: the daemon's socket families, with `socket=name`,
    `labels`, and the endpoints the socket binds and connects as `endpoint`.

    Call it from the thread that uses `socket`, before its bind()/connect() (connections
    made before are not counted). `events`: event names as in the daemon's config (None:
    all). `registry`: where the socket's series are collected (None: nowhere);
    `meter_provider`: an OpenTelemetry MeterProvider to observe them on as well.
    `relay`: a sidecar daemon's relay endpoint (default: $ZMQ_EXPORTER_RELAY, if set) to
    send the socket's state to (docs/relay.md), as process `relay_id` (default
    hostname/pid). `relay_server_key`: the daemon's CURVE public key (Z85; default:
    $ZMQ_EXPORTER_RELAY_SERVER_KEY), for a relay over tcp off loopback.
    `messages`: count the messages and bytes the application sends and receives on
    `socket`, and its sends' backpressure (docs/messages.md; default: $ZMQ_EXPORTER_MESSAGES,
    else off; off leaves the socket object untouched)."""
    if not isinstance(socket, zmq.Socket):
        raise InstrumentError(f"expected a zmq.Socket, got {type(socket).__name__}")
    if not isinstance(name, str) or not name:
        raise InstrumentError("name must be a non-empty str")
    checked = _check_labels(labels)
    mask = _mask(events)
    if socket.closed:
        raise InstrumentError(f"cannot instrument {name!r}: the socket is closed")
    relay = relay or os.environ.get("ZMQ_EXPORTER_RELAY") or None
    server_key = relay_server_key or os.environ.get("ZMQ_EXPORTER_RELAY_SERVER_KEY") or None
    if server_key is not None and not Z85_KEY.fullmatch(server_key):
        raise InstrumentError("relay_server_key: expected a 40-character Z85 CURVE public key")
    with _lock:
        process = _process
        for other in list(process.handles.values()):
            if other._underlying == int(socket.underlying) and other._live():
                raise InstrumentError(
                    f"this socket is instrumented already, as {other.name!r}; "
                    "close that Instrumentation first"
                )
        previous = process.handles.get(name)
        if previous is not None:
            if previous._live():
                raise InstrumentError(f"the name {name!r} is in use by another open socket")
            previous.close()  # its socket was closed without close(): the name is free
        current = _reader()
        if relay is not None:
            # Before the monitor: it may refuse relay_id.
            _relay_sender(relay, relay_id, server_key)
        late = _late(socket, name)
        pair = _attach_monitor(socket, name, mask)
        state = SocketState(
            name=name,
            socket_type=zmq.SocketType(int(socket.getsockopt(zmq.TYPE))).name,
            labels=checked,
            endpoint_map=LearningEndpointMap((), ()),
        )
        try:
            _wait(current.watch(name, pair, state), "take the monitor")
        except (ValueError, EngineStopped):
            _detach(socket, pair)  # refused: the reader never took the PAIR
            raise
        except BaseException:
            # No answer in time: the reader may still take the PAIR, so it is left to it.
            with contextlib.suppress(zmq.ZMQError):
                socket.disable_monitor()
            raise
        handle = Instrumentation(name, socket, pair, state, registry, meter_provider)
        if messages if messages is not None else message_counting.enabled_by_env():
            try:
                handle.message_counts = message_counting.count(socket)
            except Exception as err:  # e.g. a class that refuses subclasses
                # Never fail the application's instrument() for the counting.
                log.warning("cannot count the messages of %r: %s", name, err)
        process.handles[name] = handle
        handle.relay = relay
        if late is not None:
            handle.late = late
            _learn_late(socket, state, late)
        process.show()
        if registry is not None and id(registry) not in process.collectors:
            collector = _LibraryCollector(id(registry))
            registry.register(collector)
            process.collectors[id(registry)] = (registry, collector)
        if meter_provider is not None and id(meter_provider) not in process.meters:
            process.meters[id(meter_provider)] = (meter_provider, _OtelExport(meter_provider))
    return handle


# ---------------------------------------------------------------------------------------
# Late instrumentation: a socket that bound or connected before instrument(). What happened
# before is unknown: its listeners (no LISTENING event will come), the connections made
# then (no CONNECTED/ACCEPTED), so the state gauges would be wrong. They are not served for
# it (nor is it relayed); its counters count from instrument() on. docs/library.md.

# State gauges (and the connection sampler's families, zmq_connection_*), by family name.
_LATE_HIDDEN = ("zmq_connections", "zmq_connection_ready", "zmq_listening", "zmq_connection_")
_LATE_SLOTS = frozenset(
    n for n, f in enumerate(metrics.PUSHED) if f.metric_name.startswith(_LATE_HIDDEN)
)


def _late(socket: zmq.Socket[Any], name: str) -> str | None:
    """The socket's last endpoint if it bound or connected already (one warning)."""
    try:
        last = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    except zmq.ZMQError:
        return None
    if not last:
        return None
    log.warning(
        "instrument(%r): the socket has bound or connected already (last endpoint %s): "
        "its listeners and earlier connections are unknown, so zmq_listening, "
        "zmq_connections, zmq_connection_ready and the zmq_connection_* families are not "
        "served for it, nor is it relayed; its counters count from now. Instrument a "
        "socket before its first bind/connect (exporter.instrument_sockets() does)",
        name,
        last,
    )
    return last


def _learn_late(socket: zmq.Socket[Any], state: SocketState, last: str) -> None:
    """ZMQ_LAST_ENDPOINT labels the events of that endpoint: as a bind if this process
    listens on its TCP port (the kernel says), else as a connect (tcp only)."""
    if not last.startswith("tcp://"):
        return
    with contextlib.suppress(ValueError):
        port = int(last.rsplit(":", 1)[1])
        role: Literal["bind", "connect"] = "bind" if _listens(port) else "connect"
        current = _process.reader
        if current is not None:
            with current.hold():
                record_endpoint(state, last, role)
                current.forget_snapshot(state.name)


def _listens(port: int) -> bool:
    """A LISTEN row for `port` among this process's own sockets (/proc/self/net/tcp*)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/self/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A" and fields[9] in inodes
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _hide_late(families: Iterable[Metric]) -> Iterator[Metric]:
    late = _process.late
    for family in families:
        if not late or not family.name.startswith(_LATE_HIDDEN):
            yield family
            continue
        out = Metric(family.name, family.documentation, family.type, family.unit)
        out.samples = [s for s in family.samples if s.labels.get("socket") not in late]
        yield out


def _relay_sender(endpoint: str, relay_id: str | None, server_key: str | None) -> None:
    """The process's sender to `endpoint`, started on first use. With `_lock` held."""
    from exporter.relay.sender import RelaySender  # only applications that relay load it

    sender = _process.relays.get(endpoint)
    if sender is not None:
        if relay_id is not None and relay_id != sender.relay_id:
            raise InstrumentError(
                f"relay {endpoint!r} is used already as process {sender.relay_id!r}"
            )
        return
    key = server_key.encode() if server_key is not None else None
    sender = RelaySender(
        endpoint,
        lambda: _relayed(endpoint),
        relay_id,
        curve_server_key=key,
        messages=lambda: _relayed_messages(endpoint),
    )
    sender.start()
    _process.relays[endpoint] = sender


def _relayed(endpoint: str) -> tuple[SocketSnapshot, ...]:
    """The sockets sent to relay `endpoint` (from the sender's thread)."""
    process = _process
    current = process.reader
    if current is None:
        return ()
    # Not a late socket: the sidecar would show its unknowable gauges as 0.
    names = {n for n, h in list(process.handles.items()) if h.relay == endpoint and h.late is None}
    return tuple(s for s in current.snapshot().sockets if s.name in names)


def _relayed_messages(endpoint: str) -> dict[str, tuple[float, ...]]:
    """The message counts of the counted sockets sent to relay `endpoint` (from the
    sender's thread)."""
    return {
        name: handle.message_counts.values()
        for name, handle in list(_process.handles.items())
        if handle.relay == endpoint and handle.message_counts is not None
    }


def _attach_monitor(socket: zmq.Socket[Any], name: str, mask: int) -> zmq.Socket[bytes]:
    try:
        return attach_monitor(socket.context, socket, mask)
    except zmq.ContextTerminated:
        raise InstrumentError(f"cannot instrument {name!r}: its context is terminated") from None
    except zmq.ZMQError as err:
        raise InstrumentError(f"cannot instrument {name!r}: {err.strerror}") from err


def _detach(socket: zmq.Socket[Any], pair: zmq.Socket[bytes]) -> None:
    """Undo `_attach_monitor` in the safe order."""
    with contextlib.suppress(zmq.ZMQError):
        socket.disable_monitor()
    pair.close(linger=0)


# ---------------------------------------------------------------------------------------
# Exports: what each registry and meter provider shows.


def _snapshot(key: int) -> EngineSnapshot:
    """The reader's snapshot, restricted to the sockets instrumented for `key` (a registry
    or meter provider)."""
    process = _process
    current = process.reader
    if current is None:
        return EngineSnapshot((), ReaderStats(), False)
    snap = current.snapshot()
    names = process.shown.get(key, frozenset())
    sockets = tuple(s for s in snap.sockets if s.name in names)
    if len(sockets) == len(snap.sockets):
        return snap
    return EngineSnapshot(sockets, snap.stats, snap.ready, snap.failure)


def _instrumented_snapshot() -> EngineSnapshot:
    """The reader's snapshot, restricted to the sockets instrumented now (the handles not
    closed), whatever registry or meter provider shows them."""
    process = _process
    current = process.reader
    if current is None:
        return EngineSnapshot((), ReaderStats(), False)
    snap = current.snapshot()
    names = process.instrumented
    sockets = tuple(s for s in snap.sockets if s.name in names)
    return EngineSnapshot(sockets, snap.stats, snap.ready, snap.failure)


def _table() -> ConnectionTable:
    process = _process
    table = process.table
    if table is None:
        with _lock:
            table = process.table
            if table is None:
                table = process.table = ConnectionTable(_instrumented_snapshot)
    return table


def connections_table(
    socket: str | None = None, endpoint: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Who is connected to this application's instrumented sockets: one dict
    per live connection, read from the kernel now, in the schema of the daemon's
    `GET /api/v1/connections` rows (docs/connections.md), ordered by socket, endpoint, fd.

    `socket`, `endpoint`: only that socket's (its `instrument()` name) or that endpoint's
    (its label, as given to bind/connect) connections. `limit`: read at most that many
    (None: every live connection; the count is bounded by the process's open files).

    The daemon's code does the reads (exporter/connections/table.py): each fd from a CONNECTED or
    ACCEPTED event is verified (addresses, pinned socket inode) before a row is made, so a
    closed or reused fd number is never reported as a connection. A connection that ended
    is gone once its DISCONNECTED is reduced (within the reader's 50 ms coalescing). No
    I/O besides a fixed dozen syscalls per connection on the application's own fds;
    thread-safe; it never touches the sockets themselves."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    page = _table().page(
        None if socket is None else frozenset((socket,)),
        None if endpoint is None else frozenset((endpoint,)),
        limit=sys.maxsize if limit is None else limit,
    )
    return [row.to_json() for row in page.rows]


# The connection metrics' settings of this process (`configure_connections`); None: the
# daemon's defaults. Kept through fork (the child's sampler uses them).
_connection_settings: ConnectionsConfig | None = None


def configure_connections(
    metrics: bool = True,
    sample_interval: float | str = 2.0,
    per_peer: bool = False,
    max_peers_per_endpoint: int = 50,
) -> None:
    """The connection metrics of every registry and meter provider of this
    process, as the daemon's `connections:` section: the six per-endpoint
    `zmq_connection*` families, read from the kernel every `sample_interval` seconds
    (0.1 to 3600, or a duration such as "500ms") by one background thread, started by
    the first scrape that shows an instrumented socket. `per_peer`: the families per
    peer address as well, at most `max_peers_per_endpoint` (1 to 1000) peers per
    endpoint. `metrics=False`: no families and no thread (a running one stops). A bad
    value raises ValueError (the settings stay as they were)."""
    global _connection_settings
    import pydantic

    interval: object = sample_interval
    if isinstance(interval, int | float) and not isinstance(interval, bool):
        interval = f"{float(interval) * 1000:f}ms"  # the config's durations carry a unit
    try:
        settings = ConnectionsConfig.model_validate(
            {
                "metrics": metrics,
                "sample_interval": interval,
                "per_peer": per_peer,
                "max_peers_per_endpoint": max_peers_per_endpoint,
            }
        )
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"configure_connections: {problems}") from None
    with _lock:
        _connection_settings = settings
        sampler = _process.sampler
        if sampler is None:
            return
        if settings.metrics:
            sampler.configure(settings)
        else:
            _process.sampler = None  # no families from the next scrape on
            sampler.stop()


def _connection_sampler() -> ConnectionSampler | None:
    """The process's connection sampler, started on first use; None while the metrics are
    off or no socket is instrumented. Never raises (a scrape must not fail for it)."""
    process = _process
    sampler = process.sampler
    if sampler is not None or not process.instrumented:
        return sampler
    settings = _connection_settings or ConnectionsConfig()
    if not settings.metrics:
        return None
    with _lock:
        process = _process
        if process.sampler is None and (_connection_settings or settings).metrics:
            try:
                sampler = ConnectionSampler(
                    _table(), _instrumented_snapshot, settings, thread_name=SAMPLER_THREAD
                )
                sampler.start()
            except Exception:  # e.g. no thread can be started: no families, no failure
                log.exception("the connection sampler could not start")
                return None
            process.sampler = sampler
        return process.sampler


def _connection_families(key: int) -> Iterator[Metric]:
    """The latest connection sample's families, only the series of the sockets `key` (a
    registry or meter provider) shows; then the sampler's self-metrics and the table's
    refused reads (as the daemon: while the table exists, whoever reads it, sampler or
    `connections_table()`)."""
    names = _process.shown.get(key, frozenset())
    if not names:
        return
    sampler = _connection_sampler()
    if sampler is None:
        table = _process.table
        if table is not None:
            yield reads_gone_family(table)
        return
    latest = sampler.latest
    for family in latest.families if latest is not None else ():
        mine = [s for s in family.samples if s.labels.get("socket") in names]
        if not mine:
            continue
        if len(mine) == len(family.samples):
            yield family
            continue
        out = Metric(family.name, family.documentation, family.type, family.unit)
        out.samples = mine
        yield out
    yield from sampler.self_metrics()
    yield reads_gone_family(_table())


def _counted(key: int) -> list[message_counting.Counted]:
    """The message counts of the counted sockets `key` (a registry or meter provider)
    shows."""
    names = _process.shown.get(key, frozenset())
    return [
        (handle.name, handle.labels, handle.message_counts.values())
        for handle in list(_process.handles.values())
        if handle.message_counts is not None and handle.name in names
    ]


class _LibraryCollector(StateCollector):
    """The socket families, the connection families of its sockets and the reader's and
    sampler's self-metrics, for one registry."""

    def __init__(self, key: int) -> None:
        super().__init__(lambda: _snapshot(key), build_labels())
        self._key = key

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _hide_late(render_sockets(snap.sockets))
        counted = _counted(self._key)
        if counted:
            yield from message_counting.families(counted)
        try:
            connections = list(_hide_late(_connection_families(self._key)))
        except Exception:  # never fail the application's scrape for the connection metrics
            log.exception("the connection metrics failed; served without them")
            connections = []
        yield from connections
        yield from render_self(snap, self._build)

    def describe(self) -> Iterator[Metric]:
        # The families without touching the reader (registering must start nothing).
        yield from render_sockets(())
        yield from render_self(EngineSnapshot((), ReaderStats(), False), self._build)


Points = list[tuple[float, dict[str, str]]]


class _OtelExport:
    """Observable instruments on an application's MeterProvider, one per family the daemon
    pushes over OTLP (same names, units and descriptions). Each callback reads a snapshot;
    a socket's points are rebuilt only when its SocketSnapshot changed."""

    def __init__(self, provider: MeterProvider) -> None:
        self._key = id(provider)
        self._build = build_labels()
        self._cache: dict[str, tuple[SocketSnapshot, dict[int, Points]]] = {}
        self._cache_lock = threading.Lock()  # OTel readers may collect concurrently
        meter = provider.get_meter("zmq-exporter", __version__)
        for slot, family in enumerate(metrics.PUSHED):
            assert family.otel_name is not None
            callback = self._callback(slot)
            if family.type == "counter":
                meter.create_observable_counter(
                    family.otel_name, [callback], family.otel_unit, family.help
                )
            else:
                meter.create_observable_gauge(
                    family.otel_name, [callback], family.otel_unit, family.help
                )
        for index, family in enumerate(metrics.MESSAGE_FAMILIES):
            assert family.otel_name is not None
            meter.create_observable_counter(
                family.otel_name, [self._message_callback(index)], family.otel_unit, family.help
            )

    def _message_callback(self, index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            from opentelemetry.metrics import Observation

            return [
                Observation(values[index], {"socket": name, **labels})
                for name, labels, values in _counted(self._key)
            ]

        return observe

    def _callback(self, slot: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self._observe(slot)

        return observe

    def _observe(self, slot: int) -> list[Observation]:
        from opentelemetry.metrics import Observation

        snap = _snapshot(self._key)
        out = []
        with self._cache_lock:
            cache, fresh = self._cache, {}
            for sock in snap.sockets:
                entry = cache.get(sock.name)
                if entry is None or entry[0] is not sock:
                    entry = (sock, _points(sock))
                fresh[sock.name] = entry
                if slot in _LATE_SLOTS and sock.name in _process.late:
                    continue
                for value, attrs in entry[1].get(slot, ()):
                    out.append(Observation(value, attrs))
            self._cache = fresh
        try:
            connections = list(_hide_late(_connection_families(self._key)))
        except Exception:  # never fail the application's export for the connection metrics
            log.exception("the connection metrics failed; exported without them")
            connections = []
        for family in [*connections, *render_self(snap, self._build)]:
            if metrics.PUSHED_SLOT.get(family.name) == slot:
                out += [Observation(float(s.value), dict(s.labels)) for s in family.samples]
        return out


def _points(sock: SocketSnapshot) -> dict[int, Points]:
    by_slot: dict[int, Points] = {}
    for index, endpoint, extra, value in socket_rows(sock):
        slot = metrics.SOCKET_SLOTS[index]
        by_slot.setdefault(slot, []).append((float(value), row_labels(sock, endpoint, extra)))
    return by_slot
