"""Nobody can lock out the probes: idle and slow HTTP clients, as many as an attacker likes,
must not use up the capacity real requests need. A real daemon under 1,000 idle
connections and a slowloris of 200 (both replenished when the server drops them) still
answers new /metrics scrapes and /-/healthy probes within 1 s (p99), with its descriptors
and threads bounded; a blocked scrape or reload never delays a probe; and the HTTP details
(keep-alive, pipelining, HEAD, 404, 405, 501) behave as they always did."""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import resource
import select
import selectors
import socket
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.registry import CollectorRegistry

from exporter.core.state import EngineSnapshot, ReaderStats
from exporter.monitor.sockets import build_labels
from exporter.render.prometheus import StateCollector
from exporter.web import server as httpserver
from exporter.web.app import MAX_CONNECTIONS, WebApp, WebServer

from helpers import Daemon, bare_web_app, parse_metrics, value
from testkit import free_port, wait_until

# An engine with no sockets, for WebApps tested without one.
NO_SOCKETS = StateCollector(lambda: EngineSnapshot((), ReaderStats(), True), build_labels())

IDLE = 1000
SLOWLORIS = 200
PROBES = 50  # of each kind
CONFIG = textwrap.dedent("""\
    sockets:
      - name: backend
        type: ROUTER
        bind: [tcp://127.0.0.1:{port}]
    """)


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for the attack's sockets in this process (the daemon inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 20000)
    assert want >= IDLE + SLOWLORIS + 500, f"RLIMIT_NOFILE hard limit {hard} is too low"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Attack:
    """`idle` connections that never send a byte and `slow` ones that send a request line
    and then one header byte every 0.5 s, never ending their headers. All are opened in
    one burst; then every connection the server drops is opened again, up to `replenish`
    a second (as a slowloris tool tops up its pool: unbounded, each reconnect would evict
    another connection and the test would measure a connection flood instead). One
    thread, one selector; bounded in connections opened and in time."""

    def __init__(
        self, port: int, idle: int, slow: int, replenish: float = 200.0, max_opened: int = 20000
    ) -> None:
        self.port = port
        self.want = {"idle": idle, "slow": slow}
        self.replenish = replenish
        self.max_opened = max_opened
        self.selector = selectors.DefaultSelector()
        self.live = {"idle": 0, "slow": 0}
        self.next_byte: dict[socket.socket, float] = {}
        self.opened = 0
        self.dropped = 0  # closed by the server
        self.errors = 0  # connects that failed
        self.stop = threading.Event()
        self.filled = threading.Event()  # the initial burst is open
        self.thread = threading.Thread(target=self._run, name="attack", daemon=True)

    def __enter__(self) -> Attack:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "attack thread did not stop"
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()

    def _open(self, kind: str) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            self.errors += 1
            return
        self.opened += 1
        if kind == "slow":
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            self.next_byte[s] = time.monotonic() + 0.5
        s.setblocking(False)
        self.selector.register(s, selectors.EVENT_READ, kind)
        self.live[kind] += 1

    def _drop(self, s: socket.socket, kind: str) -> None:
        self.selector.unregister(s)
        self.next_byte.pop(s, None)
        s.close()
        self.live[kind] -= 1
        self.dropped += 1

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        for kind, count in self.want.items():
            for _ in range(count):
                self._open(kind)
        self.filled.set()
        tokens, last = 0.0, time.monotonic()
        while not self.stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            tokens = min(tokens + (now - last) * self.replenish, self.replenish)
            last = now
            for kind in ("slow", "idle"):
                while self.live[kind] < self.want[kind] and tokens >= 1:
                    if self.opened >= self.max_opened:
                        break
                    self._open(kind)
                    tokens -= 1
            for key, _ in self.selector.select(0.05):
                # Readable: EOF, a reset or an answer. The server let go of it.
                assert isinstance(key.fileobj, socket.socket)
                self._drop(key.fileobj, key.data)
            now = time.monotonic()
            for s, due in list(self.next_byte.items()):
                if due <= now:
                    try:
                        s.send(b"a")
                        self.next_byte[s] = now + 0.5
                    except OSError:
                        self._drop(s, "slow")


def timed(port: int, path: str) -> tuple[float, int]:
    """(seconds, status) of one request on a new connection; (inf, 0) if it failed."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status != 200 or body
        return time.monotonic() - started, response.status
    except (OSError, http.client.HTTPException):
        return math.inf, 0
    finally:
        conn.close()


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@pytest.mark.slow  # 1,200 attacking connections for 10 s of probes
def test_idle_and_slowloris_do_not_lock_out_probes(many_fds: None) -> None:
    with Daemon(CONFIG.format(port=free_port())) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        baseline = [timed(daemon.port, "/metrics")[0] for _ in range(5)]
        fds_before, threads_before = open_fds(pid), threads(pid)
        with Attack(daemon.port, IDLE, SLOWLORIS) as attack:
            assert attack.filled.wait(60), "the attack's connections were not opened in 60 s"
            # The server has worked through the burst: its accept queue drained, so it
            # holds its connection limit and has let go of the rest.
            wait_until(
                lambda: (
                    attack.dropped >= IDLE + SLOWLORIS - MAX_CONNECTIONS
                    and open_fds(pid) >= fds_before + MAX_CONNECTIONS - 10
                ),
                timeout=60,
                what="the attack's burst accepted and the excess evicted",
            )
            fds_peak, threads_peak = open_fds(pid), threads(pid)
            scrapes: list[tuple[float, int]] = []
            probes: list[tuple[float, int]] = []
            for _ in range(PROBES):
                scrapes.append(timed(daemon.port, "/metrics"))
                probes.append(timed(daemon.port, "/-/healthy"))
                fds_peak = max(fds_peak, open_fds(pid))
                threads_peak = max(threads_peak, threads(pid))
                time.sleep(0.2)  # spread over the header deadline: slowloris cut and back
            opened, dropped, errors = attack.opened, attack.dropped, attack.errors
        m = parse_metrics(timed_body(daemon.port))
    scrape_p99 = p99([t for t, _ in scrapes])
    probe_p99 = p99([t for t, _ in probes])
    evicted = value(m, "zmq_exporter_http_requests_rejected_total", reason="too_many_connections")
    print(
        f"\nscrape alone max {max(baseline) * 1000:.1f} ms; under {IDLE} idle + {SLOWLORIS} "
        f"slowloris ({opened} connections opened, {dropped} dropped by the server, "
        f"{errors} connects failed): "
        f"/metrics p99 {scrape_p99 * 1000:.1f} ms, /-/healthy p99 {probe_p99 * 1000:.1f} ms; "
        f"{evicted:.0f} evictions; daemon fds {fds_before} -> {fds_peak}, threads "
        f"{threads_before} -> {threads_peak}"
    )
    assert [s for _, s in scrapes] == [200] * PROBES, scrapes
    assert [s for _, s in probes] == [200] * PROBES, probes
    assert scrape_p99 < 1.0, sorted(scrapes)
    assert probe_p99 < 1.0, sorted(probes)
    # Capacity is taken back from the attackers, and the cost stays bounded: descriptors
    # by MAX_CONNECTIONS (+ the listener, selector, wake-up pair and one being accepted),
    # threads not at all (no thread per connection).
    assert evicted is not None and evicted >= IDLE + SLOWLORIS - MAX_CONNECTIONS
    assert fds_before + MAX_CONNECTIONS - 10 <= fds_peak <= fds_before + MAX_CONNECTIONS + 5, (
        fds_before,
        fds_peak,
    )
    assert threads_peak <= threads_before + 1, (threads_before, threads_peak)


def timed_body(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


# -- blocked handlers do not delay probes (in-process server, real sockets) ----------------


class Blocking:
    """A collector and a reload that block until released: a slow scrape and a reload
    waiting 30 s for the engine, as a real one may."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def collect(self) -> list[object]:
        self.entered.release()
        self.release.wait(30)
        return []

    def reload(self) -> tuple[bool, str]:
        self.entered.release()
        self.release.wait(30)
        return True, "reloaded"


def test_blocked_scrapes_and_reloads_do_not_delay_probes() -> None:
    blocking = Blocking()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(blocking)  # type: ignore[arg-type]
    app = WebApp(
        registry=registry,
        telemetry_path="/metrics",
        is_ready=lambda: True,
        landing_page=lambda: "",
        reload=blocking.reload,
        state=NO_SOCKETS,
    )
    server = WebServer(app, f"127.0.0.1:{free_port()}")
    server.start()
    clients: list[socket.socket] = []
    try:
        # Every scrape slot and the reload worker blocked, more of each queued behind.
        requests = [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"] * (app.max_concurrent_scrapes + 4)
        requests += [b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"] * 4
        for data in requests:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(data)
            clients.append(s)
        for _ in range(app.max_concurrent_scrapes + 1):  # 8 scrapes and one reload
            assert blocking.entered.acquire(timeout=5)
        latencies = []
        for path in ["/-/healthy", "/-/ready"] * 10:
            seconds, status = timed(server.port, path)
            assert status == 200, path
            latencies.append(seconds)
        print(f"\nprobes while 8 scrapes and a reload block: max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 1.0, latencies
        # The 9th concurrent scrape (once a worker frees) is refused by the scrape slots as
        # before; the blocked ones complete once released.
        blocking.release.set()
        answers = []
        for s in clients:
            s.settimeout(10)
            answers.append(s.recv(4096).split(b"\r\n", 1)[0])
        assert set(answers) <= {b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable"}
        assert answers.count(b"HTTP/1.1 200 OK") >= app.max_concurrent_scrapes + 4, answers
    finally:
        blocking.release.set()
        for s in clients:
            s.close()
        server.stop()


def test_unread_responses_are_bounded_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that request a large response and never read it: what the server holds for
    them beyond the kernel's send buffers (up to 4 MiB each here) is bounded by
    MAX_OUTPUT_BYTES (lowered to 16 MiB), the writers stalled longest are closed, and the
    newest response is always delivered."""
    monkeypatch.setattr(httpserver, "MAX_OUTPUT_BYTES", 16 * 1024 * 1024)
    page = "x" * (16 * 1024 * 1024)
    app = WebApp(
        registry=CollectorRegistry(auto_describe=False),
        telemetry_path="/metrics",
        is_ready=lambda: True,
        landing_page=lambda: page,
        reload=lambda: (True, ""),
        state=NO_SOCKETS,
    )
    server = WebServer(app, f"127.0.0.1:{free_port()}")
    server.start()
    clients: list[socket.socket] = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(s)
            # In order: the server is writing this response (its first bytes arrived)
            # before the next request is sent, so the first ones have stalled longest.
            readable, _, _ = select.select([s], [], [], 30)
            assert readable, "the server did not start writing the response in 30 s"

        def rejected() -> float:
            m = parse_metrics(timed_body(server.port))
            got = value(
                m, "zmq_exporter_http_requests_rejected_total", reason="too_many_connections"
            )
            return got or 0.0

        wait_until(lambda: rejected() >= 5, timeout=10, what="stalled writers closed")
        complete = []
        for s in clients:
            s.settimeout(10)
            received = 0
            with contextlib.suppress(OSError):
                while chunk := s.recv(1 << 20):
                    received += len(chunk)
                    if received > len(page):
                        break  # the body is complete (the head is extra)
            complete.append(received > len(page))
        print(f"\n{sum(complete)} of 8 unread 16 MiB responses kept under a 16 MiB budget")
        assert complete[-1], "the newest response must be delivered"
        assert sum(complete) <= 2, complete
    finally:
        for s in clients:
            s.close()
        server.stop()


# -- HTTP behaviour kept ---------------------------------------------------------------


def raw_exchange(port: int, requests: list[bytes]) -> list[bytes]:
    """Send `requests` pipelined on one connection; the complete responses, in order."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(requests))
        buf = b""
        out: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(out) < len(requests) and time.monotonic() < deadline:
            if b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, number = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(number)
                if requests[len(out)].startswith(b"HEAD "):
                    length = 0
                if len(rest) >= length:
                    out.append(head + b"\r\n\r\n" + rest[:length])
                    buf = rest[length:]
                    continue
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return out


def test_http_behaviour_is_kept() -> None:
    with Daemon(CONFIG.format(port=free_port())) as daemon:
        port = daemon.port
        # Keep-alive: three requests on one connection, the socket reused.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            first = conn.getresponse()
            assert first.status == 200 and b"zmq_socket_info" in first.read()
            assert first.getheader("Connection") is None
            sock = conn.sock
            for path in ("/metrics", "/-/ready"):
                conn.request("GET", path)
                response = conn.getresponse()
                assert response.status == 200 and response.read()
                assert conn.sock is sock, "the connection was not kept alive"
            # HEAD: the headers of a GET (Content-Length included), no body.
            conn.request("HEAD", "/metrics")
            head = conn.getresponse()
            assert head.status == 200 and head.read() == b""
            assert int(head.getheader("Content-Length") or 0) > 0
            assert head.getheader("Content-Type", "").startswith("text/plain")
            assert conn.sock is sock
        finally:
            conn.close()
        # 404 and 405 keep the connection; 501 closes it.
        answers = raw_exchange(
            port,
            [
                b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
                b"GET /-/reload HTTP/1.1\r\nHost: x\r\n\r\n",
                b"PUT /-/reload HTTP/1.1\r\nHost: x\r\n\r\n",
                b"HEAD /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n",
                b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
            ],
        )
        status = [int(a.split(b" ", 2)[1]) for a in answers]
        assert status == [404, 405, 405, 405, 200, 200, 501], answers
        assert b"\r\nAllow: GET, HEAD\r\n" in answers[1]
        assert b"\r\nAllow: POST\r\n" in answers[2] and b"\r\nAllow: POST\r\n" in answers[3]
        assert answers[4].endswith(b"\r\n\r\n") and b"Content-Length: 8\r\n" in answers[4]
        assert answers[5].endswith(b"\r\n\r\nHealthy\n")
        # HTTP/1.0 closes unless asked to keep alive. A bad request line is a 400 with a
        # status line (http.server answered "HTTP/0.9" style: an HTML body, no status line).
        old = raw_exchange(port, [b"GET /-/healthy HTTP/1.0\r\n\r\n"])
        assert old[0].startswith(b"HTTP/1.1 200 ") and b"Connection: close" in old[0]
        assert raw_exchange(port, [b"NONSENSE\r\n\r\n"])[0].startswith(b"HTTP/1.1 400 ")
        assert raw_exchange(port, [b"GET / HTTP/2.0\r\n\r\n"])[0].startswith(b"HTTP/1.1 505 ")
        odd = raw_exchange(port, [b"POST /-/reload HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n"])
        assert odd[0].startswith(b"HTTP/1.1 400 ")  # "\xb2" is a digit to str.isdigit
        # Empty lines before a request are ignored (a few: tests/web/test_web_parsing.py).
        # HTTP/1.1 requires a Host header (RFC 9112 3.2).
        ready = raw_exchange(port, [b"\r\n\r\nGET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n"])
        assert ready[0].startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: daemon.proc is not None and daemon.proc.poll() is None)


def test_unhealthy_engine_fails_both_probes() -> None:
    """WebApp.is_healthy (False once the engine thread has died) fails /-/healthy and
    /-/ready; the rest is still served."""
    healthy = threading.Event()
    app = bare_web_app(is_healthy=healthy.is_set)
    server = WebServer(app, f"127.0.0.1:{free_port()}")
    server.start()
    try:
        assert [timed(server.port, p)[1] for p in ("/-/healthy", "/-/ready")] == [503, 503]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().read() == b"Engine stopped\n"
        conn.close()
        assert timed(server.port, "/metrics")[1] == 200
        healthy.set()
        assert [timed(server.port, p)[1] for p in ("/-/healthy", "/-/ready")] == [200, 200]
    finally:
        server.stop()
