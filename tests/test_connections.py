"""exporter/connections.py against the kernel: real TCP over loopback, real ZeroMQ sockets
whose fds come from their monitors' CONNECTED/ACCEPTED events, ipc with SO_PEERCRED, and
fd numbers closed or reused by other kinds of files (issue 18)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from exporter.connections import (
    TCP_INFO_LEN,
    ConnectionInfo,
    Expected,
    Gone,
    TcpInfo,
    parse_tcp_info,
    read_connection,
    summarize,
    summarize_by,
)
from exporter.sockets import attach_monitor

from testkit import free_port, wait_until

Ctx = zmq.Context[zmq.Socket[bytes]]


def connected(info: ConnectionInfo | Gone) -> ConnectionInfo:
    assert isinstance(info, ConnectionInfo), info
    return info


@contextlib.contextmanager
def tcp_pair(
    sndbuf: int | None = None, rcvbuf: int | None = None
) -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """(client, accepted server side, port) over loopback; the buffers set before connect
    so that the window is small from the start."""
    port = free_port()
    with socket.socket() as listener:
        if rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        client = socket.socket()
        if sndbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        client.settimeout(5)
        client.connect(("127.0.0.1", port))
        server, _ = listener.accept()
    with client, server:
        yield client, server, port


def ss_row(local_port: int, peer_port: int) -> str:
    """`ss -tin` for one connection: the header line (queues) and the info line joined."""
    ss = shutil.which("ss")
    assert ss, "ss (iproute2) is needed: the kernel's reference for queues and RTT"
    out = subprocess.run(
        [
            ss,
            "-tinH",
            "state",
            "established",
            f"( sport = :{local_port} and dport = :{peer_port} )",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return " ".join(out.split())


def test_tcp_loopback_queues_match_what_was_sent_and_ss() -> None:
    # A non-reading peer with small buffers: the sender's send queue fills, the kernel
    # accepts what fits in both buffers and refuses the rest (EAGAIN).
    with tcp_pair(sndbuf=16384, rcvbuf=16384) as (client, server, port):
        client.setblocking(False)
        sent = 0
        chunk = b"x" * 4096
        for _ in range(10_000):  # bounded: the buffers hold far less than 40 MB
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                break
        else:
            raise AssertionError("the kernel never refused a send")
        cport = client.getsockname()[1]
        c_exp = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "connect")
        s_exp = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "bind")

        # Every byte is either unacknowledged at the sender or unread at the receiver; the
        # identity holds once the last ACK is in (loopback: at once, but wait for it).
        def settled() -> tuple[ConnectionInfo, ConnectionInfo] | None:
            c = connected(read_connection(client.fileno(), c_exp))
            s = connected(read_connection(server.fileno(), s_exp))
            assert c.send_queue_bytes is not None and s.recv_queue_bytes is not None
            return (c, s) if c.send_queue_bytes + s.recv_queue_bytes == sent else None

        pair = wait_until(settled, timeout=5, what="sendq + peer recvq == bytes sent")
        assert pair is not None
        c, s = pair
        assert c.send_queue_bytes and c.send_queue_bytes > 0, c
        assert s.recv_queue_bytes and s.recv_queue_bytes > 0, s
        assert c.recv_queue_bytes == 0 and s.send_queue_bytes == 0
        assert c.local_address == f"127.0.0.1:{cport}" and c.peer_address == f"127.0.0.1:{port}"
        assert s.local_address == c.peer_address and s.peer_address == c.local_address
        assert c.family == "ipv4" and c.transport == "tcp"
        assert c.tcp is not None and c.tcp.state_name == "established"
        assert c.rtt_seconds is not None and c.rtt_seconds > 0
        assert c.rtt_var_seconds is not None and c.rtt_var_seconds > 0
        assert c.tcp.bytes_acked is not None and c.tcp.bytes_acked > 0

        # The same figures as ss's for this connection: Send-Q exactly, RTT within
        # sampling (no traffic moves now, so the smoothed RTT does not change).
        row = ss_row(cport, port)
        m = re.match(r"(\d+) (\d+) \S+ \S+ .*\brtt:([\d.]+)/([\d.]+)", row)
        assert m, row
        c_now = connected(read_connection(client.fileno(), c_exp))
        assert int(m.group(2)) == c_now.send_queue_bytes, row
        assert int(m.group(1)) == c_now.recv_queue_bytes, row
        assert c_now.rtt_seconds is not None
        assert abs(float(m.group(3)) / 1e3 - c_now.rtt_seconds) < 0.005, (row, c_now)

        # Reading the peer drains both: the sender's queue goes to 0 once acknowledged.
        server.settimeout(5)
        got = 0
        while got < sent:
            got += len(server.recv(65536))

        def drained() -> bool:
            return connected(read_connection(client.fileno(), c_exp)).send_queue_bytes == 0

        wait_until(drained, timeout=5, what="send queue drained")


def test_reading_does_not_disturb_the_fd_and_leaks_nothing() -> None:
    with tcp_pair() as (client, server, port):
        fd = client.fileno()
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        exp = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "connect")
        wrong = Expected("ipc")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(500):
            connected(read_connection(fd, exp))
            assert isinstance(read_connection(fd, wrong), Gone)
            assert isinstance(read_connection(1_000_000, exp), Gone)  # EBADF path
            assert isinstance(read_connection(0, exp), Gone)  # not a socket (stdin)
        assert len(os.listdir("/proc/self/fd")) == before
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
        # Still the same working connection in both directions.
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        server.sendall(b"pong")
        assert client.recv(4) == b"pong"


def high_fd() -> int:
    """An fd number far above what the test process uses, so no other thread (libzmq's
    I/O threads open fds too) takes it between close and reuse in these tests."""
    with socket.socket() as s:
        fd = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 900)
    os.close(fd)
    return fd


def test_closed_fd_is_gone() -> None:
    fd = high_fd()
    with tcp_pair() as (client, _server, port):
        os.dup2(client.fileno(), fd)
        exp = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "connect")
        assert connected(read_connection(fd, exp)).peer_address == f"127.0.0.1:{port}"
        os.close(fd)
        gone = read_connection(fd, exp)
        assert gone == Gone(fd, "closed", errno.EBADF)


def test_reused_fd_number_is_never_misreported() -> None:
    """The fd number of a connection, closed and reused by each kind of file this process
    might open meanwhile: nothing of the newcomer is reported as the connection."""
    fd = high_fd()
    with tcp_pair() as (client, _server, port), tcp_pair() as (other, _o_server, other_port):
        exp = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "connect")
        os.dup2(client.fileno(), fd)
        first = connected(read_connection(fd, exp))
        pinned = exp.pinned(first.inode)
        assert connected(read_connection(fd, pinned)).inode == first.inode

        r, w = os.pipe()
        a, b = socket.socketpair()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.connect(("127.0.0.1", port))  # a UDP "connection" to the very same address
        v6 = socket.socket(socket.AF_INET6)
        listener = socket.socket()
        listener.bind(("127.0.0.1", free_port()))
        listener.listen(1)
        try:
            cases: list[tuple[int, Expected, str]] = [
                (r, exp, "not_socket"),
                (a.fileno(), exp, "wrong_kind"),  # AF_UNIX where tcp was expected
                (udp.fileno(), exp, "wrong_kind"),
                (v6.fileno(), exp, "not_connected"),  # right family, no peer
                (listener.fileno(), exp, "not_connected"),
                (other.fileno(), exp, "address_mismatch"),  # an HTTP client, say
                (client.fileno(), Expected("ipc"), "wrong_kind"),
            ]
            for src, expected, reason in cases:
                os.dup2(src, fd)  # atomically: the number now names the newcomer
                got = read_connection(fd, expected)
                assert isinstance(got, Gone) and got.reason == reason, (src, got)
            # Another connection to the very same endpoint: only the pin tells it apart.
            with tcp_pair() as (same, _s, _p):
                same_exp = Expected.for_endpoint(f"tcp://127.0.0.1:{_p}", "connect")
                first_same = connected(read_connection(same.fileno(), same_exp))
                os.dup2(same.fileno(), fd)
                assert connected(read_connection(fd, same_exp)).inode == first_same.inode
                got = read_connection(fd, same_exp.pinned(first.inode))
                assert isinstance(got, Gone) and got.reason == "reused", got
            # An ipc endpoint's fd reused by a tcp connection: wrong kind again.
            os.dup2(other.fileno(), fd)
            got = read_connection(fd, Expected.for_endpoint("ipc:///tmp/x.ipc", "bind"))
            assert isinstance(got, Gone) and got.reason == "wrong_kind"
            assert other_port != port
        finally:
            for s in (a, b, udp, v6, listener):
                s.close()
            os.close(r)
            os.close(w)
            os.close(fd)


def next_event(monitor: zmq.Socket[bytes], wanted: int, timeout: float = 5.0) -> tuple[int, str]:
    """(value, endpoint) of the next event `wanted` on a monitor PAIR; others skipped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not monitor.poll(int(left * 1000) + 1):
            break
        frames = monitor.recv_multipart()
        event, value = struct.unpack_from("<HI", frames[0])
        if event == wanted:
            return value, frames[1].decode()
    raise AssertionError(f"no event {wanted} within {timeout}s")


@contextlib.contextmanager
def monitored(
    ctx: Ctx, kind: int, mask: int
) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    mon = attach_monitor(ctx, sock, mask)
    try:
        yield sock, mon
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)


def test_zmq_router_dealer_fds_from_monitor_events(ctx: Ctx) -> None:
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    with (
        monitored(ctx, zmq.ROUTER, zmq.EVENT_ACCEPTED) as (router, r_mon),
        monitored(ctx, zmq.DEALER, zmq.EVENT_CONNECTED) as (dealer, d_mon),
    ):
        # A slow consumer: the router takes one message into its pipe and reads no more,
        # so the dealer's kernel send queue is where the backlog shows.
        router.setsockopt(zmq.RCVHWM, 1)
        router.setsockopt(zmq.RCVBUF, 16384)
        dealer.setsockopt(zmq.SNDBUF, 16384)
        router.bind(endpoint)
        dealer.connect(endpoint)
        r_fd, r_ep = next_event(r_mon, zmq.EVENT_ACCEPTED)
        d_fd, d_ep = next_event(d_mon, zmq.EVENT_CONNECTED)
        assert r_ep == d_ep == endpoint
        r_exp = Expected.for_endpoint(r_ep, "bind")
        d_exp = Expected.for_endpoint(d_ep, "connect")
        r = connected(read_connection(r_fd, r_exp))
        d = connected(read_connection(d_fd, d_exp))
        assert r.local_address == d.peer_address == f"127.0.0.1:{port}"
        assert r.peer_address == d.local_address
        assert d.tcp is not None and d.tcp.state_name == "established"
        d_exp = d_exp.pinned(d.inode)

        payload = b"p" * 65536
        for _ in range(64):  # 4 MB offered; far more than the buffers and HWMs hold
            try:
                dealer.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                break

        def backlog() -> ConnectionInfo | None:
            now = connected(read_connection(d_fd, d_exp))
            return now if (now.send_queue_bytes or 0) > 0 else None

        slow = wait_until(backlog, timeout=5, what="dealer's kernel send queue grows")
        assert slow is not None
        assert slow.rtt_seconds is not None and slow.rtt_seconds > 0
        summary = summarize([slow, connected(read_connection(r_fd, r_exp))])
        assert summary.connections == 2
        assert summary.send_queue_max_bytes == slow.send_queue_bytes
        assert summary.rtt_max_seconds is not None and summary.rtt_max_seconds > 0


@pytest.mark.parametrize("abstract", [False, True])
def test_zmq_ipc_peer_credentials(ctx: Ctx, abstract: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            f"@zmq-exporter-test-{os.getpid()}-{time.monotonic_ns()}"
            if abstract
            else str(Path(tmp) / "s.ipc")
        )
        endpoint = f"ipc://{path}"
        with (
            monitored(ctx, zmq.ROUTER, zmq.EVENT_ACCEPTED) as (router, r_mon),
            monitored(ctx, zmq.DEALER, zmq.EVENT_CONNECTED) as (dealer, d_mon),
        ):
            router.bind(endpoint)
            dealer.connect(endpoint)
            r_fd, r_ep = next_event(r_mon, zmq.EVENT_ACCEPTED)
            d_fd, d_ep = next_event(d_mon, zmq.EVENT_CONNECTED)
            r = connected(read_connection(r_fd, Expected.for_endpoint(r_ep, "bind")))
            d = connected(read_connection(d_fd, Expected.for_endpoint(d_ep, "connect")))
            for info in (r, d):
                assert info.transport == "ipc" and info.family == "unix"
                assert info.peer_pid == os.getpid()
                assert info.peer_uid == os.getuid() and info.peer_gid == os.getgid()
                assert info.tcp is None and info.rtt_seconds is None
                assert info.send_queue_bytes is not None and info.recv_queue_bytes is not None
            assert r.local_address == path and d.peer_address == path
            row = r.to_json()
            assert row["peer_pid"] == os.getpid() and "rtt_seconds" not in row
            # A tcp expectation never accepts the ipc connection, and the other way round.
            assert isinstance(read_connection(r_fd, Expected("tcp")), Gone)
            other = Expected.for_endpoint(endpoint + "-other", "bind")
            got = read_connection(r_fd, other)
            assert isinstance(got, Gone) and got.reason == "address_mismatch"


def test_short_tcp_info_answers_parse_what_they_cover() -> None:
    """An older kernel returns a shorter struct: the fields it covers, None for the rest.
    The kernel copies min(its size, the length asked), so asking short is that answer."""
    with tcp_pair() as (client, _server, _port):
        full = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        assert len(full) == TCP_INFO_LEN
        old = parse_tcp_info(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104))
        assert old.state == 1 and old.rtt_us and old.total_retrans == 0
        assert old.bytes_acked is None and old.min_rtt_us is None and old.bytes_sent is None
        tiny = parse_tcp_info(full[:8])
        assert tiny.state == 1 and tiny.rtt_us is None
        assert parse_tcp_info(b"") == TcpInfo()


def conn(
    rtt_us: int | None, sendq: int | None, recvq: int | None, retransmits: int = 0, ca: int = 0
) -> ConnectionInfo:
    tcp = None if rtt_us is None else TcpInfo(rtt_us=rtt_us, retransmits=retransmits, ca_state=ca)
    return ConnectionInfo(3, "tcp", "ipv4", 1, "a", "b", sendq, recvq, tcp)


def test_summarize_per_endpoint() -> None:
    rows = [
        conn(100, 10, 1),
        conn(300, 50, None, retransmits=2),
        conn(200, None, 4, ca=1),  # disorder: nothing resent, not retransmitting
        conn(400, 5, 0, ca=3),  # recovery
        conn(None, 7, 7),  # ipc: queues only
    ]
    s = summarize(rows)
    assert s.connections == 5
    assert s.rtt_max_seconds == pytest.approx(400e-6)
    assert s.rtt_avg_seconds == pytest.approx(250e-6)
    assert s.retransmitting == 2
    assert (s.send_queue_bytes, s.recv_queue_bytes, s.send_queue_max_bytes) == (72, 12, 50)
    empty = summarize([conn(None, 0, 0)])
    assert empty.rtt_max_seconds is None and empty.rtt_avg_seconds is None
    by = summarize_by([("a", rows[0]), ("b", rows[1]), ("a", rows[3])])
    assert by["a"].connections == 2 and by["b"].retransmitting == 1


def test_endpoint_expectations() -> None:
    e = Expected.for_endpoint("tcp://10.0.0.1;[::1]:5555", "connect")
    assert (e.peer_host, e.peer_port, e.local_port) == ("::1", 5555, None)
    e = Expected.for_endpoint("tcp://*:5555", "bind")
    assert (e.local_host, e.local_port) == (None, 5555)
    e = Expected.for_endpoint("tcp://0.0.0.0:5555", "bind")
    assert e.local_host is None
    e = Expected.for_endpoint("tcp://localhost:5555", "connect")
    assert (e.peer_host, e.peer_port) == (None, 5555)
    with pytest.raises(ValueError):
        Expected.for_endpoint("inproc://x", "bind")
