"""Library mode's connection table (issue 18): `exporter.connections_table()` and
`Instrumentation.connections()` read an application's own instrumented sockets' live
connections through the daemon's ConnectionTable, in the rows of /api/v1/connections.

Real sockets; the peers are other processes where the kernel must tell them apart (ss's
Send-Q of a stopped reader, SO_PEERCRED of an ipc peer, `ss -tnp` filtered to this pid).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_connections import Churn, noise

import exporter
from exporter import library

from helpers import ROOT, missing_tool
from testkit import free_port, wait_until

Ctx = zmq.Context[zmq.Socket[bytes]]
Row = dict[str, Any]

_SS_PROCESS = re.compile(r"pid=(\d+),fd=(\d+)")


def ss_established(pid: int) -> list[tuple[str, str, int, int, int]]:
    """(local, peer, Recv-Q, Send-Q, fd) of each established TCP connection that process
    `pid` holds, from `ss -tnpH state established` (the kernel's socket table, its owners
    from /proc/PID/fd)."""
    ss = shutil.which("ss")
    if ss is None:
        missing_tool("ss (iproute2)")
        raise AssertionError("unreachable")
    out = subprocess.run(
        [ss, "-tnpH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        for owner, fd in _SS_PROCESS.findall(" ".join(f[4:])):
            if int(owner) == pid:
                found.append((f[2], f[3], int(f[0]), int(f[1]), int(fd)))
    return found


@contextlib.contextmanager
def peer_process(code: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A peer in a process of its own running `code`; yields it and its first line (it
    prints one when ready). Killed (SIGCONT first, in case it is stopped) at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # the peer's timeout: this test's deadline
        assert line, f"peer exited with {proc.poll()}"
        yield proc, line
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)


# A reader that can be stopped: a PULL with small buffers, reading as fast as it can.
SLOW_READER = """
import sys, zmq
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
pull.setsockopt(zmq.RCVBUF, 65536)
pull.setsockopt(zmq.RCVHWM, 2)
print(pull.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    pull.recv()
"""


def only(rows: list[Row]) -> Row:
    assert len(rows) == 1, rows
    return rows[0]


def test_send_queue_of_a_stopped_reader_grows_and_equals_ss(ctx: Ctx) -> None:
    """The issue's slow consumer: an application's PUSH sends to a peer process that stops
    reading (SIGSTOP). The row's send_queue_bytes grows from 0 and equals ss's Send-Q for
    the same connection (matched by both addresses and by fd); it drains once the peer
    reads again."""
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 4)
    push.setsockopt(zmq.SNDBUF, 131072)
    handle = exporter.instrument(push, "lc-push", registry=None)
    try:
        with peer_process(SLOW_READER) as (peer, port_text):
            endpoint = f"tcp://127.0.0.1:{port_text}"
            handle.connect(endpoint)
            row = wait_until(
                lambda: [r for r in handle.connections() if r["ready"]],
                timeout=10,
                what="the PUSH's connection in the table, handshake done",
            )[0]
            assert (row["socket"], row["endpoint"], row["role"]) == ("lc-push", endpoint, "connect")
            assert row["peer_address"] == f"127.0.0.1:{port_text}"
            local, fd = row["local_address"], row["fd"]
            payload = b"q" * 65536
            for _ in range(8):  # the peer reads: nothing stays queued
                push.send(payload)
            wait_until(
                lambda: only(handle.connections())["send_queue_bytes"] == 0,
                timeout=10,
                what="a reading peer leaves the send queue empty",
            )

            os.kill(peer.pid, signal.SIGSTOP)
            # Send until the PUSH stays unwritable for 1 s: its pipe (HWM 4), our send
            # buffer and the stopped peer's receive window are then all full. Stopping at
            # the first EAGAIN was a race: the pipe fills before libzmq's I/O thread has
            # written anything, and a loopback peer acknowledges what fits its window, so
            # Send-Q could still be 0.
            offered = 0
            give_up = time.monotonic() + 30
            while push.poll(1000, zmq.POLLOUT):
                if time.monotonic() > give_up:
                    raise AssertionError(f"the PUSH took {offered} messages: the peer reads")
                with contextlib.suppress(zmq.Again):
                    push.send(payload, zmq.NOBLOCK)
                    offered += 1

            def settled_and_equal_to_ss() -> tuple[Row, int] | None:
                before = only(handle.connections())
                mine = [r for r in ss_established(os.getpid()) if r[:2] == (local, endpoint[6:])]
                after = only(handle.connections())
                if len(mine) != 1 or before["send_queue_bytes"] != after["send_queue_bytes"]:
                    return None
                _, _, _, send_q, ss_fd = mine[0]
                assert ss_fd == fd == after["fd"], (mine, after)
                full = send_q == after["send_queue_bytes"] and send_q > 65536
                return (after, send_q) if full else None

            settled = wait_until(
                settled_and_equal_to_ss,
                timeout=15,
                interval=0.05,
                what="send_queue_bytes stable and equal to ss's Send-Q",
            )
            assert settled is not None
            stopped, ss_send_q = settled
            print(f"stopped reader: {offered} messages offered, Send-Q {ss_send_q} bytes")
            assert stopped["send_queue_bytes"] == ss_send_q > 65536  # more than a message
            assert stopped["local_address"] == local and stopped["tcp_state"] == "established"
            assert stopped["rtt_seconds"] > 0

            os.kill(peer.pid, signal.SIGCONT)
            wait_until(
                lambda: only(handle.connections())["send_queue_bytes"] == 0,
                timeout=15,
                what="the send queue drains once the peer reads again",
            )
    finally:
        handle.close()
        push.close(linger=0)


# Peers of an application: `tcp` DEALERs to its ROUTER's tcp port, `ipc` DEALERs to its
# ipc path, and a ROUTER (its port printed) for the application's DEALER to connect to.
PEERS = """
import sys, zmq
tcp_port, ipc_path, tcp, ipc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
dealers = []
for i in range(tcp + ipc):
    d = ctx.socket(zmq.DEALER)
    d.connect(f"tcp://127.0.0.1:{tcp_port}" if i < tcp else f"ipc://{ipc_path}")
    dealers.append(d)
print(port, flush=True)
sys.stdin.read()
"""


def test_rows_are_exactly_the_live_connections_ss_shows_for_this_process(ctx: Ctx) -> None:
    """An application's ROUTER (bound on tcp and ipc) and DEALER (connected), peers in
    another process: the tcp rows are exactly the established connections `ss -tnp` lists
    for this pid on those ports, fd for fd; the ipc rows name the peer process's pid. When
    the handle is closed, or the socket is, or the peers leave, the rows are gone."""
    n_tcp, n_ipc = 10, 2
    ipc_path = Path(tempfile.mkdtemp(prefix="zmq-exporter-lc-")) / "app.ipc"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    h_router = exporter.instrument(router, "lc-router", registry=None)
    h_dealer = exporter.instrument(dealer, "lc-dealer", registry=None)
    port = free_port()
    bind_tcp, bind_ipc = f"tcp://127.0.0.1:{port}", f"ipc://{ipc_path}"
    try:
        h_router.bind(bind_tcp)
        h_router.bind(bind_ipc)
        args = (str(port), str(ipc_path), str(n_tcp), str(n_ipc))
        with peer_process(PEERS, *args) as (peer, peer_port):
            connect = f"tcp://127.0.0.1:{peer_port}"
            h_dealer.connect(connect)

            def complete() -> bool:
                rows = exporter.connections_table()
                mine = [r for r in rows if r["socket"] in ("lc-router", "lc-dealer")]
                return (
                    sum(r["endpoint"] == bind_tcp for r in mine) == n_tcp
                    and sum(r["endpoint"] == bind_ipc for r in mine) == n_ipc
                    and any(r["endpoint"] == connect and r["ready"] for r in mine)
                )

            wait_until(complete, timeout=15, what="every connection in the table")
            rows = exporter.connections_table(socket="lc-router") + h_dealer.connections()
            kernel = {
                (local, peer_addr, fd)
                for local, peer_addr, _, _, fd in ss_established(os.getpid())
                if local == f"127.0.0.1:{port}" or peer_addr == f"127.0.0.1:{peer_port}"
            }
            tcp_rows = [r for r in rows if r["transport"] == "tcp"]
            assert {(r["local_address"], r["peer_address"], r["fd"]) for r in tcp_rows} == kernel
            assert len(kernel) == n_tcp + 1
            for r in tcp_rows:
                assert r["tcp_state"] == "established" and r["rtt_seconds"] > 0, r
                assert r["role"] == ("connect" if r["socket"] == "lc-dealer" else "bind"), r
            ipc_rows = [r for r in rows if r["transport"] == "ipc"]
            assert len(ipc_rows) == n_ipc
            for r in ipc_rows:
                assert (r["endpoint"], r["local_address"]) == (bind_ipc, str(ipc_path)), r
                assert r["peer_pid"] == peer.pid and r["peer_uid"] == os.getuid(), r
            # The filters: by socket (the handle's own rows), by endpoint label.
            assert [r["endpoint"] for r in h_dealer.connections()] == [connect]
            assert len(exporter.connections_table(endpoint=bind_ipc)) == n_ipc
            assert len(exporter.connections_table("lc-router", bind_tcp, limit=3)) == 3
            assert exporter.connections_table(socket="lc-nosuch") == []
            with pytest.raises(ValueError):
                exporter.connections_table(limit=0)

            # Closing the handle: its socket's rows are gone at once (connections still up).
            h_dealer.close()
            assert h_dealer.connections() == []
            assert exporter.connections_table(socket="lc-dealer") == []
            assert [r for r in ss_established(os.getpid()) if r[1] == f"127.0.0.1:{peer_port}"]

            # The peers leave (their process is killed): the kernel closes their ends, the
            # ROUTER's DISCONNECTEDs empty its table, and ss agrees.
            peer.kill()
            peer.wait(10)
            wait_until(
                lambda: exporter.connections_table(socket="lc-router") == [],
                timeout=10,
                what="the peers' connections leave the table",
            )
            assert not [r for r in ss_established(os.getpid()) if r[0] == f"127.0.0.1:{port}"]
    finally:
        h_dealer.close()
        h_router.close()
        router.close(linger=0)
        dealer.close(linger=0)


def test_rows_are_gone_when_the_socket_is_closed_without_close(ctx: Ctx) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(router, "lc-closed", registry=None)
    peers = []
    try:
        handle.bind("tcp://127.0.0.1:*")
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        for _ in range(3):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(endpoint)
            peers.append(d)
        # The DEALERs are this process's own, so filter: the ROUTER's rows only.
        wait_until(lambda: len(handle.connections()) == 3, timeout=10, what="3 connections")
        router.close(linger=0)  # without handle.close(): MONITOR_STOPPED clears the table
        wait_until(
            lambda: handle.connections() == [] and exporter.connections_table("lc-closed") == [],
            timeout=10,
            what="a closed socket's rows leave the table",
        )
    finally:
        handle.close()
        for d in peers:
            d.close(linger=0)
        router.close(linger=0)


def test_churn_while_reading_reports_only_connections_the_generator_had_open(ctx: Ctx) -> None:
    """fd reuse in the application's process: raw TCP clients connect and close at random
    against an instrumented ROUTER while this process opens other files that take the
    freed fd numbers, and two threads read the table continuously (through
    `connections_table` and through the handle). Every established row names a client
    address the generator had open during that read; any other row (close_wait: the
    client closed, libzmq did not yet) one it had opened."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(router, "lc-churn", registry=None)
    port = free_port()
    churn = Churn(port)
    stop_noise = threading.Event()
    threads = [
        threading.Thread(target=churn.run, args=(2.5,), daemon=True),
        threading.Thread(target=noise, args=(stop_noise,), daemon=True),
    ]
    reported = {"function": 0, "handle": 0}
    bad: list[tuple[str, str, str]] = []

    def read_while_churning(how: str) -> None:
        end = time.monotonic() + 10
        while threads[0].is_alive() and time.monotonic() < end:
            t0 = time.monotonic()
            if how == "function":
                rows = exporter.connections_table(socket="lc-churn")
            else:
                rows = handle.connections()
            t1 = time.monotonic()
            for r in rows:
                established = r["tcp_state"] == "established"
                if not churn.open_during(r["peer_address"], t0 if established else 0.0, t1):
                    bad.append((how, r["peer_address"], r["tcp_state"]))
                reported[how] += 1

    second = threading.Thread(target=read_while_churning, args=("handle",), daemon=True)
    try:
        handle.bind(f"tcp://127.0.0.1:{port}")
        for t in threads:
            t.start()
        second.start()
        read_while_churning("function")
    finally:
        churn.stop.set()
        stop_noise.set()
        for t in [*threads, second]:
            t.join(15)
        handle.close()
        router.close(linger=0)
    assert not second.is_alive()
    table = library._process.table
    gone = table.gone_counts() if table is not None else {}
    print(f"churn: rows {reported}, {churn.opened} opened, reads refused {gone}")
    assert not bad, bad[:10]
    assert churn.opened > 200 and min(reported.values()) > 100, (churn.opened, reported)
    assert exporter.connections_table(socket="lc-churn") == []
