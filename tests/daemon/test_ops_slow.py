"""Slow and hostile HTTP clients against a real daemon: clients that never read their
responses, send half a request, or trickle headers (more connections than allowed:
tests/web/test_web_capacity.py).
None of them may delay event processing or the other scrapes."""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from helpers import Daemon, http_get, value
from testkit import free_port, wait_until

# Slow (waits out the header deadline: ~12 s, loaded 2 cores): `tests/run --quick` leaves it out.
pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 10.0  # exporter.web.server.HEADER_TIMEOUT


def router_config(port: int) -> str:
    return textwrap.dedent(f"""\
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{port}]
        """)


def unread_bytes(server_port: int, client_port: int) -> int:
    """Bytes the server has queued but the client has not read (tx_queue in
    /proc/net/tcp of the server's end of the connection)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.rsplit(":", 1)[1], 16) == server_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
        ):
            return int(fields[4].split(":")[0], 16)
    return 0


def timed_scrape(daemon: Daemon) -> float:
    started = time.monotonic()
    http_get(daemon.url + "/metrics", timeout=5)
    return time.monotonic() - started


def test_stalled_clients_do_not_delay_events_or_scrapes(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    port = free_port()
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with Daemon(router_config(port)) as daemon:
        baseline = max(timed_scrape(daemon) for _ in range(10))
        clients: list[socket.socket] = []
        dealers: list[zmq.Socket[bytes]] = []
        stop_trickle = threading.Event()
        trickle_closed_after: list[float] = []

        def trickle() -> None:
            """A slowloris: one header byte every 0.5 s, never the end of the headers."""
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
                started = time.monotonic()
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
                for _ in range(60):  # at most 30 s
                    if stop_trickle.wait(0.5):
                        return
                    try:
                        s.sendall(b"X")
                    except OSError:
                        break
                trickle_closed_after.append(time.monotonic() - started)

        trickler = threading.Thread(target=trickle, daemon=True)
        try:
            # 5 clients that pipeline 300 scrapes and never read a byte.
            never_read = []
            for _ in range(5):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", daemon.port))
                s.sendall(request * 300)
                clients.append(s)
                never_read.append(s.getsockname()[1])
            # 5 clients that send half a request.
            half = []
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                clients.append(s)
                half.append(s)
            half_sent = time.monotonic()
            trickler.start()
            # The server really is stuck writing to the non-readers: their kernel send
            # queues hold data nobody reads.
            wait_until(
                lambda: all(unread_bytes(daemon.port, p) > 0 for p in never_read),
                what="responses queued to clients that never read",
            )

            # Other scrapes answer promptly. A server held by the stalled clients would
            # wait for its header (10 s) or write (30 s) deadlines; the bounds here hold
            # on a loaded 2-core machine and stay far below those.
            latencies = [timed_scrape(daemon) for _ in range(20)]
            assert max(latencies) < 3.0, latencies

            # Events are still counted promptly: 10 new connections seen within 5 s.
            started = time.monotonic()
            for _ in range(10):
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(f"tcp://127.0.0.1:{port}")
                dealers.append(dealer)
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connections", socket="backend") == 10,
                timeout=5.0,
                what="10 connections counted while clients stall",
            )
            event_latency = time.monotonic() - started
            assert all(unread_bytes(daemon.port, p) > 0 for p in never_read)

            # Half requests are cut at the header deadline, not kept for ever.
            for s in half:
                s.settimeout(HEADER_TIMEOUT + 5)
                assert s.recv(1024) == b""  # closed by the server, no response
            half_closed = time.monotonic() - half_sent
            assert half_closed < HEADER_TIMEOUT + 3, half_closed
            trickler.join(HEADER_TIMEOUT + 10)
            assert trickle_closed_after, "the trickling client was never cut off"
            assert trickle_closed_after[0] < HEADER_TIMEOUT + 3, trickle_closed_after
            print(
                f"scrape max {baseline * 1000:.1f} ms alone, {max(latencies) * 1000:.1f} ms "
                f"with 11 stalled clients; 10 connections counted in "
                f"{event_latency * 1000:.0f} ms; half requests cut after {half_closed:.1f} s, "
                f"slowloris after {trickle_closed_after[0]:.1f} s"
            )
        finally:
            stop_trickle.set()
            for s in clients:
                s.close()
            for dealer in dealers:
                dealer.close(linger=0)
            if trickler.is_alive():
                trickler.join(5)
