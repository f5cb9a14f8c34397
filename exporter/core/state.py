"""The pure reducer: monitor events in, exact counters and gauges out.

No sockets, no clocks, no locks: callers pass the time and serialise access. Everything
the renderers (Prometheus, OTLP, status page) show is read from a `Snapshot` of this state.

Two traps shape it (measured in docs/monitor-facts.md):
- Live connections are the *set* of live fds per endpoint, never +1/-1 arithmetic:
  CLOSED fires for failed connects and for listeners too, and a socket closed by its own
  application sends MONITOR_STOPPED instead of DISCONNECTED for each connection.
- Endpoints are mapped back to the configured strings (`EndpointMap`).

Readiness (`ready`, zmq_connection_ready) is exact for connect endpoints only: libzmq 4.3.5
gives a connect endpoint one session holding at most one engine (connection) at a time
(`session_base_t::process_attach` asserts `!_engine`; a new connecter starts only from
`engine_error` -> `reconnect`), and emits CONNECTED before that engine's handshake ends, so
HANDSHAKE_SUCCEEDED, which carries no fd, belongs to the last CONNECTED. A bind endpoint has
many connections at once and HANDSHAKE_SUCCEEDED cannot be matched to one of them.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from exporter.core.endpoints import SOCKET_WIDE, UNMAPPED, EndpointMap, Role
from exporter.core.events import (
    ERRNO_EVENTS,
    HANDSHAKE_FAILURES,
    Event,
    errno_name,
    handshake_error,
)
from exporter.core.metrics import initial_counters

# Counters carried by every endpoint of a role, created at 0 before any event happens so
# that rate() and increase() see the first event (client_golang #296). Which ones: the
# metrics table's start rules.
BIND_COUNTERS = initial_counters("bind")
CONNECT_COUNTERS = initial_counters("connect")


@dataclass
class EndpointState:
    role: Role | None  # None: an endpoint label we did not configure (SOCKET_WIDE, UNMAPPED)
    counts: Counter[Event] = field(default_factory=Counter)
    # (event, errno label) for BIND_FAILED / ACCEPT_FAILED / CLOSE_FAILED
    errno_counts: Counter[tuple[Event, str]] = field(default_factory=Counter)
    # (reason, error label) for HANDSHAKE_FAILED_*
    handshake_failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Live connections: fd -> connected-since (the event's `now`; no syscalls here: reading
    # the kernel at event time would double an event's cost, exporter/connections/kernel.py reads
    # at request time).
    live: dict[int, float] = field(default_factory=dict)
    # The endpoint as libzmq names it in ACCEPTED/CONNECTED (a bind's resolved address, so
    # `tcp://*:0` has its port): what exporter/connections/kernel.py checks a fd's addresses
    # against.
    address: str = ""
    listener_fd: int | None = None
    reconnect_interval_ms: int = 0
    # The current connection completed its ZMTP handshake and has not ended (connect
    # endpoints: see the module docstring).
    ready: bool = False
    last_event: Event | None = None
    last_event_time: float = 0.0

    def __post_init__(self) -> None:
        for event in _initial_counters(self.role):
            self.counts[event] = 0

    @property
    def live_fds(self) -> set[int]:
        return set(self.live)


def _initial_counters(role: Role | None) -> tuple[Event, ...]:
    if role == "bind":
        return BIND_COUNTERS
    if role == "connect":
        return CONNECT_COUNTERS
    return ()


@dataclass
class SocketState:
    name: str
    socket_type: str
    labels: dict[str, str]
    endpoint_map: EndpointMap
    endpoints: dict[str, EndpointState] = field(default_factory=dict)
    unknown_events: Counter[int] = field(default_factory=Counter)
    # A failed bind() emits CLOSED with an empty endpoint, then BIND_FAILED naming the
    # endpoint; we hold the CLOSED until the BIND_FAILED tells us where it belongs.
    pending_closed: int = 0
    # Every apply_event() bumps it, and nothing else changes what a snapshot holds:
    # Engine.snapshot() reuses a socket's last SocketSnapshot while it is unchanged.
    events: int = 0

    def __post_init__(self) -> None:
        for configured in self.endpoint_map.binds:
            self.endpoints[configured] = EndpointState("bind")
        for configured in self.endpoint_map.connects:
            self.endpoints.setdefault(configured, EndpointState("connect"))

    def endpoint(self, label: str) -> EndpointState:
        state = self.endpoints.get(label)
        if state is None:
            state = self.endpoints[label] = EndpointState(None)
        return state


# Event ids to members: a dict lookup is ~10x cheaper than `Event(event_id)` on this path.
_EVENT_BY_ID: dict[int, Event] = {int(e): e for e in Event}


def record_bind(sock: SocketState, configured: str, resolved: str) -> None:
    """A bind of `configured` resolved to `resolved` (the socket's LAST_ENDPOINT, or the
    numeric address a host name was resolved to): its events name `resolved`."""
    sock.endpoint_map.add_resolved(resolved, configured)


def apply_event(sock: SocketState, event_id: int, value: int, seen: str, now: float) -> None:
    """Reduce one monitor event of `sock` into its state. It runs once per event, so it
    favours dict lookups and `is` tests over calls."""
    sock.events += 1
    event = _EVENT_BY_ID.get(event_id)
    if event is None:
        # New ids appear between libzmq versions (pyzmq #1180): count, never crash.
        sock.unknown_events[event_id] += 1
        return
    label = sock.endpoint_map.lookup(seen)
    if label is UNMAPPED and sock.endpoint_map.learning:
        label = _learn(sock, seen, event)

    if event is Event.CLOSED and label == SOCKET_WIDE:
        sock.pending_closed += 1
        return
    if sock.pending_closed and event is not Event.BIND_FAILED:
        sock.endpoint(SOCKET_WIDE).counts[Event.CLOSED] += sock.pending_closed
        sock.pending_closed = 0

    if event is Event.MONITOR_STOPPED:
        # The socket closed: its connections and listeners are gone, without
        # DISCONNECTED/CLOSED events for them.
        for state in sock.endpoints.values():
            state.live.clear()
            state.listener_fd = None
            state.ready = False
        label = SOCKET_WIDE

    state = sock.endpoint(label)
    state.counts[event] += 1
    state.last_event = event
    state.last_event_time = now

    if event is Event.ACCEPTED or event is Event.CONNECTED:
        # A repeated fd overwrites: a new connection on a reused number.
        state.live[value] = now
        state.address = seen
        state.ready = False  # a new connection starts its handshake
    elif event is Event.HANDSHAKE_SUCCEEDED:
        state.ready = True
    elif event is Event.DISCONNECTED:
        state.live.pop(value, None)
        state.ready = False
    elif event is Event.LISTENING:
        state.listener_fd = value
    elif event is Event.CLOSED:
        if state.listener_fd == value:
            state.listener_fd = None
    elif event is Event.CONNECT_RETRIED:
        state.reconnect_interval_ms = value
    elif event in HANDSHAKE_FAILURES:
        state.handshake_failures[_handshake_key(event, value)] += 1
        state.ready = False
    elif event in ERRNO_EVENTS:
        state.errno_counts[(event, errno_name(value))] += 1
        if event is Event.BIND_FAILED:
            state.listener_fd = None
            if sock.pending_closed:
                state.counts[Event.CLOSED] += sock.pending_closed
                sock.pending_closed = 0


def forget_connections(sock: SocketState, label: str, fds: list[int]) -> None:
    """Connections of endpoint `label` that ended without a DISCONNECTED event (libzmq
    ends a listener's connections still in their handshake when it is unbound, silently):
    the caller checked with the kernel that each fd is no longer one of them."""
    state = sock.endpoints.get(label)
    if state is None:
        return
    dropped = [fd for fd in fds if state.live.pop(fd, None) is not None]
    if dropped:
        sock.events += 1  # a new snapshot (Reader.snapshot reuses one while this is equal)


# Library mode learns an endpoint's role from the first event that names it (the events
# that open a listener or a connection); other events name endpoints learned already.
_EVENT_ROLE: dict[Event, Role] = {
    Event.LISTENING: "bind",
    Event.BIND_FAILED: "bind",
    Event.ACCEPTED: "bind",
    Event.ACCEPT_FAILED: "bind",
    Event.CONNECTED: "connect",
    Event.CONNECT_DELAYED: "connect",
    Event.CONNECT_RETRIED: "connect",
}


def _learn(sock: SocketState, seen: str, event: Event) -> str:
    role = _EVENT_ROLE.get(event)
    label = sock.endpoint_map.learn(seen, role)
    if label not in sock.endpoints:
        sock.endpoints[label] = EndpointState(None if label == UNMAPPED else role)
    return label


def record_endpoint(
    sock: SocketState, endpoint: str, role: Role, resolved: str | None = None
) -> bool:
    """Library mode: the application binds or connects `endpoint` (the string it gave),
    which gets the series of a configured endpoint from now on; a bind's events name
    `resolved`. False when the socket learned its cap of endpoints already (its events
    then count under `unmapped`)."""
    if not sock.endpoint_map.learning or not sock.endpoint_map.add(endpoint, role):
        return False
    known = sock.endpoints.get(endpoint)
    if known is None or known.role is None:
        state = sock.endpoints[endpoint] = EndpointState(role)
        if known is not None:  # learned from an event of no role: keep what it counted
            state.counts.update(known.counts)
            state.errno_counts.update(known.errno_counts)
            state.handshake_failures.update(known.handshake_failures)
            state.live.update(known.live)
            state.address = known.address
    if resolved is not None and resolved != endpoint:
        sock.endpoint_map.add_resolved(resolved, endpoint)
    return True


@functools.lru_cache(maxsize=1024)
def _handshake_key(event: Event, value: int) -> tuple[str, str]:
    # Bounded: the decoded label set is closed, and (event, value) pairs are few in
    # practice; the cache only saves re-decoding them.
    return HANDSHAKE_FAILURES[event], handshake_error(event, value)


# ---------------------------------------------------------------------------------------
# Snapshots: plain immutable copies taken under the caller's lock and rendered outside it.
# Immutable by convention too (their dicts are never changed once built): the engine hands
# the same object to every reader while a socket is idle, and renderers cache by identity.


@dataclass(frozen=True)
class EndpointSnapshot:
    endpoint: str
    role: Role | None
    counts: dict[Event, int]
    errno_counts: dict[tuple[Event, str], int]
    handshake_failures: dict[tuple[str, str], int]
    connections: int
    listening: bool
    reconnect_interval_ms: int
    last_event: Event | None
    last_event_time: float
    ready: bool = False  # connect endpoints: zmq_connection_ready
    # (fd, connected-since) of each live connection, sorted by fd; empty for relayed sockets.
    live: tuple[tuple[int, float], ...] = ()
    address: str = ""  # EndpointState.address


@dataclass(frozen=True)
class SocketSnapshot:
    name: str
    socket_type: str
    labels: dict[str, str]
    endpoints: tuple[EndpointSnapshot, ...]
    unknown_events: dict[int, int]
    events: int


def snapshot_socket(sock: SocketState) -> SocketSnapshot:
    # A CLOSED still waiting for its BIND_FAILED is left out: showing it socket-wide now
    # and under its endpoint later would make a counter go down.
    return SocketSnapshot(
        name=sock.name,
        socket_type=sock.socket_type,
        labels=sock.labels,
        endpoints=tuple(
            EndpointSnapshot(
                endpoint=label,
                role=state.role,
                counts=dict(state.counts),
                errno_counts=dict(state.errno_counts),
                handshake_failures=dict(state.handshake_failures),
                connections=len(state.live),
                listening=state.listener_fd is not None,
                reconnect_interval_ms=state.reconnect_interval_ms,
                last_event=state.last_event,
                last_event_time=state.last_event_time,
                ready=state.ready,
                live=tuple(sorted(state.live.items())),
                address=state.address,
            )
            for label, state in sock.endpoints.items()
        ),
        unknown_events=dict(sock.unknown_events),
        events=sock.events,
    )


# ---------------------------------------------------------------------------------------
# What the engine around the reducer adds to its snapshot: the reader's own counters and
# the engine's health. Renderers read only these types, never the engine.


@dataclass
class ReaderStats:
    events: int = 0  # monitor events reduced
    wakeups: int = 0  # epoll returns with work
    # Events drained in the current (or last) burst: from the first ready monitor until
    # every monitor is drained again. It is what had queued in libzmq's unbounded monitor
    # pipes while the reader was busy; about 126 bytes of memory each.
    backlog: int = 0
    backlog_max: int = 0
    messages_dropped: int = 0  # inbound application messages read and dropped
    attach_failures: int = 0  # bind()/connect() calls that raised
    # Unexpected exceptions caught in a socket's handler, retry timer or setup: the engine
    # counts them and keeps serving every other socket (see Engine docstring).
    engine_errors: int = 0
    # Times the engine unbound every listener because an accept failed for want of file
    # descriptors or memory (exporter/monitor/engine.py, EXHAUSTED); they are bound again once
    # descriptors are free.
    listener_sheds: int = 0
    # Times the reader gave freed memory back to the kernel after a large burst
    # (exporter/monitor/reader.py, TRIM_BURST).
    memory_trims: int = 0


@dataclass(frozen=True)
class EngineSnapshot:
    sockets: tuple[SocketSnapshot, ...]
    stats: ReaderStats
    ready: bool
    # Why the engine thread ended, if it did: the daemon is then unready and unhealthy and
    # exits non-zero (exporter.cli).
    failure: str | None = None
