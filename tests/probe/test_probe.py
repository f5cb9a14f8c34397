"""/probe's prober layer (exporter/prober) against real peers, each case with the reason
the issue names: a live ROUTER (NULL), a REP, a CURVE server with the right and a wrong
server key, a port with no listener, a listener that accepts and never speaks (a raw
socket, and a ZeroMQ peer stopped with SIGSTOP), an HTTP server, a .invalid name, an ipc
path; then 1,000 probes in a row leave the fd count flat, and the concurrency bound holds.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import zmq

from exporter.config.modules import ProbeModule, default_modules
from exporter.prober import REASONS, Prober, probe_timeout
from exporter.prober.greeting import parse_greeting

from helpers import parse_metrics, value
from testkit import established, wait_until


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the IPv4 listener on `port`: the
    rx_queue of its LISTEN row in /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return 0


Ctx = zmq.Context[zmq.Socket[bytes]]


def probe(
    prober: Prober, target: str, module: str = "zmtp", timeout: str = "2.5", debug: bool = False
) -> tuple[int, str]:
    query = {"target": [target], "module": [module]}
    if debug:
        query["debug"] = ["true"]
    status, _, body = prober.handle_probe(query, {"X-Prometheus-Scrape-Timeout-Seconds": timeout})
    return status, body.decode()


def outcome(body: str) -> tuple[float | None, str | None]:
    """(probe_success, the failure reason or None)."""
    samples = parse_metrics(body)
    reasons = [dict(ls)["reason"] for name, ls in samples if name == "probe_zmtp_failure_info"]
    assert len(reasons) <= 1, body
    return value(samples, "probe_success"), (reasons[0] if reasons else None)


def info(body: str) -> dict[str, str] | None:
    for name, labels in parse_metrics(body):
        if name == "probe_zmtp_info":
            return dict(labels)
    return None


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    public, secret = zmq.curve_keypair()
    return public, secret


@pytest.fixture
def prober(keys: tuple[bytes, bytes]) -> Prober:
    modules = default_modules()
    wrong, _ = zmq.curve_keypair()
    modules["curve"] = ProbeModule("curve", mechanism="CURVE", curve_serverkey=keys[0])
    modules["curve_wrong"] = ProbeModule("curve_wrong", mechanism="CURVE", curve_serverkey=wrong)
    modules["sub"] = ProbeModule("sub", socket_type="SUB")
    modules["local"] = ProbeModule("local", allowed_targets=("tcp://127.0.0.1:*",))
    modules["short"] = ProbeModule("short", timeout=0.3)
    return Prober(lambda: modules, max_concurrent=4)


def bound(ctx: Ctx, kind: int, curve_secret: bytes | None = None) -> tuple[zmq.Socket[bytes], str]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if curve_secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve_secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def test_live_router_null(ctx: Ctx, prober: Prober) -> None:
    _peer, target = bound(ctx, zmq.ROUTER)
    status, body = probe(prober, target)
    assert status == 200
    assert outcome(body) == (1.0, None), body
    assert info(body) == {"version": "3.1", "mechanism": "NULL", "as_server": "false"}
    samples = parse_metrics(body)
    for name in (
        "probe_duration_seconds",
        "probe_dns_lookup_time_seconds",
        "probe_zmtp_connect_duration_seconds",
        "probe_zmtp_handshake_duration_seconds",
    ):
        seconds = value(samples, name)
        assert seconds is not None and 0 < seconds < 2.5, (name, body)


def test_rep(ctx: Ctx, prober: Prober) -> None:
    _peer, target = bound(ctx, zmq.REP)
    assert outcome(probe(prober, target)[1]) == (1.0, None)


def test_curve_right_and_wrong_server_key(
    ctx: Ctx, prober: Prober, keys: tuple[bytes, bytes]
) -> None:
    _peer, target = bound(ctx, zmq.ROUTER, curve_secret=keys[1])
    _, body = probe(prober, target, "curve")
    assert outcome(body) == (1.0, None), body
    assert info(body) == {"version": "3.1", "mechanism": "CURVE", "as_server": "false"}
    assert outcome(probe(prober, target, "curve_wrong")[1]) == (0.0, "auth")
    # The default module (NULL) against the CURVE server: told apart by the greeting.
    _, body = probe(prober, target)
    assert outcome(body) == (0.0, "mechanism_mismatch")
    assert info(body) == {"version": "3.1", "mechanism": "CURVE", "as_server": "false"}


def test_zap_refusal_is_auth(ctx: Ctx, prober: Prober, keys: tuple[bytes, bytes]) -> None:
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")  # ZAP handler of the peer's context: refuses all
    done = threading.Event()

    def refuse() -> None:
        while not done.is_set():
            if zap.poll(50):
                request = zap.recv_multipart()
                zap.send_multipart([request[0], request[1], b"400", b"no", b"", b""])

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        _peer, target = bound(ctx, zmq.ROUTER, curve_secret=keys[1])
        assert outcome(probe(prober, target, "curve")[1]) == (0.0, "auth")
    finally:
        done.set()
        thread.join(5)
        zap.close(linger=0)


def test_incompatible_socket_type_is_protocol(ctx: Ctx, prober: Prober) -> None:
    _peer, target = bound(ctx, zmq.PUB)  # a DEALER may not talk to a PUB
    assert outcome(probe(prober, target)[1]) == (0.0, "protocol")
    assert outcome(probe(prober, target, "sub")[1]) == (1.0, None)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_listener_is_connect_refused(prober: Prober) -> None:
    status, body = probe(prober, f"tcp://127.0.0.1:{free_tcp_port()}")
    assert status == 200 and outcome(body) == (0.0, "connect_refused")
    assert info(body) is None


def test_silent_listener_is_greeting_timeout(prober: Prober) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel accepts; nobody ever speaks
        started = time.monotonic()
        _, body = probe(prober, f"tcp://127.0.0.1:{listener.getsockname()[1]}", timeout="1.5")
        took = time.monotonic() - started
    assert outcome(body) == (0.0, "greeting_timeout"), body
    assert 0.9 <= took < 1.5, took  # the whole budget (1.5 s - 0.5 s offset), not more


PEER = textwrap.dedent("""\
    import sys, zmq
    sock = zmq.Context().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    sys.stdin.read()
    """)


@pytest.fixture
def zmq_peer() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield proc, f"tcp://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_stopped_zeromq_peer_is_greeting_timeout(
    prober: Prober, zmq_peer: tuple[subprocess.Popen[str], str]
) -> None:
    proc, target = zmq_peer
    assert outcome(probe(prober, target)[1]) == (1.0, None)
    proc.send_signal(signal.SIGSTOP)
    wait_until(lambda: _state(proc.pid) == "T", timeout=5, what="peer stopped")
    assert outcome(probe(prober, target, timeout="1.5")[1]) == (0.0, "greeting_timeout")
    proc.send_signal(signal.SIGCONT)
    assert outcome(probe(prober, target)[1]) == (1.0, None)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_server_is_not_zmtp(prober: Prober) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _, body = probe(prober, f"tcp://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert outcome(body) == (0.0, "not_zmtp"), body


def test_invalid_name_fails_fast_as_dns(prober: Prober) -> None:
    started = time.monotonic()
    status, body = probe(prober, "tcp://no-such-peer.invalid:5555")
    assert time.monotonic() - started < 0.5
    assert status == 200 and outcome(body) == (0.0, "dns")
    assert value(parse_metrics(body), "probe_dns_lookup_time_seconds") is not None


def test_ipc_path(ctx: Ctx, prober: Prober, tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    peer = ctx.socket(zmq.ROUTER)
    peer.bind(f"ipc://{path}")
    _, body = probe(prober, f"ipc://{path}")
    assert outcome(body) == (1.0, None), body
    assert value(parse_metrics(body), "probe_dns_lookup_time_seconds") is None
    peer.close(linger=0)  # libzmq closes the listener on its I/O thread, a moment later
    wait_until(
        lambda: outcome(probe(prober, f"ipc://{path}")[1]) == (0.0, "connect_refused"),
        timeout=5,
        what="a closed ipc listener refuses",
    )
    assert outcome(probe(prober, f"ipc://{tmp_path}/nothing.sock")[1]) == (0.0, "connect_refused")


def test_full_accept_queue_is_connect_timeout(prober: Prober) -> None:
    # Linux drops a SYN while the listener's accept queue is full: the connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # more than the queue holds (backlog 0 -> 1 on Linux)
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            # The kernel completes handshakes into the accept queue until it is full.
            wait_until(lambda: accept_queue(port) >= 1, timeout=5, what="accept queue full")
            _, body = probe(prober, f"tcp://127.0.0.1:{port}", timeout="1.5")
        finally:
            for filler in fillers:
                filler.close()
    assert outcome(body) == (0.0, "connect_timeout"), body


def test_bad_requests(prober: Prober, ctx: Ctx) -> None:
    def status_of(query: Mapping[str, list[str]], headers: Mapping[str, str] = {}) -> int:
        return prober.handle_probe(query, headers)[0]

    assert status_of({}) == 400
    assert status_of({"target": ["tcp://127.0.0.1:1"], "module": ["nope"]}) == 400
    assert status_of({"target": ["inproc://x"]}) == 400
    assert status_of({"target": ["http://example.com"]}) == 400
    assert (
        status_of({"target": ["tcp://127.0.0.1:1"]}, {"x-prometheus-scrape-timeout-seconds": "x"})
        == 400
    )
    # allowed_targets: refused before anything is opened.
    assert status_of({"target": ["tcp://10.1.2.3:5555"], "module": ["local"]}) == 403
    _peer, target = bound(ctx, zmq.ROUTER)
    status, body = probe(prober, target, "local")
    assert status == 200 and outcome(body) == (1.0, None)


def test_timeout_from_header_capped_by_module() -> None:
    zmtp, short = ProbeModule("zmtp"), ProbeModule("short", timeout=2.0)
    header = "X-Prometheus-Scrape-Timeout-Seconds"
    assert probe_timeout({header: "10"}, zmtp, 0.5) == 9.5
    assert probe_timeout({header.lower(): "10"}, short, 0.5) == 2.0
    assert probe_timeout({header: "1.5"}, short, 0.5) == 1.0
    assert probe_timeout({}, zmtp, 0.5) == 9.5  # no header: Prometheus' default 10 s
    assert probe_timeout({header: "0.3"}, short, 0.5) == 2.0  # offset above the timeout
    with pytest.raises(ValueError):
        probe_timeout({header: "soon"}, zmtp, 0.5)


def test_debug_output(ctx: Ctx, prober: Prober, keys: tuple[bytes, bytes]) -> None:
    _peer, target = bound(ctx, zmq.ROUTER, curve_secret=keys[1])
    status, text = probe(prober, target, "curve_wrong", debug=True)
    assert status == 200
    logs, rest = text.split("\n\n\nMetrics that would have been returned:\n")
    assert logs.startswith("Logs for the probe:\n")
    for step in ("Resolved target address", "Connected", "Received the peer's greeting"):
        assert f'msg="{step}"' in logs or f"msg={step}" in logs, step
    assert "reason=auth" in logs
    metrics_text, module = rest.split("\n\n\nModule configuration:\n")
    assert outcome(metrics_text) == (0.0, "auth")
    assert "mechanism: CURVE" in module and "curve_client_key: <new pair per probe>" in module


def test_greeting_parser() -> None:
    greeting = b"\xff" + bytes(7) + b"\x01\x7f\x03\x00PLAIN" + bytes(15) + b"\x01" + bytes(31)
    parsed = parse_greeting(greeting)
    assert (parsed.version, parsed.mechanism, parsed.as_server) == ("3.0", "PLAIN", True)
    zmtp2 = b"\xff" + bytes(7) + b"\x01\x7f\x01\x05"
    assert parse_greeting(zmtp2).version == "2.0"
    for data in (b"HTTP/1.1 400", b"\xff" + bytes(8) + b"\x00\x03"):
        with pytest.raises(Exception) as err:
            parse_greeting(data)
        assert getattr(err.value, "reason", None) == "not_zmtp"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousand_probes_leave_fds_flat(
    ctx: Ctx, prober: Prober, keys: tuple[bytes, bytes]
) -> None:
    _live, live = bound(ctx, zmq.ROUTER)
    _curve, curve = bound(ctx, zmq.ROUTER, curve_secret=keys[1])
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        cases = [
            (live, "zmtp", None),
            (f"tcp://127.0.0.1:{free_tcp_port()}", "zmtp", "connect_refused"),
            (curve, "curve_wrong", "auth"),
            (curve, "zmtp", "mechanism_mismatch"),
            ("tcp://x.invalid:1", "zmtp", "dns"),
        ]
        for target, module, reason in cases:  # warm up: the context, the DNS threads
            assert outcome(probe(prober, target, module)[1])[1] == reason
        before = open_fds()
        started = time.monotonic()
        for i in range(1000):
            target, module, reason = cases[i % len(cases)]
            if outcome(probe(prober, target, module)[1])[1] != reason:
                raise AssertionError((i, target, probe(prober, target, module, debug=True)[1]))
        took = time.monotonic() - started
    # Flat: nothing per probe stays open. libzmq closes sockets on its own threads (the
    # probe's, and the peers' accepted connections in this process), so let them settle.
    wait_until(lambda: open_fds() <= before + 2, timeout=5, what=f"fds back to {before}")
    assert took < 60, took


def test_concurrency_bound(prober: Prober) -> None:
    # max_concurrent=4: four probes of a silent listener hold every slot; a fifth waits
    # for a slot within its own budget and is refused (503) when none frees in time.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        target = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(probe(prober, target, timeout="2.5")[0]))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        # The four hold their slots once each has its one connection (NULL: the greeting
        # and handshake share it) to the silent listener; each then waits up to 2 s.
        wait_until(lambda: established(silent.getsockname()[1]) >= 4, timeout=5, what="slots")
        status, body = probe(prober, target, timeout="1.0")
        for thread in threads:
            thread.join(10)
    assert status == 503 and "--probe.max-concurrent=4" in body
    assert results == [200] * 4


def test_reasons_are_the_table() -> None:
    from exporter.core import metrics

    assert metrics.PROBE_FAILURE_INFO.values == REASONS


def test_ip_protocol_preference_and_fallback(ctx: Ctx) -> None:
    # /etc/hosts here names localhost 127.0.0.1 only: no IPv6 address for it.
    modules = default_modules()
    modules["ip6_only"] = ProbeModule("ip6_only", ip_protocol="ip6", ip_protocol_fallback=False)
    modules["ip6_first"] = ProbeModule("ip6_first", ip_protocol="ip6")
    prober = Prober(lambda: modules)
    _peer, target = bound(ctx, zmq.ROUTER)
    by_name = target.replace("127.0.0.1", "localhost")
    assert outcome(probe(prober, by_name, "ip6_only")[1]) == (0.0, "dns")
    assert outcome(probe(prober, by_name, "ip6_first")[1]) == (1.0, None)
    assert outcome(probe(prober, by_name)[1]) == (1.0, None)


def test_ipv6_literal(ctx: Ctx) -> None:
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.IPV6, 1)
    port = peer.bind_to_random_port("tcp://[::1]")
    prober = Prober(default_modules)
    _, body = probe(prober, f"tcp://[::1]:{port}")
    assert outcome(body) == (1.0, None), body
    # ip4 preferred, but a literal is what it is: no address of the other family is made up.
    modules = {"v4only": ProbeModule("v4only", ip_protocol_fallback=False)}
    _, body = probe(Prober(lambda: modules), f"tcp://[::1]:{port}", "v4only")
    assert outcome(body) == (0.0, "dns")
