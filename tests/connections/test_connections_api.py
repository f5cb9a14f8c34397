"""GET /api/v1/connections (issue 18) against a real daemon with real peers: the rows are
the kernel's (peer ports as in the daemon's /proc/PID/net/tcp; clients from known local
ports as `ss -tnp` lists them for the daemon's pid, fd for fd; peer pids of ipc clients),
filters and keyset paging cover every live connection once."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_library_connections import ss_established

from helpers import Daemon, free_port, wait_until

N_TCP = 10
N_IPC = 3


def get(daemon: Daemon, query: str = "") -> Any:
    url = daemon.url + "/api/v1/connections" + (f"?{query}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(resp.read())


def status_of(daemon: Daemon, query: str) -> int:
    try:
        with urllib.request.urlopen(daemon.url + "/api/v1/connections?" + query, timeout=10):
            return 200
    except urllib.error.HTTPError as e:
        return e.code


def peer_ports_in_proc(pid: int, local_port: int) -> set[int]:
    """Remote ports of ESTABLISHED connections to `local_port` in /proc/PID/net/tcp{,6}."""
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == local_port:
                ports.add(int(f[2].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def setup() -> Iterator[tuple[Daemon, int, str, int, zmq.Socket[bytes]]]:
    port, upstream_port = free_port(), free_port()
    ipc_path = Path(tempfile.mkdtemp(prefix="zmq-exporter-conn-")) / "s.ipc"
    ctx = zmq.Context()
    upstream = ctx.socket(zmq.ROUTER)
    upstream.setsockopt(zmq.LINGER, 0)
    upstream.bind(f"tcp://127.0.0.1:{upstream_port}")
    config = f"""
sockets:
  - name: backend
    type: ROUTER
    bind: [tcp://127.0.0.1:{port}]
  - name: local
    type: ROUTER
    bind: [ipc://{ipc_path}]
  - name: upstream
    type: DEALER
    connect: [tcp://127.0.0.1:{upstream_port}]
"""
    try:
        with Daemon(config) as daemon:
            yield daemon, port, str(ipc_path), upstream_port, upstream
    finally:
        upstream.close()
        ctx.term()


def test_rows_match_the_kernel_and_the_peers(
    setup: tuple[Daemon, int, str, int, zmq.Socket[bytes]],
) -> None:
    daemon, port, ipc_path, upstream_port, _ = setup
    assert daemon.proc is not None
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(N_TCP)]
    # ipc peers: separate processes, so SO_PEERCRED names their pids.
    script = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "print('up', flush=True); sys.stdin.read()"
    )
    peers = [
        subprocess.Popen(
            [sys.executable, "-c", script, ipc_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(N_IPC)
    ]
    try:
        for p in peers:
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
        ours = {c.getsockname()[1] for c in clients}

        def complete() -> bool:
            rows = get(daemon, "limit=1000")["connections"]
            return (
                sum(r["socket"] == "backend" for r in rows) == N_TCP
                and sum(r["socket"] == "local" for r in rows) == N_IPC
                and any(r["socket"] == "upstream" and r["ready"] for r in rows)
            )

        wait_until(complete, timeout=15, what="all connections in the table")
        body = get(daemon, "socket=backend")
        rows = body["connections"]
        assert body["total"] == N_TCP and body["next"] is None and body["gone"] == 0
        peer_ports = {int(r["peer_address"].rsplit(":", 1)[1]) for r in rows}
        assert peer_ports == ours == peer_ports_in_proc(daemon.proc.pid, port)
        for r in rows:
            assert (r["role"], r["transport"], r["family"]) == ("bind", "tcp", "ipv4")
            assert r["endpoint"] == f"tcp://127.0.0.1:{port}"
            assert r["local_address"] == f"127.0.0.1:{port}"
            assert r["ready"] is None  # bind endpoints: not known per connection
            assert r["tcp_state"] == "established"
            assert r["rtt_seconds"] > 0 and r["rtt_var_seconds"] >= 0
            assert r["retransmits"] == 0 and r["lost"] == 0
            assert r["send_queue_bytes"] == 0 and r["recv_queue_bytes"] == 0
            assert time.time() - 60 < r["connected_since"] <= time.time()
            assert open_fd_is_socket(daemon.proc.pid, r["fd"])

        ipc = get(daemon, "socket=local")["connections"]
        assert {r["peer_pid"] for r in ipc} == {p.pid for p in peers}
        for r in ipc:
            assert (r["transport"], r["family"], r["local_address"]) == ("ipc", "unix", ipc_path)
            assert r["peer_uid"] == 0 or isinstance(r["peer_uid"], int)
            assert "rtt_seconds" not in r and r["send_queue_bytes"] is not None

        up = get(daemon, f"endpoint=tcp://127.0.0.1:{upstream_port}")["connections"]
        assert len(up) == 1 and up[0]["role"] == "connect" and up[0]["ready"] is True
        assert up[0]["peer_address"] == f"127.0.0.1:{upstream_port}"

        # A client that leaves is gone from the table once its DISCONNECTED is reduced.
        leaving = clients.pop()
        gone_port = leaving.getsockname()[1]
        leaving.close()
        wait_until(
            lambda: all(
                not r["peer_address"].endswith(f":{gone_port}")
                for r in get(daemon, "socket=backend")["connections"]
            ),
            timeout=10,
            what="the closed client left the table",
        )
    finally:
        for c in clients:
            c.close()
        for p in peers:
            p.kill()
            p.wait()


def test_known_local_ports_match_ss_for_the_daemons_pid(
    setup: tuple[Daemon, int, str, int, zmq.Socket[bytes]],
) -> None:
    """10 clients connect from local ports chosen beforehand (bound before connect): the
    table lists exactly those peers, and its rows are the established connections
    `ss -tnp` attributes to the daemon's pid on that port: same addresses, same fd."""
    daemon, port, _, _, _ = setup
    assert daemon.proc is not None
    pid = daemon.proc.pid
    clients = []
    try:
        for _ in range(N_TCP):
            c = socket.socket()
            c.bind(("127.0.0.1", free_port()))
            c.settimeout(5)
            c.connect(("127.0.0.1", port))
            clients.append(c)
        known = {f"127.0.0.1:{c.getsockname()[1]}" for c in clients}
        assert len(known) == N_TCP

        def kernel() -> set[tuple[str, str, int]]:
            return {
                (local, peer, fd)
                for local, peer, _, _, fd in ss_established(pid)
                if local == f"127.0.0.1:{port}"
            }

        def table() -> set[tuple[str, str, int]]:
            body = get(daemon, "socket=backend&limit=1000")
            assert body["gone"] == 0 and body["next"] is None, body
            return {(r["local_address"], r["peer_address"], r["fd"]) for r in body["connections"]}

        wait_until(
            lambda: {peer for _, peer, _ in table()} == known, timeout=15, what="the 10 peers"
        )
        rows, ss_rows, rows_after = table(), kernel(), table()
        assert rows == rows_after, "the table moved while nothing connected or left"
        assert rows == ss_rows, (sorted(rows), sorted(ss_rows))
        assert {peer for _, peer, _ in rows} == known and len(rows) == N_TCP
    finally:
        for c in clients:
            c.close()


def open_fd_is_socket(pid: int, fd: int) -> bool:
    try:
        return str(Path(f"/proc/{pid}/fd/{fd}").readlink()).startswith("socket:")
    except OSError:
        return False


def test_paging_filters_and_limits(
    setup: tuple[Daemon, int, str, int, zmq.Socket[bytes]],
) -> None:
    daemon, port, _, _, _ = setup
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(7)]
    try:
        ours = {f"127.0.0.1:{c.getsockname()[1]}" for c in clients}
        wait_until(
            lambda: get(daemon, "socket=backend")["total"] == 7, timeout=15, what="7 clients"
        )
        seen: list[str] = []
        query = "socket=backend&limit=3"
        for _ in range(5):  # 7 rows by 3: three pages
            body = get(daemon, query)
            assert body["total"] == 7 and len(body["connections"]) <= 3
            seen += [r["peer_address"] for r in body["connections"]]
            if body["next"] is None:
                break
            query = "socket=backend&limit=3&" + urllib.parse.urlencode({"after": body["next"]})
        assert sorted(seen) == sorted(ours)  # each once
        fds = [r["fd"] for r in get(daemon, "socket=backend")["connections"]]
        assert fds == sorted(fds)
        assert get(daemon, "socket=nosuch") == {
            "connections": [],
            "total": 0,
            "next": None,
            "gone": 0,
        }
        assert get(daemon, f"endpoint=tcp://127.0.0.1:{port}")["total"] == 7
        for bad in ("limit=0", "limit=1001", "limit=x", "after=!!!", "after=e30"):
            assert status_of(daemon, bad) == 400, bad
        assert status_of(daemon, "limit=1000") == 200
    finally:
        for c in clients:
            c.close()


class ConnectionTables(HTMLParser):
    """The status page's "Who is connected" tables: id -> rows of cells; and the links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("class") == "connections":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "a":
            self.links.append(a.get("href") or "")
        elif self._table is not None and tag == "tr" and "data-fd" in a:
            self.tables[self._table].append([])
        elif self._table is not None and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_status_page_shows_the_top_connections_per_socket(
    setup: tuple[Daemon, int, str, int, zmq.Socket[bytes]],
) -> None:
    daemon, port, ipc_path, upstream_port, _ = setup
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    unix = socket.socket(socket.AF_UNIX)
    try:
        unix.connect(ipc_path)
        # Every connection read (rows), not only counted: `total` comes from the snapshot
        # without reads, and the status page shows what reads return.
        wait_until(
            lambda: (
                len(get(daemon, "socket=backend")["connections"]) == 12
                and len(get(daemon, "socket=local")["connections"]) == 1
                and len(get(daemon, "socket=upstream")["connections"]) == 1
            ),
            timeout=15,
            what="12 tcp clients, 1 ipc client, the upstream connection",
        )
        with urllib.request.urlopen(daemon.url + "/", timeout=10) as resp:
            page = ConnectionTables()
            page.feed(resp.read().decode())
        ours = {f"127.0.0.1:{c.getsockname()[1]}" for c in clients}
        backend = page.tables["connections-backend"]
        assert len(backend) == 10  # the top 10 of 12
        # Endpoint, Peer, Connected since, RTT (ms), Retransmits, Send-Q, Recv-Q
        assert {r[1] for r in backend} <= ours
        for r in backend:
            assert r[0] == f"tcp://127.0.0.1:{port}" and r[2].endswith(" UTC"), r
            assert float(r[3]) > 0 and r[4:] == ["0", "0", "0"], r
        (local,) = page.tables["connections-local"]
        assert local[1].endswith(f"(pid {os.getpid()})") and local[3:5] == ["-", "-"], local
        (up,) = page.tables["connections-upstream"]
        assert up[1] == f"127.0.0.1:{upstream_port}", up
        for name in ("backend", "local", "upstream"):
            assert f"/api/v1/connections?socket={name}" in page.links
    finally:
        unix.close()
        for c in clients:
            c.close()


def test_churn_while_reading_reports_only_connections_the_generator_had_open(
    setup: tuple[Daemon, int, str, int, zmq.Socket[bytes]],
) -> None:
    """fd reuse through the whole daemon: clients connect and close continuously while the
    API is read (and /metrics scraped, which opens and closes HTTP connections, so fd numbers
    are reused by other sockets). Every established row names a peer port the load generator
    had open during that request; any other row (close_wait: the client closed, libzmq did
    not yet) a port it had opened."""
    daemon, port, _, _, _ = setup
    intervals: dict[int, list[tuple[float, float]]] = {}  # port -> (opened, closed)
    lock = threading.Lock()
    stop = threading.Event()
    inf = float("inf")

    def generate() -> None:
        rng = random.Random(18)
        live: list[tuple[socket.socket, int, int]] = []
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            if len(live) < 30 and (not live or rng.random() < 0.55):
                # Bound and on record before connect(): the daemon can list the connection
                # as soon as the handshake completes, before this thread runs again.
                c = socket.socket()
                c.bind(("127.0.0.1", 0))
                p = c.getsockname()[1]
                with lock:
                    intervals.setdefault(p, []).append((time.monotonic(), inf))
                    index = len(intervals[p]) - 1
                c.settimeout(5)
                c.connect(("127.0.0.1", port))
                live.append((c, p, index))
            else:
                c, p, index = live.pop(rng.randrange(len(live)))
                c.close()
                with lock:
                    intervals[p][index] = (intervals[p][index][0], time.monotonic())
            time.sleep(0.002)
        for c, _, _ in live:
            c.close()

    gen = threading.Thread(target=generate)
    gen.start()
    checked = states = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            rows = get(daemon, "socket=backend&limit=1000")["connections"]
            t1 = time.monotonic()
            with lock:
                snapshot = {p: list(v) for p, v in intervals.items()}
            for r in rows:
                host, _, p_text = r["peer_address"].rpartition(":")
                assert host == "127.0.0.1", r
                spans = snapshot.get(int(p_text), [])
                if r["tcp_state"] == "established":
                    ok = any(o <= t1 and c >= t0 for o, c in spans)
                else:
                    ok = any(o <= t1 for o, _ in spans)
                    states += 1
                assert ok, (r, spans, t0, t1)
                checked += 1
            urllib.request.urlopen(daemon.url + "/metrics", timeout=10).read()
    finally:
        stop.set()
        gen.join(30)
    assert not gen.is_alive()
    print(f"churn: {checked} rows checked ({states} not established), {len(intervals)} ports")
    assert checked > 100 and len(intervals) > 100
