"""exporter/connections/kernel.py against the kernel: real TCP over loopback, real ZeroMQ sockets
whose fds come from their monitors' CONNECTED/ACCEPTED events, ipc with SO_PEERCRED, and
fd numbers closed or reused by other kinds of files (issue 18)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from exporter.connections.kernel import (
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
from exporter.monitor.sockets import attach_monitor

from helpers import missing_tool, netns_executor
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
        pinned = exp.pinned(first)
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
                got = read_connection(fd, same_exp.pinned(first))
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
        d_exp = d_exp.pinned(d)

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


class Churn:
    """Raw TCP clients opened and closed at random against one port, with the interval
    each local address was open: [before connect(), after close() returned]."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.intervals: dict[str, list[list[float]]] = {}
        self.stop = threading.Event()
        self.opened = 0

    def run(self, seconds: float, pool: int = 16) -> None:
        rng = random.Random(18)
        live: list[tuple[socket.socket, list[float]]] = []
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self.stop.is_set():
                if live and (len(live) >= pool or rng.random() < 0.5):
                    sock, span = live.pop(rng.randrange(len(live)))
                    sock.close()
                    with self.lock:
                        span[1] = time.monotonic()
                    continue
                # Bound first, so the address is on record before the server can see it.
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                host, local_port = sock.getsockname()
                span = [time.monotonic(), math.inf]
                with self.lock:
                    self.intervals.setdefault(f"{host}:{local_port}", []).append(span)
                    self.opened += 1
                sock.settimeout(5)
                sock.connect(("127.0.0.1", self.port))
                live.append((sock, span))
                time.sleep(rng.random() * 0.002)
        finally:
            for sock, span in live:
                sock.close()
                span[1] = time.monotonic()

    def open_during(self, addr: str, t0: float, t1: float) -> bool:
        with self.lock:
            return any(a <= t1 and b >= t0 for a, b in self.intervals.get(addr, ()))


def noise(stop: threading.Event) -> None:
    """Files this process opens and closes meanwhile (an HTTP client's socket, a pipe, a
    unix socket): they take the fd numbers libzmq frees."""
    other = socket.create_server(("127.0.0.1", 0))
    other.setblocking(False)
    try:
        while not stop.is_set():
            c = socket.create_connection(other.getsockname(), timeout=5)
            r, w = os.pipe()
            a, b = socket.socketpair()
            time.sleep(0.001)
            with contextlib.suppress(BlockingIOError):
                other.accept()[0].close()
            for s in (c, a, b):
                s.close()
            os.close(r)
            os.close(w)
    finally:
        other.close()


def test_churn_never_reports_a_connection_that_is_not_open(ctx: Ctx) -> None:
    """A reader fed by a ROUTER's ACCEPTED/DISCONNECTED events reads every fd it believes
    live, continuously, while raw TCP clients churn and the process opens other files that
    reuse the freed numbers. Entries stay 50 ms after DISCONNECTED (the engine coalesces
    events that long). Every connection reported is one whose peer address the load
    generator had open while it was read; stale entries read as Gone."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    bind_exp = Expected.for_endpoint(endpoint, "bind")
    churn = Churn(port)
    stop_noise = threading.Event()
    with monitored(ctx, zmq.ROUTER, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED) as (
        router,
        mon,
    ):
        router.bind(endpoint)
        threads = [
            threading.Thread(target=churn.run, args=(2.0,), daemon=True),
            threading.Thread(target=noise, args=(stop_noise,), daemon=True),
        ]
        for t in threads:
            t.start()
        live: dict[int, Expected] = {}
        ending: dict[int, float] = {}  # fd -> when its DISCONNECTED arrived
        reported = 0
        gone: dict[str, int] = {}
        bad: list[tuple[str, str | None]] = []
        end = time.monotonic() + 10
        try:
            while threads[0].is_alive() and time.monotonic() < end:
                for _ in range(1000):  # drain what is there, bounded
                    try:
                        frames = mon.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    event, value = struct.unpack_from("<HI", frames[0])
                    if event == zmq.EVENT_ACCEPTED:
                        live[value] = bind_exp
                        ending.pop(value, None)
                    elif value in live:
                        ending.setdefault(value, time.monotonic())
                now = time.monotonic()
                for fd in [fd for fd, t in ending.items() if now - t > 0.05]:
                    live.pop(fd, None)
                    del ending[fd]
                for fd, exp in list(live.items()):
                    t0 = time.monotonic()
                    info = read_connection(fd, exp)
                    t1 = time.monotonic()
                    if isinstance(info, Gone):
                        gone[info.reason] = gone.get(info.reason, 0) + 1
                        continue
                    reported += 1
                    if exp.inode is None:
                        live[fd] = exp.pinned(info)
                    state = info.tcp.state_name if info.tcp else None
                    # A peer that closed leaves our side in close_wait until libzmq reads
                    # the EOF: still our connection (the row's tcp_state says so), so such
                    # a row need only name a peer that was opened before the read ended.
                    since = t0 if state == "established" else 0.0
                    if not churn.open_during(info.peer_address, since, t1):
                        bad.append((info.peer_address, state))
        finally:
            churn.stop.set()
            stop_noise.set()
            for t in threads:
                t.join(10)
    assert not bad, bad[:10]
    assert churn.opened > 200 and reported > 200, (churn.opened, reported)
    assert sum(gone.values()) > 0, f"the stale entries were never read ({gone}): no race was run"


def test_ipv6_and_ipv4_mapped_addresses() -> None:
    # Plain IPv6 over ::1.
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("::1", port), timeout=5) as client:
            info = connected(
                read_connection(
                    client.fileno(), Expected.for_endpoint(f"tcp://[::1]:{port}", "connect")
                )
            )
            assert info.family == "ipv6" and info.peer_address == f"[::1]:{port}"
            wrong = Expected.for_endpoint(f"tcp://[::2]:{port}", "connect")
            got = read_connection(client.fileno(), wrong)
            assert isinstance(got, Gone) and got.reason == "address_mismatch"
    # A dual-stack listener (tcp://*:port with ZMQ_IPV6) sees IPv4 peers as ::ffff:a.b.c.d;
    # an IPv4 literal endpoint still matches them.
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = server.accept()
            with accepted:
                exp = Expected.for_endpoint(f"tcp://*:{port}", "bind")
                info = connected(read_connection(accepted.fileno(), exp))
                assert info.local_address == f"[::ffff:127.0.0.1]:{port}"
                exp4 = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "bind")
                assert connected(read_connection(accepted.fileno(), exp4)).inode == info.inode


def test_pinned_read_skips_addresses_but_not_the_end_of_the_connection() -> None:
    with tcp_pair() as (client, server, port):
        exp = Expected.for_endpoint(f"tcp://127.0.0.1:{port}", "bind")
        first = connected(read_connection(server.fileno(), exp))
        pinned = exp.pinned(first)
        again = connected(read_connection(server.fileno(), pinned))
        assert (again.local_address, again.peer_address, again.inode) == (
            first.local_address,
            first.peer_address,
            first.inode,
        )
        # Both sides shut down: the socket is still open here, its connection is not.
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)

        def ended() -> Gone | None:
            got = read_connection(server.fileno(), pinned)
            return got if isinstance(got, Gone) else None

        gone = wait_until(ended, timeout=5, what="the pinned read sees the connection end")
        assert gone is not None and gone.reason == "not_connected"


def sh(*cmd: str, stdin: str | None = None) -> str:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=15)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def lossy_ns() -> Iterator[tuple[str, int, int]]:
    """A network namespace of the test's own whose loopback drops 30% of the packets to
    one port (`lossy`) and none to another (`clean`): (namespace, lossy, clean)."""
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("ss", "iproute2")):
        if shutil.which(tool) is None:
            missing_tool(f"`{tool}` ({package}, tests/system-packages.txt)")
    if os.geteuid() != 0:
        missing_tool("root (network namespaces)")
    ns = f"zxconn{os.getpid()}"
    lossy, clean = 24001, 24002  # inside the namespace nothing else listens
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # On input, not output: a packet netfilter drops on output fails the sender's
        # transmit, and the kernel counts no retransmission for a failed transmit
        # (measured: bytes_sent grew, total_retrans stayed 0). On input the send succeeded
        # and the segment is lost on the way, as on a real lossy path.
        rules = f"""table inet zxconn {{
            chain lossy {{ type filter hook input priority 0; policy accept;
                tcp dport {lossy} numgen random mod 100 < 30 drop
            }}
        }}"""
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)
        yield ns, lossy, clean
    finally:
        # Deleting the namespace removes its rules with it; retried, bounded, because one
        # run here left a namespace behind.
        for _ in range(20):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            if not Path("/run/netns", ns).exists():
                break
            time.sleep(0.1)


def test_retransmits_rise_on_the_lossy_connection_only(lossy_ns: tuple[str, int, int]) -> None:
    ns, lossy, clean = lossy_ns

    def open_pair(port: int) -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", port)) as server:
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            accepted, _ = server.accept()
        return client, accepted

    # Sockets belong to the namespace they were created in, whichever thread uses them.
    with netns_executor(ns) as inside:
        pairs = {port: inside.submit(open_pair, port).result(10) for port in (lossy, clean)}
    try:
        exp = {p: Expected.for_endpoint(f"tcp://127.0.0.1:{p}", "connect") for p in pairs}
        for _client, accepted in pairs.values():
            accepted.settimeout(10)

        def retransmitted() -> ConnectionInfo | None:
            for client, accepted in pairs.values():  # traffic on both, alike
                client.sendall(b"m" * 1000)
                got = 0
                while got < 1000:
                    got += len(accepted.recv(1000 - got))
            info = connected(read_connection(pairs[lossy][0].fileno(), exp[lossy]))
            assert info.tcp is not None and info.tcp.total_retrans is not None
            return info if info.tcp.total_retrans >= 3 else None

        lossy_info = wait_until(retransmitted, timeout=30, interval=0, what="retransmits")
        assert lossy_info is not None
        clean_info = connected(read_connection(pairs[clean][0].fileno(), exp[clean]))
        assert clean_info.tcp is not None and clean_info.tcp.total_retrans == 0
        assert clean_info.to_json()["retransmits"] == 0

        # The same total as ss's `retrans:current/total` for that connection.
        client = pairs[lossy][0]
        cport = client.getsockname()[1]
        out = sh("ip", "netns", "exec", ns, "ss", "-tinH", "state", "established",
                 f"( sport = :{cport} and dport = :{lossy} )")  # fmt: skip
        m = re.search(r"\bretrans:\d+/(\d+)", out)
        assert m, out
        now = connected(read_connection(client.fileno(), exp[lossy]))
        assert now.to_json()["retransmits"] == int(m.group(1)), (out, now)
    finally:
        for client, accepted in pairs.values():
            client.close()
            accepted.close()
