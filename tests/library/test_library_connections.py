"""Library mode's connection table (issue 18): `exporter.connections_table()` and
`Instrumentation.connections()` read an application's own instrumented sockets' live
connections through the daemon's ConnectionTable, in the rows of /api/v1/connections.

Real sockets; the peers are other processes where the kernel must tell them apart (ss's
Send-Q of a stopped reader, SO_PEERCRED of an ipc peer, `ss -tnp` filtered to this pid).
"""

from __future__ import annotations

import contextlib
import functools
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
import yaml
import zmq
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from test_connections import Churn, noise
from test_deploy_tools import tool
from test_library import PRELUDE, run_child

import exporter
from exporter import library
from exporter.core import metrics

from helpers import ROOT, Samples, missing_tool, parse_metrics, value
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


# -- the connection metrics of an application's registry --------------------------------

SEND_Q_MAX = "zmq_connection_send_queue_max_bytes"
SLOW_CONSUMER_BYTES = 1048576  # deploy/prometheus/alerts.yml, ZmqSlowConsumer
SAMPLER_THREAD = library.SAMPLER_THREAD
# The six families and the sampler's self-metrics (not zmq_exporter_connection_reads_gone:
# the table's, served as long as the table exists, as the daemon does).
CONNECTION_PREFIXES = (
    "zmq_connection_",
    "zmq_connections_retransmitting",
    "zmq_exporter_connection_sample",
    "zmq_exporter_connection_peers",
)


@pytest.fixture
def fast_sampler() -> Iterator[None]:
    """Samples every 100 ms (the least allowed); afterwards no sampler thread (the next
    scrape starts one), the defaults again."""
    exporter.configure_connections(sample_interval=0.1)
    try:
        yield
    finally:
        stop_sampler()


def stop_sampler() -> None:
    exporter.configure_connections(metrics=False)
    exporter.configure_connections()
    assert library._process.sampler is None and not sampler_threads()


def scrape(registry: CollectorRegistry) -> Samples:
    return parse_metrics(generate_latest(registry).decode())


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == SAMPLER_THREAD]


def test_slow_consumer_send_queue_through_the_registry_exceeds_the_alert_and_equals_ss(
    ctx: Ctx, fast_sampler: None
) -> None:
    """The issue's slow consumer, through /metrics of the application's own registry: an
    instrumented PUSH sends to a peer process that is SIGSTOPped. Its endpoint's
    zmq_connection_send_queue_max_bytes (and _send_queue_bytes) rise past ZmqSlowConsumer's
    1 MiB and equal ss's Send-Q for that connection once it is quiet; back to 0 after
    SIGCONT. SNDBUF is left to the kernel's autotuning (up to tcp_wmem's max, 4 MiB by
    default): an explicit SNDBUF is capped by net.core.wmem_max (208 KiB by default)."""
    registry = CollectorRegistry()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 4)
    handle = exporter.instrument(push, "lcm-push", registry=registry)
    try:
        with peer_process(SLOW_READER) as (peer, port_text):
            endpoint = f"tcp://127.0.0.1:{port_text}"
            labels = {"socket": "lcm-push", "endpoint": endpoint}
            handle.connect(endpoint)
            local = wait_until(
                lambda: [r for r in handle.connections() if r["ready"]],
                timeout=10,
                what="the PUSH's connection, handshake done",
            )[0]["local_address"]
            payload = b"q" * 65536
            for _ in range(8):  # the peer reads: nothing stays queued
                push.send(payload)
            wait_until(
                lambda: (
                    value(scrape(registry), SEND_Q_MAX, **labels) == 0
                    and value(scrape(registry), "zmq_connection_rtt_max_seconds", **labels)
                ),
                timeout=10,
                what="the endpoint's families, the send queue empty",
            )
            assert sampler_threads(), "a scrape started the sampler"

            os.kill(peer.pid, signal.SIGSTOP)
            offered = 0
            give_up = time.monotonic() + 30
            while push.poll(1000, zmq.POLLOUT):  # until unwritable for 1 s (see above)
                if time.monotonic() > give_up:
                    raise AssertionError(f"the PUSH took {offered} messages: the peer reads")
                with contextlib.suppress(zmq.Again):
                    push.send(payload, zmq.NOBLOCK)
                    offered += 1

            def quiet_and_equal_to_ss() -> tuple[float, int] | None:
                before = [r for r in ss_established(os.getpid()) if r[:2] == (local, endpoint[6:])]
                samples = scrape(registry)
                after = [r for r in ss_established(os.getpid()) if r[:2] == (local, endpoint[6:])]
                if len(before) != 1 or before != after:
                    return None
                metric = value(samples, SEND_Q_MAX, **labels)
                summed = value(samples, "zmq_connection_send_queue_bytes", **labels)
                send_q = after[0][3]
                if metric is None or not metric == summed == send_q > SLOW_CONSUMER_BYTES:
                    return None
                return metric, send_q

            found = wait_until(
                quiet_and_equal_to_ss,
                timeout=15,
                interval=0.1,
                what="send_queue_max_bytes > 1 MiB and equal to ss's Send-Q",
            )
            assert found is not None
            metric, send_q = found
            print(
                f"stopped reader: {offered} messages offered, metric {metric:.0f}, Send-Q {send_q}"
            )
            assert metric == send_q > SLOW_CONSUMER_BYTES

            os.kill(peer.pid, signal.SIGCONT)
            wait_until(
                lambda: value(scrape(registry), SEND_Q_MAX, **labels) == 0,
                timeout=15,
                what="the send queue drains once the peer reads again",
            )
    finally:
        handle.close()
        push.close(linger=0)


def test_a_registry_shows_only_its_own_sockets(ctx: Ctx, fast_sampler: None) -> None:
    """Two registries, a bound PULL each with a connected peer: each registry's
    connection families (and nothing else in them) name only its own socket, though one
    sample covers both."""
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    pull_a, pull_b = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    push_a, push_b = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    for s in (pull_a, pull_b, push_a, push_b):
        s.setsockopt(zmq.LINGER, 0)
    h_a = exporter.instrument(pull_a, "lcm-a", registry=reg_a)
    h_b = exporter.instrument(pull_b, "lcm-b", registry=reg_b)
    try:
        port_a, port_b = free_port(), free_port()
        h_a.bind(f"tcp://127.0.0.1:{port_a}")
        h_b.bind(f"tcp://127.0.0.1:{port_b}")
        push_a.connect(f"tcp://127.0.0.1:{port_a}")
        push_b.connect(f"tcp://127.0.0.1:{port_b}")

        def connected(reg: CollectorRegistry, name: str, port: int) -> float | None:
            endpoint = f"tcp://127.0.0.1:{port}"
            rtt = "zmq_connection_rtt_max_seconds"
            return value(scrape(reg), rtt, socket=name, endpoint=endpoint)

        for reg, name, port in ((reg_a, "lcm-a", port_a), (reg_b, "lcm-b", port_b)):
            wait_until(
                functools.partial(connected, reg, name, port),
                timeout=10,
                what=f"{name}'s connection in its registry",
            )
        sampler = library._process.sampler
        assert sampler is not None and sampler.latest is not None
        in_sample = {s.labels["socket"] for f in sampler.latest.families for s in f.samples}
        assert {"lcm-a", "lcm-b"} <= in_sample  # one sample covers both
        for reg, name in ((reg_a, "lcm-a"), (reg_b, "lcm-b")):
            samples = scrape(reg)
            conn = [
                dict(ls)
                for (n, ls) in samples
                if n.startswith("zmq_connection_") or n == "zmq_connections_retransmitting"
            ]
            assert conn and {c["socket"] for c in conn} == {name}, conn
            assert value(samples, "zmq_exporter_connection_sample_errors_total") == 0
            assert value(samples, "zmq_exporter_connection_sample_age_seconds") is not None
            assert (
                value(samples, "zmq_exporter_connection_reads_gone_total", reason="closed")
                is not None
            )
    finally:
        h_a.close()
        h_b.close()


def test_metrics_off_serves_no_families_and_stops_the_sampler(ctx: Ctx) -> None:
    """configure_connections(metrics=False): the registry has no connection family nor
    sampler self-metric, and no sampler thread runs; on again, they are back."""
    registry = CollectorRegistry()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(pull, "lcm-off", registry=registry)
    try:
        handle.bind("tcp://127.0.0.1:*")
        exporter.configure_connections(sample_interval=0.1)
        wait_until(
            lambda: value(scrape(registry), SEND_Q_MAX, socket="lcm-off") == 0,
            timeout=10,
            what="the families while on",
        )
        exporter.configure_connections(metrics=False)
        wait_until(lambda: not sampler_threads(), timeout=5, what="the sampler thread ended")
        for _ in range(3):
            names = {n for n, _ in scrape(registry)}
            served = [n for n in names if n.startswith(CONNECTION_PREFIXES)]
            assert not served, served
        assert library._process.sampler is None and not sampler_threads()
        exporter.configure_connections(sample_interval=0.1)
        wait_until(
            lambda: value(scrape(registry), SEND_Q_MAX, socket="lcm-off") == 0,
            timeout=10,
            what="the families on again",
        )
    finally:
        stop_sampler()
        handle.close()


def test_bad_settings_raise_a_clear_value_error() -> None:
    for kwargs, text in (
        ({"sample_interval": 0.01}, "sample_interval"),
        ({"sample_interval": 7200.0}, "sample_interval"),
        ({"max_peers_per_endpoint": 0}, "max_peers_per_endpoint"),
        ({"max_peers_per_endpoint": 5000}, "max_peers_per_endpoint"),
        ({"metrics": "yes"}, "metrics"),
    ):
        with pytest.raises(ValueError, match=text):
            exporter.configure_connections(**kwargs)
    assert library._connection_settings is None or library._connection_settings.metrics


def test_sampler_starts_on_first_scrape_only_and_fork_leaves_the_child_without_it() -> None:
    """A fresh process: instrumenting starts no sampler, nor does a registry without
    instrumented sockets; the first scrape of the socket's registry does. A forked child
    has no sampler (the parent's thread and object are gone); its scrape of the inherited
    registry shows no connection family until it instruments a socket of its own, then
    only that one."""
    run_child(
        """\
        SAMPLER = library.SAMPLER_THREAD
        def samplers():
            return [t for t in threading.enumerate() if t.name == SAMPLER]
        exporter.configure_connections(sample_interval=0.1)
        ctx = zmq.Context()
        s, h, port = router(ctx, "parent")
        d = dealer(ctx, port)
        time.sleep(0.3)  # a sampler that started on its own would be running now
        assert not samplers() and library._process.sampler is None
        assert not [n for n, _ in parse_metrics(generate_latest(CollectorRegistry()).decode())]
        wait_until(lambda: value(scrape(), "zmq_connection_rtt_max_seconds", socket="parent"))
        assert len(samplers()) == 1
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                assert library._process.sampler is None and not samplers()
                m = scrape()
                assert not [n for n, _ in m if n.startswith("zmq_connection")], m
                assert library._process.sampler is None and not samplers()
                c2 = zmq.Context()
                s2, h2, port2 = router(c2, "child")
                d2 = dealer(c2, port2)
                rtt = "zmq_connection_rtt_max_seconds"
                wait_until(lambda: value(scrape(), rtt, socket="child"))
                assert len(samplers()) == 1
                m = scrape()
                names = {dict(ls)["socket"] for n, ls in m if n.startswith("zmq_connection")}
                assert names == {"child"}, names
                d2.close(); h2.close(); s2.close(); c2.term()
                code = 0
            finally:
                os._exit(code)
        assert child_exit_code(pid) == 0
        assert len(samplers()) == 1  # the parent's goes on
        assert value(scrape(), "zmq_connection_rtt_max_seconds", socket="parent")
        d.close(); h.close(); s.close(); ctx.term()
        print("OK")
        """,
        PRELUDE,
    )


@pytest.mark.slow
def test_slow_consumer_alert_fires_in_a_real_prometheus_scraping_the_application(
    ctx: Ctx, tmp_path: Path
) -> None:
    """ZmqSlowConsumer, as shipped (deploy/prometheus/alerts.yml) but for its window (5m ->
    15s) and `for:` (2m -> FOR), in a real Prometheus scraping the application's own
    registry (prometheus_client.start_http_server on loopback) every second: silent while
    the peer reads; firing, for that socket and endpoint, once a SIGSTOPped peer left
    more than 1 MiB in the PUSH's send queue for the window and `for:`; resolved once the
    peer reads again."""
    from test_deploy_e2e import ALERTS, FOR, SCRAPE_CONFIG, Prometheus, rewrite_for

    tool("prometheus")
    window = "15s"
    doc = yaml.safe_load(rewrite_for(ALERTS.read_text()))
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "ZmqSlowConsumer"]
    assert rule["expr"].count("[5m]") == 1, rule["expr"]
    rule["expr"] = rule["expr"].replace("[5m]", f"[{window}]")
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))

    exporter.configure_connections(sample_interval=0.5)
    registry = CollectorRegistry()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 4)
    handle = exporter.instrument(push, "lcm-slow", registry=registry)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    prom: Prometheus | None = None
    try:
        with peer_process(SLOW_READER) as (peer, port_text):
            endpoint = f"tcp://127.0.0.1:{port_text}"
            handle.connect(endpoint)
            config = yaml.safe_load(SCRAPE_CONFIG.read_text())
            config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            config["rule_files"] = [str(rules)]
            (job,) = config["scrape_configs"]
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
            prom = Prometheus.start(tmp_path, config)
            query = (
                f'zmq_connection_send_queue_max_bytes{{socket="lcm-slow",endpoint="{endpoint}"}}'
            )

            def scraped() -> list[dict[str, Any]]:
                return prom.query(query) if prom else []

            wait_until(scraped, timeout=30, what="Prometheus scraped the application's queue")
            payload = b"q" * 65536
            quiet_until = time.monotonic() + 20  # more than the window and FOR: no alert
            while time.monotonic() < quiet_until:
                push.send(payload)  # the peer reads
                assert prom.alerts("ZmqSlowConsumer") == []
                time.sleep(0.5)

            os.kill(peer.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            offered = 0
            while push.poll(1000, zmq.POLLOUT):  # until unwritable for 1 s
                assert time.monotonic() - stopped < 30, f"the PUSH took {offered} messages"
                with contextlib.suppress(zmq.Again):
                    push.send(payload, zmq.NOBLOCK)
                    offered += 1

            def firing() -> list[dict[str, Any]]:
                assert prom is not None
                return [a for a in prom.alerts("ZmqSlowConsumer") if a["state"] == "firing"]

            (alert,) = wait_until(firing, timeout=90, interval=0.5, what="ZmqSlowConsumer firing")
            took = time.monotonic() - stopped
            print(
                f"\nslow consumer: firing {took:.0f}s after SIGSTOP (window {window}, for: "
                f"{FOR}), send queue {float(alert['value']):.0f} bytes"
            )
            assert alert["labels"]["socket"] == "lcm-slow"
            assert alert["labels"]["endpoint"] == endpoint
            assert alert["labels"]["severity"] == "warning"
            assert float(alert["value"]) > SLOW_CONSUMER_BYTES

            os.kill(peer.pid, signal.SIGCONT)
            wait_until(
                lambda: prom is not None and prom.alerts("ZmqSlowConsumer") == [],
                timeout=30,
                interval=0.5,
                what="ZmqSlowConsumer resolved once the peer reads",
            )
    finally:
        if prom is not None:
            prom.stop()
        server.shutdown()
        server.server_close()
        stop_sampler()
        handle.close()
        push.close(linger=0)


def test_meter_provider_observes_the_connection_families_of_its_own_sockets(
    ctx: Ctx, fast_sampler: None
) -> None:
    """A MeterProvider gets the six families under the daemon's OTLP names
    (metrics.PUSHED), for the sockets instrumented with it only: a socket shown by a
    registry alone (connected too, in the same sample) is not observed."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

    otel = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[otel])
    registry = CollectorRegistry()
    mine, other = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    dealers = [ctx.socket(zmq.DEALER) for _ in range(2)]
    for s in (mine, other, *dealers):
        s.setsockopt(zmq.LINGER, 0)
    h_mine = exporter.instrument(mine, "lco-otel", registry=None, meter_provider=provider)
    h_other = exporter.instrument(other, "lco-reg", registry=registry)
    try:
        port_mine, port_other = free_port(), free_port()
        h_mine.bind(f"tcp://127.0.0.1:{port_mine}")
        h_other.bind(f"tcp://127.0.0.1:{port_other}")
        dealers[0].connect(f"tcp://127.0.0.1:{port_mine}")
        dealers[1].connect(f"tcp://127.0.0.1:{port_other}")
        wait_until(
            lambda: value(scrape(registry), "zmq_connection_rtt_max_seconds", socket="lco-reg"),
            timeout=10,
            what="the registry's socket connected, in a sample",
        )
        names = {f.otel_name: f for f in metrics.CONNECTION_FAMILIES}
        assert all(f in metrics.PUSHED for f in metrics.CONNECTION_FAMILIES)

        def observed() -> dict[str, list[dict[str, Any]]] | None:
            data = otel.get_metrics_data()
            if data is None:
                return None
            got: dict[str, list[dict[str, Any]]] = {}
            for rm in data.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name in names:
                            got[m.name] = [
                                {**dict(p.attributes or {}), "value": p.value}
                                for p in m.data.data_points
                                if isinstance(p, NumberDataPoint)
                            ]
            return got if set(got) == set(names) else None

        got = wait_until(observed, timeout=10, what="the six connection instruments")
        assert got is not None
        for name, points in got.items():
            assert {p["socket"] for p in points} == {"lco-otel"}, (name, points)
            assert {p["endpoint"] for p in points} == {f"tcp://127.0.0.1:{port_mine}"}
        assert got["zmq.connection.rtt.max"][0]["value"] > 0
    finally:
        h_mine.close()
        h_other.close()
        provider.shutdown()
