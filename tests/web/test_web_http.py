"""HTTP details and the exporter-toolkit web flags (issue 14): Go's 400 for plain HTTP on a
TLS port, gzip negotiation per RFC 9110, conflicting Content-Length refused, HTTP/2
request lines answered with a status line, several --web.listen-address, systemd socket
activation (--web.systemd-socket) and --web.max-requests. Real sockets and processes."""

from __future__ import annotations

import gzip
import http.client
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import Pki, make_pki
from prometheus_client.registry import CollectorRegistry

from exporter.core.state import EngineSnapshot, ReaderStats
from exporter.monitor.sockets import build_labels
from exporter.render.prometheus import StateCollector
from exporter.web.app import WebApp, WebServer, accepts_gzip

from helpers import ROOT, Daemon, bare_web_app, parse_metrics, value
from testkit import free_port, wait_until

CONFIG = textwrap.dedent("""\
    sockets:
      - name: backend
        type: ROUTER
        bind: [tcp://127.0.0.1:{port}]
    """)
NO_SOCKETS = StateCollector(lambda: EngineSnapshot((), ReaderStats(), True), build_labels())
GO_400 = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


def raw(port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1") -> bytes:
    """Send `data`, read until the server closes (bounded by `timeout` per read)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks: list[bytes] = []
        for _ in range(10_000):
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.getheader = response.getheader
        self.body = response.read()


def get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        return Answer(conn.getresponse())
    finally:
        conn.close()


@pytest.fixture
def server() -> Iterator[WebServer]:
    app = bare_web_app()
    web = WebServer(app, f"127.0.0.1:{free_port()}")
    web.start()
    yield web
    web.stop()


# -- TLS port, plain HTTP ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_plain_http_on_a_tls_port_gets_gos_400(pki: Pki, tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki.server_cert}\n"
                   f"  key_file: {pki.server_key}\n")  # fmt: skip
    daemon = Daemon(CONFIG.format(port=free_port()), args=[f"--web.config.file={web}"])
    daemon.start(wait_ready=False)
    try:

        def answers() -> bool:
            try:
                return raw(daemon.port, b"GET / HTTP/1.1\r\n\r\n") == GO_400
            except OSError:
                return False

        wait_until(answers, timeout=15, what="the TLS daemon answering")
        for request in (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HEAD /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ):
            assert raw(daemon.port, request) == GO_400, request
    finally:
        assert daemon.stop() == 0


# -- gzip --------------------------------------------------------------------------------

GZIP_CASES = {
    "gzip": True,
    "GZIP": True,  # coding names are case-insensitive
    "Gzip ; Q=0.5": True,
    "x-gzip": True,
    "gzip;q=0": False,
    "gzip;q=0.000": False,
    "identity, gzip;q=0": False,
    "*": True,
    "*;q=0": False,
    "gzip;q=0, *": False,  # named: the wildcard does not apply
    "deflate, br": False,
    "gzipfoo": False,
    "": False,
}


@pytest.mark.parametrize(("header", "expected"), GZIP_CASES.items())
def test_accepts_gzip(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected


def test_gzip_negotiation_over_http(server: WebServer) -> None:
    plain = get(server.port)
    assert plain.getheader("Content-Encoding") is None
    for header, expected in GZIP_CASES.items():
        response = get(server.port, headers={"Accept-Encoding": header})
        assert response.status == 200
        vary = {v.strip().lower() for v in (response.getheader("Vary") or "").split(",")}
        assert "accept-encoding" in vary, header  # caches must key on it, either way
        assert (response.getheader("Content-Encoding") == "gzip") is expected, header
    body = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body.request("GET", "/metrics", headers={"Accept-Encoding": "GZIP"})
    text = gzip.decompress(body.getresponse().read()).decode()
    body.close()
    assert "zmq_exporter_scrapes_total" in text


# -- request framing -----------------------------------------------------------------------


def test_conflicting_content_length_is_refused(server: WebServer) -> None:
    for lengths in (b"Content-Length: 3\r\nContent-Length: 4\r\n", b"Content-Length: 3, 4\r\n"):
        answer = raw(server.port, b"POST /-/reload HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\nabcd")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert b"Connection: close" in answer
    # The same value twice is one length (RFC 9110 8.6): served, the connection kept.
    same = (
        b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = raw(server.port, same)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer


def test_http2_request_lines_get_a_status_line(server: WebServer) -> None:
    for request in (
        b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the h2c prior-knowledge preface
    ):
        answer = raw(server.port, request)
        assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), answer[:80]


# -- several listen addresses ---------------------------------------------------------


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_several_listen_addresses() -> None:
    second = free_port()
    args = [f"--web.listen-address=127.0.0.1:{second}"]
    v6 = free_port() if ipv6_loopback() else None
    if v6 is not None:
        args.append(f"--web.listen-address=[::1]:{v6}")
    with Daemon(CONFIG.format(port=free_port()), args=args) as daemon:
        for port in (daemon.port, second):
            m = parse_metrics(get(port).body.decode())
            assert value(m, "zmq_socket_info", socket="backend") == 1
        if v6 is not None:
            assert raw(v6, b"GET /-/healthy HTTP/1.0\r\n\r\n", host="::1").endswith(b"Healthy\n")
        wait_until(lambda: daemon.logs().count("msg=listening") == len(args) + 1)
        lines = [x for x in daemon.logs().splitlines() if "msg=listening" in x]
        named = [f" address=127.0.0.1:{daemon.port} ", f" address=127.0.0.1:{second} "]
        if v6 is not None:
            named.append(f" address=[::1]:{v6} ")
        for address in named:
            assert sum(address in line for line in lines) == 1, (address, lines)
    # One bad address among good ones: a one-line error, nothing left listening.
    free = free_port()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        proc = run_daemon(
            [f"--web.listen-address=127.0.0.1:{free}", f"--web.listen-address=127.0.0.1:{busy}"]
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("zmq-exporter: cannot listen on 127.0.0.1:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def run_daemon(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = Path(os.environ.get("TMPDIR", "/tmp")) / f"zmq-exporter-http-{os.getpid()}.yml"
    config.write_text(CONFIG.format(port=free_port()))
    try:
        return subprocess.run(
            [sys.executable, "-m", "exporter", f"--config.file={config}", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
    finally:
        config.unlink()


# -- systemd socket activation --------------------------------------------------------


def test_systemd_socket_activation(tmp_path: Path) -> None:
    """The daemon is started as systemd does: a listening socket inherited as descriptor 3,
    LISTEN_FDS=1 and LISTEN_PID its own pid (set by the shell that execs it, whose pid it
    keeps). It serves on that socket, and --web.listen-address is not used."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    config = tmp_path / "config.yml"
    config.write_text(CONFIG.format(port=free_port()))
    unused = free_port()
    fd = listener.fileno()
    script = (
        f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m exporter --config.file={config} '
        f"--web.systemd-socket --web.listen-address=127.0.0.1:{unused} 3<&{fd} {fd}<&-"
    )
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script, sys.executable],
            cwd=ROOT, pass_fds=(fd,), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    listener.close()  # the daemon holds it now
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return get(port, "/-/ready").status == 200
            except OSError:
                return False

        wait_until(ready, timeout=15, what="daemon serving on the systemd socket")
        m = parse_metrics(get(port).body.decode())
        assert value(m, "zmq_socket_info", socket="backend") == 1
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", unused), timeout=1).close()
        wait_until(lambda: "msg=listening" in log.read_text())
        assert f" address=127.0.0.1:{port} " in log.read_text()
        assert proc.pid == int(
            Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"LISTEN_PID=")[1].split(b"\0")[0]
        )  # LISTEN_PID named the daemon itself, as systemd sets it
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, log.read_text()


def test_systemd_socket_without_sockets_is_a_one_line_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    for extra in ({}, {"LISTEN_PID": "1", "LISTEN_FDS": "1"}):
        proc = run_daemon(["--web.systemd-socket"], env={**env, **extra})
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--web.systemd-socket: no socket passed" in lines[0], lines


# -- --web.max-requests ---------------------------------------------------------------


class Blocking:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def collect(self) -> list[object]:
        self.entered.release()
        self.release.wait(30)
        return []


def blocked_server(max_requests: int) -> tuple[WebServer, Blocking]:
    blocking = Blocking()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(blocking)  # type: ignore[arg-type]
    app = WebApp(
        registry=registry,
        telemetry_path="/metrics",
        is_ready=lambda: True,
        landing_page=lambda: "",
        reload=lambda: (True, ""),
        state=NO_SOCKETS,
        max_concurrent_scrapes=max_requests,
    )
    server = WebServer(app, f"127.0.0.1:{free_port()}")
    server.start()
    return server, blocking


def test_max_requests_limits_parallel_scrapes() -> None:
    """As node_exporter's --web.max-requests: that many scrapes at once, the next one 503
    with promhttp's message; probes are not counted."""
    server, blocking = blocked_server(2)
    clients: list[socket.socket] = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(s)
        assert blocking.entered.acquire(timeout=5) and blocking.entered.acquire(timeout=5)
        third = get(server.port)
        assert third.status == 503
        assert third.body == b"Limit of concurrent requests reached (2), try again later.\n"
        assert get(server.port, "/-/healthy").status == 200
        blocking.release.set()
        for s in clients:
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
        m = parse_metrics(get(server.port).body.decode())
        assert value(m, "zmq_exporter_http_requests_rejected_total", reason="too_many_scrapes") == 1
    finally:
        blocking.release.set()
        for s in clients:
            s.close()
        server.stop()


def test_max_requests_zero_is_no_limit() -> None:
    server, blocking = blocked_server(0)
    clients: list[socket.socket] = []
    try:
        for _ in range(12):  # over the default 8
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(s)
        for _ in range(12):
            assert blocking.entered.acquire(timeout=5), "a scrape was not started"
        blocking.release.set()
        for s in clients:
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    finally:
        blocking.release.set()
        for s in clients:
            s.close()
        server.stop()


def test_max_requests_flag() -> None:
    proc = run_daemon(["--web.max-requests=-1"])
    assert proc.returncode == 2 and "expected 0 or more" in proc.stderr, proc.stderr
    with Daemon(CONFIG.format(port=free_port()), args=["--web.max-requests=1"]) as daemon:
        started = time.monotonic()
        assert get(daemon.port).status == 200
        assert time.monotonic() - started < 5
