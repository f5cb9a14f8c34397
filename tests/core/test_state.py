"""The reducer, without a network: every event type and every sequence measured in
docs/monitor-facts.md."""

from __future__ import annotations

import errno

import pytest

from exporter.core.endpoints import SOCKET_WIDE, UNMAPPED, EndpointMap
from exporter.core.events import Event
from exporter.core.state import EndpointSnapshot, SocketState, apply_event, snapshot_socket

E = Event
BIND = "tcp://127.0.0.1:5555"
CONNECT = "tcp://localhost:5556"


def make(binds: tuple[str, ...] = (BIND,), connects: tuple[str, ...] = ()) -> SocketState:
    return SocketState("s", "ROUTER", {"team": "x"}, EndpointMap(binds, connects))


def feed(sock: SocketState, *events: tuple[Event | int, int, str]) -> None:
    for index, (event, value, endpoint) in enumerate(events):
        apply_event(sock, int(event), value, endpoint, float(index))


def ep(sock: SocketState, label: str) -> EndpointSnapshot:
    return {e.endpoint: e for e in snapshot_socket(sock).endpoints}[label]


def test_initial_series_exist_at_zero_by_role() -> None:
    sock = make(connects=(CONNECT,))
    bind, conn = ep(sock, BIND), ep(sock, CONNECT)
    assert bind.counts == {
        e: 0 for e in (E.LISTENING, E.ACCEPTED, E.CLOSED, E.DISCONNECTED, E.HANDSHAKE_SUCCEEDED)
    }
    assert conn.counts == {
        e: 0
        for e in (
            E.CONNECTED,
            E.CONNECT_DELAYED,
            E.CONNECT_RETRIED,
            E.CLOSED,
            E.DISCONNECTED,
            E.HANDSHAKE_SUCCEEDED,
        )
    }
    assert (bind.connections, bind.listening, bind.role) == (0, False, "bind")
    assert (conn.connections, conn.reconnect_interval_ms, conn.role) == (0, 0, "connect")


@pytest.mark.parametrize("event", list(Event))
def test_every_event_type_is_counted_once(event: Event) -> None:
    sock = make()
    endpoint = "" if event is E.MONITOR_STOPPED else BIND
    feed(sock, (event, 7, endpoint))
    snap = snapshot_socket(sock)
    label = SOCKET_WIDE if event is E.MONITOR_STOPPED else BIND
    row = {e.endpoint: e for e in snap.endpoints}[label]
    if event in (E.BIND_FAILED, E.ACCEPT_FAILED, E.CLOSE_FAILED):
        assert row.errno_counts == {(event, errno.errorcode[7]): 1}
    elif event.name.startswith("HANDSHAKE_FAILED"):
        assert sum(row.handshake_failures.values()) == 1
    else:
        assert row.counts[event] == 1
    assert row.last_event is event
    assert snap.events == 1


def test_router_side_of_dealer_connect_then_close() -> None:
    # LISTENING ACCEPTED HANDSHAKE_SUCCEEDED DISCONNECTED; own close: CLOSED MONITOR_STOPPED
    sock = make()
    feed(sock, (E.LISTENING, 10, BIND), (E.ACCEPTED, 11, BIND), (E.HANDSHAKE_SUCCEEDED, 0, BIND))
    row = ep(sock, BIND)
    assert (row.connections, row.listening) == (1, True)
    feed(sock, (E.DISCONNECTED, 11, BIND))
    row = ep(sock, BIND)
    assert (row.connections, row.listening, row.counts[E.DISCONNECTED]) == (0, True, 1)
    feed(sock, (E.CLOSED, 10, BIND), (E.MONITOR_STOPPED, 0, ""))
    row = ep(sock, BIND)
    assert (row.connections, row.listening, row.counts[E.CLOSED]) == (0, False, 1)
    assert ep(sock, SOCKET_WIDE).counts[E.MONITOR_STOPPED] == 1


def test_dealer_side_own_close_clears_live_connections() -> None:
    # CONNECT_DELAYED(115) CONNECTED HANDSHAKE_SUCCEEDED, own close: MONITOR_STOPPED only.
    sock = make(binds=(), connects=(CONNECT,))
    feed(
        sock,
        (E.CONNECT_DELAYED, 115, CONNECT),
        (E.CONNECTED, 12, CONNECT),
        (E.HANDSHAKE_SUCCEEDED, 0, CONNECT),
    )
    assert ep(sock, CONNECT).connections == 1
    feed(sock, (E.MONITOR_STOPPED, 0, ""))
    assert ep(sock, CONNECT).connections == 0  # no DISCONNECTED came, the gauge is still right


def test_connect_to_nothing_retries_and_never_goes_negative() -> None:
    # CONNECT_DELAYED(115) CLOSED CONNECT_RETRIED(ms), repeated.
    sock = make(binds=(), connects=(CONNECT,))
    for ivl in (110, 150, 197):
        feed(
            sock,
            (E.CONNECT_DELAYED, 115, CONNECT),
            (E.CLOSED, 13, CONNECT),
            (E.CONNECT_RETRIED, ivl, CONNECT),
        )
    row = ep(sock, CONNECT)
    assert row.counts[E.CONNECT_RETRIED] == 3
    assert row.counts[E.CLOSED] == 3
    assert row.connections == 0  # a naive -1 per CLOSED would say -3
    assert row.reconnect_interval_ms == 197


def test_peer_killed_under_connected_dealer() -> None:
    # DEALER sees DISCONNECTED, then the CONNECT_DELAYED CLOSED CONNECT_RETRIED cycle.
    sock = make(binds=(), connects=(CONNECT,))
    feed(
        sock,
        (E.CONNECTED, 12, CONNECT),
        (E.DISCONNECTED, 12, CONNECT),
        (E.CONNECT_DELAYED, 115, CONNECT),
        (E.CLOSED, 12, CONNECT),
        (E.CONNECT_RETRIED, 100, CONNECT),
    )
    row = ep(sock, CONNECT)
    assert (row.connections, row.counts[E.DISCONNECTED], row.counts[E.CONNECT_RETRIED]) == (0, 1, 1)


def test_raw_tcp_connect_close_is_three_events() -> None:
    # ACCEPTED HANDSHAKE_FAILED_NO_DETAIL(errno) DISCONNECTED
    sock = make()
    for fd in range(20, 120):
        feed(
            sock,
            (E.ACCEPTED, fd, BIND),
            (E.HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET, BIND),
            (E.DISCONNECTED, fd, BIND),
        )
    row = ep(sock, BIND)
    assert row.counts[E.ACCEPTED] == 100
    assert row.counts[E.DISCONNECTED] == 100
    assert row.connections == 0
    assert row.handshake_failures == {("no_detail", "ECONNRESET"): 100}


@pytest.mark.parametrize(
    ("event", "value", "reason", "error"),
    [
        (E.HANDSHAKE_FAILED_PROTOCOL, 0x11000002, "protocol", "zmtp_mechanism_mismatch"),
        (E.HANDSHAKE_FAILED_PROTOCOL, 0x11000001, "protocol", "zmtp_cryptographic"),
        (E.HANDSHAKE_FAILED_PROTOCOL, 0x10000001, "protocol", "zmtp_unexpected_command"),
        (E.HANDSHAKE_FAILED_PROTOCOL, 0x7777, "protocol", "other"),
        (E.HANDSHAKE_FAILED_NO_DETAIL, 104, "no_detail", "ECONNRESET"),  # not ZMTP bytes
        (E.HANDSHAKE_FAILED_NO_DETAIL, 11, "no_detail", "EAGAIN"),  # handshake timeout
        (E.HANDSHAKE_FAILED_NO_DETAIL, 32, "no_detail", "EPIPE"),  # wrong CURVE key, client
        (E.HANDSHAKE_FAILED_NO_DETAIL, 99999, "no_detail", "other"),
        (E.HANDSHAKE_FAILED_AUTH, 400, "auth", "400"),  # rejected by ZAP
        (E.HANDSHAKE_FAILED_AUTH, 300, "auth", "300"),
        (E.HANDSHAKE_FAILED_AUTH, 123, "auth", "other"),
    ],
)
def test_handshake_failures_decode_to_bounded_labels(
    event: Event, value: int, reason: str, error: str
) -> None:
    sock = make()
    feed(sock, (E.ACCEPTED, 5, BIND), (event, value, BIND), (E.DISCONNECTED, 5, BIND))
    assert ep(sock, BIND).handshake_failures == {(reason, error): 1}


def test_bind_failed_takes_the_empty_closed_before_it() -> None:
    # Every failed bind(): CLOSED with empty endpoint, then BIND_FAILED without scheme.
    sock = make(binds=("tcp://*:5555", "ipc:///tmp/x.sock"))
    feed(
        sock,
        (E.CLOSED, 14, ""),
        (E.BIND_FAILED, errno.EADDRINUSE, "*:5555"),
        (E.CLOSED, 14, ""),
        (E.BIND_FAILED, errno.EADDRINUSE, "*:5555"),
    )
    row = ep(sock, "tcp://*:5555")
    assert row.errno_counts == {(E.BIND_FAILED, "EADDRINUSE"): 2}
    assert row.counts[E.CLOSED] == 2
    assert not row.listening
    assert SOCKET_WIDE not in {e.endpoint for e in snapshot_socket(sock).endpoints}
    # ipc: CLOSED names the endpoint, BIND_FAILED names the bare path.
    feed(sock, (E.CLOSED, 16, "ipc:///tmp/x.sock"), (E.BIND_FAILED, errno.ENOENT, "/tmp/x.sock"))
    row = ep(sock, "ipc:///tmp/x.sock")
    assert row.errno_counts == {(E.BIND_FAILED, "ENOENT"): 1}
    assert row.counts[E.CLOSED] == 1


def test_pending_closed_is_hidden_until_resolved_so_counters_never_go_down() -> None:
    sock = make()
    feed(sock, (E.CLOSED, 14, ""))
    assert ep(sock, BIND).counts[E.CLOSED] == 0
    assert SOCKET_WIDE not in {e.endpoint for e in snapshot_socket(sock).endpoints}
    feed(sock, (E.LISTENING, 15, BIND))  # not a BIND_FAILED: the CLOSED is socket-wide
    assert ep(sock, SOCKET_WIDE).counts[E.CLOSED] == 1


def test_resolved_bind_endpoints_map_to_configured() -> None:
    sock = make(binds=("tcp://*:5555", "tcp://127.0.0.1:*"))
    sock.endpoint_map.add_resolved("tcp://0.0.0.0:5555", "tcp://*:5555")
    sock.endpoint_map.add_resolved("tcp://127.0.0.1:40269", "tcp://127.0.0.1:*")
    feed(
        sock,
        (E.LISTENING, 3, "tcp://0.0.0.0:5555"),
        (E.LISTENING, 4, "tcp://127.0.0.1:40269"),
        (E.ACCEPTED, 9, "tcp://127.0.0.1:40269"),
    )
    assert ep(sock, "tcp://*:5555").listening
    assert ep(sock, "tcp://127.0.0.1:*").connections == 1


def test_unbind_closes_listener_but_keeps_connections() -> None:
    sock = make()
    feed(sock, (E.LISTENING, 3, BIND), (E.ACCEPTED, 9, BIND), (E.CLOSED, 3, BIND))
    row = ep(sock, BIND)
    assert (row.listening, row.connections) == (False, 1)


def test_connect_endpoint_drift_localhost_to_ip() -> None:
    # libzmq #4056: DISCONNECTED says tcp://localhost:5556, CONNECT_RETRIED tcp://127.0.0.1:5556
    sock = make(binds=(), connects=(CONNECT,))
    feed(
        sock,
        (E.CONNECTED, 8, CONNECT),
        (E.DISCONNECTED, 8, "tcp://localhost:5556"),
        (E.CONNECT_RETRIED, 100, "tcp://127.0.0.1:5556"),
    )
    row = ep(sock, CONNECT)
    assert (row.counts[E.CONNECT_RETRIED], row.connections) == (1, 0)


def test_ambiguous_or_foreign_endpoints_are_bounded() -> None:
    sock = make(binds=(), connects=("tcp://a:7000", "tcp://b:7000"))
    feed(sock, (E.CONNECT_RETRIED, 100, "tcp://c:7000"), (E.CONNECTED, 4, "tcp://zzz:1"))
    labels = {e.endpoint for e in snapshot_socket(sock).endpoints}
    assert labels == {"tcp://a:7000", "tcp://b:7000", UNMAPPED}
    assert ep(sock, UNMAPPED).connections == 1


def test_disconnect_of_unknown_fd_is_ignored() -> None:
    sock = make()
    feed(sock, (E.DISCONNECTED, 99, BIND), (E.DISCONNECTED, 99, BIND))
    row = ep(sock, BIND)
    assert (row.connections, row.counts[E.DISCONNECTED]) == (0, 2)


def test_unknown_event_ids_are_counted_not_fatal() -> None:
    sock = make()
    feed(sock, (0x8000, 1, BIND), (0x8000, 1, BIND))
    snap = snapshot_socket(sock)
    assert snap.unknown_events == {0x8000: 2}
    assert snap.events == 2


def test_snapshot_is_a_copy() -> None:
    sock = make()
    feed(sock, (E.ACCEPTED, 9, BIND))
    before = snapshot_socket(sock)
    feed(sock, (E.ACCEPTED, 10, BIND))
    row = {e.endpoint: e for e in before.endpoints}[BIND]
    assert (row.counts[E.ACCEPTED], row.connections) == (1, 1)


def test_gauge_equals_live_set_under_random_churn() -> None:
    """Property: whatever the order, connections == number of fds accepted and not yet
    disconnected, and never below zero."""
    import random

    rng = random.Random(1234)
    sock = make()
    live: set[int] = set()
    for _ in range(5000):
        fd = rng.randrange(3, 60)
        kind = rng.choice([E.ACCEPTED, E.DISCONNECTED, E.CLOSED, E.HANDSHAKE_SUCCEEDED])
        if kind is E.ACCEPTED and fd in live:
            continue  # the kernel never hands out a live fd twice
        feed(sock, (kind, fd, BIND))
        if kind is E.ACCEPTED:
            live.add(fd)
        elif kind is E.DISCONNECTED:
            live.discard(fd)
        assert ep(sock, BIND).connections == len(live)


# -- zmq_connection_ready (issue 12) -------------------------------------------------------

# What decides readiness, per the libzmq 4.3.5 source (docs/monitor-facts.md, "Readiness"):
# a new connection starts not ready, a completed handshake makes it ready, and its end
# (DISCONNECTED, a failed handshake, the socket's own close) makes it not ready again.
_NOT_READY = {
    E.CONNECTED,
    E.ACCEPTED,
    E.DISCONNECTED,
    E.HANDSHAKE_FAILED_NO_DETAIL,
    E.HANDSHAKE_FAILED_PROTOCOL,
    E.HANDSHAKE_FAILED_AUTH,
    E.MONITOR_STOPPED,
}


def _ready_rows(sock: SocketState) -> dict[str | None, float]:
    from exporter.render.rows import READY, socket_rows

    return {ep: v for i, ep, _, v in socket_rows(snapshot_socket(sock)) if i == READY}


def test_connection_ready_every_sequence_of_four_events() -> None:
    """Exhaustive: every sequence of up to four events of any type on a connect endpoint
    (and the socket's MONITOR_STOPPED) leaves zmq_connection_ready at 1 exactly when the
    last event that concerns readiness was HANDSHAKE_SUCCEEDED, and the bind endpoint of
    the same socket never gets the row."""
    import itertools

    events = list(Event)
    checked = 0
    for length in range(5):
        for seq in itertools.product(events, repeat=length):
            sock = make(binds=(BIND,), connects=(CONNECT,))
            for t, event in enumerate(seq):
                where = "" if event is E.MONITOR_STOPPED else CONNECT
                apply_event(sock, int(event), 10 + t, where, float(t))
            decisive = [e for e in seq if e in _NOT_READY or e is E.HANDSHAKE_SUCCEEDED]
            want = 1 if decisive and decisive[-1] is E.HANDSHAKE_SUCCEEDED else 0
            assert _ready_rows(sock) == {CONNECT: want}, seq
            checked += 1
    assert checked == sum(len(events) ** n for n in range(5))


def test_connection_ready_along_measured_sequences() -> None:
    sock = make(binds=(), connects=(CONNECT,))
    assert _ready_rows(sock) == {CONNECT: 0}  # from start, at 0
    # DEALER side of a connect: CONNECT_DELAYED(115) CONNECTED HANDSHAKE_SUCCEEDED.
    feed(sock, (E.CONNECT_DELAYED, 115, CONNECT), (E.CONNECTED, 12, CONNECT))
    assert _ready_rows(sock) == {CONNECT: 0}  # TCP up, handshake not done
    feed(sock, (E.HANDSHAKE_SUCCEEDED, 0, CONNECT))
    assert _ready_rows(sock) == {CONNECT: 1}
    # A frozen peer, heartbeat on: the heartbeat times out (DISCONNECTED), the reconnect
    # reaches the peer's kernel (CONNECTED) but the handshake never completes
    # (HANDSHAKE_FAILED_NO_DETAIL EAGAIN after handshake_ivl, then DISCONNECTED).
    feed(sock, (E.DISCONNECTED, 12, CONNECT), (E.CONNECT_RETRIED, 150, CONNECT))
    assert _ready_rows(sock) == {CONNECT: 0}
    feed(sock, (E.CONNECT_DELAYED, 115, CONNECT), (E.CONNECTED, 13, CONNECT))
    snap = ep(sock, CONNECT)
    assert (snap.connections, snap.ready) == (1, False)  # TCP says 1; not ready says why
    feed(sock, (E.HANDSHAKE_FAILED_NO_DETAIL, errno.EAGAIN, CONNECT))
    feed(sock, (E.DISCONNECTED, 13, CONNECT))
    assert _ready_rows(sock) == {CONNECT: 0}
    # The peer resumes: the next connection completes its handshake.
    feed(sock, (E.CONNECTED, 14, CONNECT), (E.HANDSHAKE_SUCCEEDED, 0, CONNECT))
    assert _ready_rows(sock) == {CONNECT: 1}
    # The socket's own close: MONITOR_STOPPED only, no DISCONNECTED.
    feed(sock, (E.MONITOR_STOPPED, 0, ""))
    assert _ready_rows(sock) == {CONNECT: 0}


def test_connection_ready_only_for_connect_endpoints() -> None:
    # A bind endpoint has many connections and HANDSHAKE_SUCCEEDED carries no fd: no row.
    sock = make(binds=(BIND,), connects=())
    feed(sock, (E.ACCEPTED, 9, BIND), (E.HANDSHAKE_SUCCEEDED, 0, BIND))
    assert _ready_rows(sock) == {}
    # Neither the socket-wide row nor an endpoint nobody configured get one.
    other = "tcp://10.0.0.1:1"
    feed(sock, (E.CONNECTED, 10, other), (E.HANDSHAKE_SUCCEEDED, 0, other))
    assert _ready_rows(sock) == {}


# -- live connections with their connected-since time (issue 18) -------------------------


def test_live_connections_carry_fd_and_since_from_the_event_time() -> None:
    sock = make(binds=("tcp://*:5555",), connects=(CONNECT,))
    sock.endpoint_map.add_resolved("tcp://0.0.0.0:5555", "tcp://*:5555")
    apply_event(sock, int(E.ACCEPTED), 12, "tcp://0.0.0.0:5555", 100.5)
    apply_event(sock, int(E.ACCEPTED), 9, "tcp://0.0.0.0:5555", 101.0)
    apply_event(sock, int(E.CONNECTED), 14, CONNECT, 102.0)
    bind = ep(sock, "tcp://*:5555")
    # Sorted by fd; the address is libzmq's (resolved) one, what the kernel reads check.
    assert bind.live == ((9, 101.0), (12, 100.5))
    assert bind.address == "tcp://0.0.0.0:5555"
    assert ep(sock, CONNECT).live == ((14, 102.0),)
    assert ep(sock, CONNECT).address == CONNECT
    apply_event(sock, int(E.DISCONNECTED), 12, "tcp://0.0.0.0:5555", 103.0)
    # A reused number is a new connection: its since is the new event's.
    apply_event(sock, int(E.ACCEPTED), 9, "tcp://0.0.0.0:5555", 104.0)
    bind = ep(sock, "tcp://*:5555")
    assert (bind.live, bind.connections) == (((9, 104.0),), 1)
    apply_event(sock, int(E.MONITOR_STOPPED), 0, "", 105.0)
    assert ep(sock, "tcp://*:5555").live == () and ep(sock, CONNECT).live == ()


def test_live_snapshot_is_a_copy_and_reused_while_idle() -> None:
    sock = make()
    feed(sock, (E.ACCEPTED, 9, BIND))
    before = ep(sock, BIND)
    feed(sock, (E.ACCEPTED, 10, BIND), (E.DISCONNECTED, 9, BIND))
    assert before.live == ((9, 0.0),)
    assert ep(sock, BIND).live == ((10, 0.0),)


def test_live_equals_accepted_not_disconnected_under_random_churn() -> None:
    import random

    rng = random.Random(18)
    sock = make()
    live: dict[int, float] = {}
    for step in range(3000):
        fd = rng.randrange(3, 40)
        kind = rng.choice([E.ACCEPTED, E.DISCONNECTED, E.CLOSED])
        if kind is E.ACCEPTED and fd in live:
            continue
        apply_event(sock, int(kind), fd, BIND, float(step))
        if kind is E.ACCEPTED:
            live[fd] = float(step)
        elif kind is E.DISCONNECTED:
            live.pop(fd, None)
        row = ep(sock, BIND)
        assert row.live == tuple(sorted(live.items())) and row.connections == len(live)
