"""Re-measures the libzmq monitor facts docs/monitor-facts.md relies on, on this machine:

    python -m bench.monitor_facts [--json] [--storm 5000]

Event sequences (connect/close, a port where nothing listens, a failed bind, endpoint
strings, unbind, raw TCP), and the unread-monitor stall against a monitor read through a
PAIR with RCVHWM=0. It uses pyzmq directly, not the exporter, so it measures libzmq.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import struct
import sys
import time
from typing import Any

import zmq

from exporter.core.events import Event

from testkit import LoadGen, established, free_port, poll_until

BACKLOG = 4096
HEAD = struct.Struct("=HI")  # libzmq writes host integers (native order, standard sizes)
Ctx = zmq.Context[zmq.Socket[bytes]]
Sock = zmq.Socket[bytes]
_ids = iter(range(1_000_000))


def name(event_id: int) -> str:
    try:
        return Event(event_id).name
    except ValueError:
        return f"0x{event_id:x}"


def monitored(ctx: Ctx, kind: int, hwm0: bool = True) -> tuple[Sock, Sock]:
    """A socket and the PAIR its monitor publishes on: RCVHWM=0 set before connect (what
    the exporter does), or libzmq's default wiring (`get_monitor_socket()`)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if not hwm0:
        return sock, sock.get_monitor_socket()
    addr = f"inproc://monitor-facts.{next(_ids)}"
    sock.monitor(addr, zmq.EVENT_ALL)
    pair = ctx.socket(zmq.PAIR)
    pair.setsockopt(zmq.RCVHWM, 0)
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(addr)
    return sock, pair


def events(pair: Sock, seconds: float, until: Event | None = None) -> list[tuple[str, int, str]]:
    """(event, value, endpoint) read for `seconds`, or until event `until` arrived."""
    out: list[tuple[str, int, str]] = []
    deadline = time.monotonic() + seconds
    for _ in range(100_000):
        left = deadline - time.monotonic()
        if left <= 0 or not pair.poll(max(1, int(left * 1000))):
            break
        head, endpoint = pair.recv_multipart()
        event_id, value = HEAD.unpack(head)
        out.append((name(event_id), value, endpoint.decode()))
        if until is not None and event_id == until:
            break
    return out


def close(*socks: Sock) -> None:
    for s in socks:
        s.close(linger=0)


def connect_and_close(ctx: Ctx) -> dict[str, Any]:
    """ROUTER binds, DEALER connects and closes, then the ROUTER closes."""
    router, rmon = monitored(ctx, zmq.ROUTER)
    dealer, dmon = monitored(ctx, zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://localhost:{port}")
    router_side = events(rmon, 2, until=Event.HANDSHAKE_SUCCEEDED)
    dealer_side = events(dmon, 2, until=Event.HANDSHAKE_SUCCEEDED)
    dealer.close(linger=0)
    dealer_side += events(dmon, 2, until=Event.MONITOR_STOPPED)
    router_side += events(rmon, 2, until=Event.DISCONNECTED)
    router.close(linger=0)
    router_side += events(rmon, 2, until=Event.MONITOR_STOPPED)
    close(rmon, dmon)
    return {"router": router_side, "dealer": dealer_side}


def dead_port(ctx: Ctx) -> dict[str, Any]:
    """A DEALER connecting (reconnect_ivl 100 ms) to a port where nothing listens."""
    dealer, mon = monitored(ctx, zmq.DEALER)
    dealer.setsockopt(zmq.RECONNECT_IVL, 100)
    dealer.connect(f"tcp://127.0.0.1:{free_port()}")
    stamped: list[tuple[float, str, int]] = []
    deadline = time.monotonic() + 1.5
    for _ in range(10_000):
        got = events(mon, max(0.0, deadline - time.monotonic()), until=Event.CONNECT_RETRIED)
        if not got:
            break
        stamped += [(time.monotonic(), e, v) for e, v, _ in got]
    close(dealer, mon)
    delayed = [t for t, e, _ in stamped if e == "CONNECT_DELAYED"]
    gaps = [round((b - a) * 1000) for a, b in itertools.pairwise(delayed)]
    return {"first": [(e, v) for _, e, v in stamped[:6]], "attempt_gaps_ms": gaps}


def bind_failed(ctx: Ctx) -> dict[str, Any]:
    """bind() to a port another (plain TCP) socket listens on, twice."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    sock, mon = monitored(ctx, zmq.ROUTER)
    errors = []
    for _ in range(2):
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
        except zmq.ZMQError as err:
            errors.append(str(err))
    seen = events(mon, 0.5)
    close(sock, mon)
    holder.close()
    return {"bind_errors": errors, "events": seen}


def endpoint_strings(ctx: Ctx) -> dict[str, Any]:
    """The endpoint frames of LISTENING and CONNECTED against what was configured."""
    wild, wmon = monitored(ctx, zmq.ROUTER)
    port = free_port()
    wild.bind(f"tcp://*:{port}")
    ephemeral, emon = monitored(ctx, zmq.ROUTER)
    ephemeral.bind("tcp://127.0.0.1:*")
    dealer, dmon = monitored(ctx, zmq.DEALER)
    dealer.connect(f"tcp://localhost:{port}")
    out = {
        f"bind tcp://*:{port}": events(wmon, 1, until=Event.LISTENING)[-1][2],
        "bind tcp://127.0.0.1:*": events(emon, 1, until=Event.LISTENING)[-1][2],
        f"connect tcp://localhost:{port}": events(dmon, 1, until=Event.CONNECTED)[-1][2],
    }
    close(wild, ephemeral, dealer, wmon, emon, dmon)
    return out


def unbind(ctx: Ctx) -> dict[str, Any]:
    """unbind() with one accepted connection: what both monitors say within 2 s, what the
    kernel says of the accepted connection, and whether it still carries messages."""
    router, mon = monitored(ctx, zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer, dmon = monitored(ctx, zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    events(mon, 2, until=Event.HANDSHAKE_SUCCEEDED)
    events(dmon, 2, until=Event.HANDSHAKE_SUCCEEDED)
    router.unbind(router.getsockopt_string(zmq.LAST_ENDPOINT))
    seen, peer = events(mon, 2), events(dmon, 0.1)
    dealer.send(b"still there?")
    delivered = bool(router.poll(1000))
    out = {
        "router_events": seen,
        "dealer_events": peer,
        "kernel_established_after": established(port),
        "message_delivered_after": delivered,
    }
    close(router, dealer, mon, dmon)
    return out


def raw_tcp(ctx: Ctx) -> dict[str, Any]:
    """A plain TCP connect + close (no ZMTP) against a ROUTER."""
    router, mon = monitored(ctx, zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    events(mon, 1, until=Event.LISTENING)
    socket.create_connection(("127.0.0.1", port)).close()
    seen = events(mon, 1, until=Event.DISCONNECTED)
    close(router, mon)
    return {"events": seen}


def ping(ctx: Ctx, timeout_ms: int = 1000) -> bool:
    """One message over TCP between two fresh, unmonitored sockets of `ctx`."""
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        b.send(b"ping")
        return bool(a.poll(timeout_ms))
    finally:
        close(a, b)


def drain_count(pair: Sock, quiet_s: float, limit_s: float) -> int:
    count, deadline = 0, time.monotonic() + limit_s
    while time.monotonic() < deadline and pair.poll(int(quiet_s * 1000)):
        pair.recv_multipart()
        count += 1
    return count


def measure(storm_connections: int) -> dict[str, Any]:
    ctx: Ctx = zmq.Context()
    try:
        out: dict[str, Any] = {
            "versions": {"libzmq": zmq.zmq_version(), "pyzmq": zmq.__version__},
            "byteorder": sys.byteorder,
            "connect_and_close": connect_and_close(ctx),
            "dead_port": dead_port(ctx),
            "bind_failed": bind_failed(ctx),
            "endpoint_strings": endpoint_strings(ctx),
            "unbind": unbind(ctx),
            "raw_tcp": raw_tcp(ctx),
        }
    finally:
        ctx.destroy(linger=0)
    out["storm"] = [stall_run(False, storm_connections), stall_run(True, storm_connections)]
    return out


def stall_run(hwm0: bool, connections: int) -> dict[str, Any]:
    """Raw TCP churn against a ROUTER whose monitor nobody reads during the storm; then a
    ping through two other sockets of the same context; then the monitor is read. The
    listen backlog is 4096, so the kernel completes connections libzmq no longer accepts:
    a stalled run completes about (connections accepted before the stall) + 4096."""
    ctx: Ctx = zmq.Context()
    router, mon = monitored(ctx, zmq.ROUTER, hwm0)
    router.setsockopt(zmq.BACKLOG, BACKLOG)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    poll_until(lambda: bool(mon.poll(0)), 2)  # LISTENING queued: the monitor is live
    tally = LoadGen(port, connections, deadline=10).tally()
    pinged = ping(ctx)
    read = drain_count(mon, quiet_s=0.5, limit_s=120)  # unblocks a stalled I/O thread too
    late = drain_count(mon, quiet_s=0.5, limit_s=120)
    router.disable_monitor()
    close(router, mon)
    ctx.term()
    return {
        "wiring": "own PAIR, RCVHWM=0" if hwm0 else "get_monitor_socket(), default HWM",
        "connections_asked": connections,
        "completed_within_10s": tally.completed,
        "accepted_before_stall_at_most": tally.completed - BACKLOG if not hwm0 else None,
        "ping_through_same_context_after_storm": pinged,
        "events_read_afterwards": read + late,
        "events_expected_if_none_lost": 1 + 3 * tally.completed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true")
    p.add_argument("--storm", type=int, default=5000, help="connections per stall run")
    args = p.parse_args()
    out = measure(args.storm)
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        for key, value in out.items():
            print(f"{key}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
