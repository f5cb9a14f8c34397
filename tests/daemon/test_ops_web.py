"""--web.config.file end to end: TLS with certificates generated per run (pki.py), mTLS with
RequireAndVerifyClientCert, bcrypt basic auth, startup errors of bad web configs, and the
HTTP server's bounds on request sizes."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bcrypt
import pytest
from pki import Pki, make_pki

from exporter.web.app import MAX_CONNECTIONS

from helpers import ROOT, Daemon, parse_metrics, value
from testkit import free_port, wait_until

CONFIG = textwrap.dedent("""\
    sockets:
      - name: backend
        type: ROUTER
        bind: [tcp://127.0.0.1:{port}]
    """)


# -- certificates ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- clients -----------------------------------------------------------------------------


def client_context(
    pki: Pki, cert: tuple[Path, Path] | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if max_version is not None:
        context.maximum_version = max_version
    return context


def request(
    port: int,
    path: str = "/metrics",
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def start(web_config: str, tmp_path: Path) -> Daemon:
    path = tmp_path / "web.yml"
    path.write_text(web_config)
    daemon = Daemon(CONFIG.format(port=free_port()), args=[f"--web.config.file={path}"])
    return daemon.start(wait_ready=False)


def wait_serving(port: int, **kwargs: object) -> None:
    def up() -> bool:
        try:
            return request(port, "/-/healthy", **kwargs)[0] in (200, 401)  # type: ignore[arg-type]
        except (OSError, http.client.HTTPException):
            return False

    wait_until(up, timeout=15, what=f"daemon serving on {port}")


# -- TLS ---------------------------------------------------------------------------------


def test_tls_serves_metrics_over_https_only(pki: Pki, tmp_path: Path) -> None:
    # Relative paths are resolved against the web config file's directory.
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_bytes((pki.server_cert.parent / name).read_bytes())
    daemon = start(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n", tmp_path
    )
    try:
        context = client_context(pki)  # verifies the chain and the 127.0.0.1 SAN
        wait_serving(daemon.port, context=context)
        status, _, body = request(daemon.port, context=context)
        assert status == 200
        m = parse_metrics(body.decode())
        assert value(m, "zmq_socket_info", socket="backend") == 1
        assert request(daemon.port, "/-/ready", context=context)[0] == 200
        # Plain HTTP on the TLS port gets Go's answer (400), not metrics.
        answer = raw(daemon.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer == b"HTTP/1.0 400 Bad Request\r\n\r\n" + (
            b"Client sent an HTTP request to an HTTPS server.\n"
        ), answer
        # Still serving after the failed handshake.
        assert request(daemon.port, context=context)[0] == 200
        assert "tls=true" in daemon.logs()  # logfmt: true, not a Python repr
    finally:
        assert daemon.stop() == 0


def test_tls_min_version_tls13(pki: Pki, tmp_path: Path) -> None:
    daemon = start(
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        "  min_version: TLS13\n",
        tmp_path,
    )
    try:
        wait_serving(daemon.port, context=client_context(pki))
        tls12 = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
        with pytest.raises(ssl.SSLError):
            request(daemon.port, context=tls12)
        assert request(daemon.port, context=client_context(pki))[0] == 200
    finally:
        assert daemon.stop() == 0


def test_mtls_require_and_verify_client_cert(pki: Pki, tmp_path: Path) -> None:
    daemon = start(
        textwrap.dedent(f"""\
            tls_server_config:
              cert_file: {pki.server_cert}
              key_file: {pki.server_key}
              client_auth_type: RequireAndVerifyClientCert
              client_ca_file: {pki.ca}
            """),
        tmp_path,
    )
    try:
        good = client_context(pki, cert=(pki.client_cert, pki.client_key))
        wait_serving(daemon.port, context=good)
        status, _, body = request(daemon.port, context=good)
        assert status == 200 and b"zmq_socket_info" in body
        # No client certificate: refused in the handshake (TLS 1.3 reports it on first read).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request(daemon.port, context=client_context(pki))
        # A certificate from a CA the server does not trust: refused too.
        intruder = client_context(pki, cert=(pki.other_cert, pki.other_key))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request(daemon.port, context=intruder)
        assert request(daemon.port, context=good)[0] == 200
    finally:
        assert daemon.stop() == 0


def test_silent_tls_clients_do_not_block_others(pki: Pki, tmp_path: Path) -> None:
    """The handshake runs in the event loop without blocking it, with a deadline: clients
    that connect and never send a ClientHello, or stop halfway through one, more of them
    than the connection cap, must not stall the accept loop or lock out real clients
    (the oldest of them are evicted)."""
    daemon = start(
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n",
        tmp_path,
    )
    silent = []
    try:
        context = client_context(pki)
        wait_serving(daemon.port, context=context)
        for i in range(MAX_CONNECTIONS + 100):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            if i % 2:
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
            silent.append(s)
        latencies = []
        for path in ["/metrics", "/-/healthy"] * 10:
            started = time.monotonic()
            assert request(daemon.port, path, context=context, timeout=3)[0] == 200
            latencies.append(time.monotonic() - started)
        print(f"\nTLS requests past {len(silent)} silent clients: max {max(latencies):.3f} s")
        assert max(latencies) < 1.0, latencies
        m = parse_metrics(request(daemon.port, context=context)[2].decode())
        evicted = value(
            m, "zmq_exporter_http_requests_rejected_total", reason="too_many_connections"
        )
        assert evicted is not None and evicted >= 100
    finally:
        for s in silent:
            s.close()
        assert daemon.stop() == 0


def test_tls_keep_alive_and_pipelining(pki: Pki, tmp_path: Path) -> None:
    """Requests pipelined in one TLS write are all answered, in order, on one connection:
    decrypted bytes the server has buffered are not forgotten while the selector sees
    nothing new on the socket."""
    daemon = start(
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n",
        tmp_path,
    )
    try:
        context = client_context(pki)
        wait_serving(daemon.port, context=context)
        raw_sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        with context.wrap_socket(raw_sock, server_hostname="127.0.0.1") as s:
            paths = ["/-/healthy", "/metrics", "/-/ready", "/nope", "/-/healthy"]
            s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths))
            reader = s.makefile("rb")
            statuses = []
            for _ in paths:
                status = int(reader.readline().split()[1])
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, number = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(number)
                assert len(reader.read(length)) == length
                statuses.append(status)
            assert statuses == [200, 200, 200, 404, 200]
    finally:
        assert daemon.stop() == 0


# -- basic auth --------------------------------------------------------------------------


def test_basic_auth(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode()
    daemon = start(f"basic_auth_users:\n  prometheus: {hashed}\n", tmp_path)
    try:
        wait_serving(daemon.port)
        for path in ("/metrics", "/", "/-/healthy", "/-/ready"):
            status, headers, _ = request(daemon.port, path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic"), headers
        status, headers, _ = request(daemon.port, "/-/reload", method="POST")
        assert status == 401
        rejects = [
            basic("prometheus", "wrong"),
            basic("nobody", "s3cret"),
            basic("prometheus", ""),
            basic("prometheus", "s3cret" + "x" * 80),  # over bcrypt's 72 bytes
            {"Authorization": "Bearer s3cret"},
            {"Authorization": "Basic !!!notbase64"},
            {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        ]
        for headers in rejects:
            status, answer, _ = request(daemon.port, headers=headers)
            assert status == 401, headers
            assert answer["WWW-Authenticate"] == 'Basic realm="zmq-exporter"'
        good = basic("prometheus", "s3cret")
        for path in ("/metrics", "/", "/-/healthy", "/-/ready"):
            assert request(daemon.port, path, headers=good)[0] == 200, path
        status, _, body = request(daemon.port, "/-/reload", method="POST", headers=good)
        assert status == 200, body

        # No timing shortcut: an unknown user costs a bcrypt check like a known one.
        def timed(headers: dict[str, str]) -> float:
            started = time.perf_counter()
            assert request(daemon.port, "/-/healthy", headers=headers)[0] == 401
            return time.perf_counter() - started

        known = statistics.median(timed(basic("prometheus", f"wrong{i}")) for i in range(7))
        unknown = statistics.median(timed(basic(f"user{i}", "wrong")) for i in range(7))
        print(f"401 in {known * 1000:.1f} ms (known user) vs {unknown * 1000:.1f} ms (unknown)")
        assert known > 0.005  # a real bcrypt check at cost 10
        assert 0.5 < unknown / known < 2.0

        m = parse_metrics(request(daemon.port, headers=good)[2].decode())
        rejected = value(m, "zmq_exporter_http_requests_rejected_total", reason="unauthorized")
        assert rejected is not None and rejected >= 5 + len(rejects) + 14
    finally:
        assert daemon.stop() == 0


def test_tls_and_basic_auth_together(pki: Pki, tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    daemon = start(
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"basic_auth_users:\n  prom: {hashed}\n",
        tmp_path,
    )
    try:
        context = client_context(pki)
        wait_serving(daemon.port, context=context)
        assert request(daemon.port, context=context)[0] == 401
        assert request(daemon.port, context=context, headers=basic("prom", "pw"))[0] == 200
    finally:
        assert daemon.stop() == 0


# -- bad web configs ---------------------------------------------------------------------

BAD = [
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
     2, "tls_server_config.cert_file", "cannot read '/nonexistent.crt'"),
    ("tls_server_config:\n  cert_file: x.crt\n", 1, "tls_server_config", "missing key_file"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_auth_type: Maybe\n",
     4, "tls_server_config.client_auth_type", "unknown client_auth_type 'Maybe'"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  min_version: TLS14\n",
     4, "tls_server_config.min_version", "unknown TLS version 'TLS14'"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {crt}\n",
     2, "tls_server_config.cert_file", "cannot load certificate"),
    ("basic_auth_users:\n  alice: plaintext-password\n",
     2, "basic_auth_users.alice", "not a bcrypt hash"),
    ("basic_auth_user:\n  alice: x\n", 1, "basic_auth_user", "unknown key"),
    ("tls_server_config: [\n", 2, "", "YAML syntax error"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "key", "message"), BAD)
def test_bad_web_config_is_a_one_line_startup_error(
    pki: Pki, tmp_path: Path, text: str, line: int, key: str, message: str
) -> None:
    web = tmp_path / "web.yml"
    web.write_text(text.format(crt=pki.server_cert, key=pki.server_key))
    config = tmp_path / "config.yml"
    config.write_text(CONFIG.format(port=free_port()))
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", f"--config.file={config}",
         f"--web.config.file={web}", f"--web.listen-address=127.0.0.1:{free_port()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    where = f"{web}:{line}: " + (f"{key}: " if key else "")
    assert lines[0].startswith(f"zmq-exporter: bad --web.config.file: {where}"), lines[0]
    assert message in lines[0], lines[0]
    assert "plaintext-password" not in proc.stderr  # never echo a secret


def test_config_check_validates_web_config_too(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  bob: nope\n")
    config = tmp_path / "config.yml"
    config.write_text(CONFIG.format(port=free_port()))
    args = [sys.executable, "-m", "exporter", f"--config.file={config}", "--config.check"]
    proc = subprocess.run(
        [*args, f"--web.config.file={web}"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1 and f"{web}:2: basic_auth_users.bob" in proc.stderr
    web.write_text("")  # an empty web config: plain HTTP, no auth
    proc = subprocess.run(
        [*args, f"--web.config.file={web}"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


# -- request bounds ----------------------------------------------------------------------


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks: list[bytes] = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_request_size_limits() -> None:
    with Daemon(CONFIG.format(port=free_port())) as daemon:
        long_path = b"/" + b"a" * 9000
        answer = raw(daemon.port, b"GET " + long_path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 414 "), answer[:80]
        huge_line = b"/" + b"a" * 70000  # over the header budget before the line ends
        assert raw(daemon.port, b"GET " + huge_line + b" HTTP/1.1\r\n\r\n").startswith(
            b"HTTP/1.1 414 "
        )
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        answer = raw(daemon.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        answer = raw(
            daemon.port,
            b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000,
        )
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
        answer = raw(
            daemon.port,
            b"POST /-/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 411 "), answer[:80]
        # A small body is read and ignored; the connection stays usable (keep-alive).
        answer = raw(
            daemon.port,
            b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 200 ") == 2
        m = daemon.scrape()
        assert value(m, "zmq_exporter_http_requests_rejected_total", reason="too_large") == 4
