"""One sender process for test_relay_scale.py: 20 instrumented ROUTERs relaying to the
daemon, each accepting a known number of raw TCP connects; prints its tally as JSON, then
holds its sockets (and its relay connection) until stdin closes."""

from __future__ import annotations

import json
import socket
import sys
import time

import zmq

import exporter
from exporter.core.events import Event

SOCKETS = 20


def main() -> None:
    relay, relay_id, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    routers = []  # held: an instrument handle does not keep its socket alive
    handles = []
    ports = []
    for n in range(SOCKETS):
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        handle = exporter.instrument(router, f"s{n}", relay=relay, relay_id=relay_id, registry=None)
        handle.bind("tcp://127.0.0.1:*")
        ports.append(int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]))
        routers.append(router)
        handles.append(handle)
    # A per-(process, socket) count, so a series relayed under the wrong label would show.
    want = [1 + (index + n) % 4 for n in range(SOCKETS)]
    for port, k in zip(ports, want, strict=True):
        for _ in range(k):  # a raw TCP connect is exactly one ACCEPTED
            for attempt in range(20):  # a refused connect (busy machine) is retried, bounded
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    break
                except ConnectionRefusedError:
                    if attempt == 19:
                        raise
                    time.sleep(0.05)

    def accepted(n: int) -> int:
        snap = handles[n].snapshot()
        if snap is None:  # closed: cannot happen while we hold the sockets
            return -1
        return sum(ep.counts.get(Event.ACCEPTED, 0) for ep in snap.endpoints)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(accepted(n) < want[n] for n in range(SOCKETS)):
        time.sleep(0.05)
    # The tally is the monitor's own count (the sender's truth), not what we meant to do.
    print(json.dumps({f"s{n}": accepted(n) for n in range(SOCKETS)}), flush=True)
    sys.stdin.read()  # hold until stdin closes (or we are killed)


if __name__ == "__main__":
    main()
