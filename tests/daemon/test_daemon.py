"""The daemon end to end: real sockets on loopback, a real process, real HTTP scrapes, and
the kernel's own count of connections (/proc/net/tcp) as the independent witness."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import zmq
import zmq.auth

from exporter import __version__

from helpers import Daemon, http_get, parse_metrics, run_cli, total, value
from testkit import established, free_port, wait_until


def router_config(port: int, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{port}]
            labels: {{tier: test}}
        """) + textwrap.dedent(extra)


def test_dealers_connect_and_close_gauge_equals_kernel(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    port = free_port()
    k = 40
    with Daemon(router_config(port)) as daemon:
        ep = f"tcp://127.0.0.1:{port}"
        dealers = []
        for _ in range(k):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(ep)
            dealers.append(dealer)

        def accepted(n: int) -> bool:
            m = daemon.scrape()
            return (
                value(m, "zmq_accepted_total", socket="backend") == n
                and value(m, "zmq_connections", socket="backend") == n
            )

        wait_until(lambda: accepted(k), what=f"{k} accepted")
        m = daemon.scrape()
        assert value(m, "zmq_connections", socket="backend", endpoint=ep, tier="test") == k
        assert value(m, "zmq_handshake_succeeded_total", socket="backend") == k
        assert established(port) == k
        assert value(m, "zmq_listening", socket="backend") == 1

        # Close 15: disconnected and the gauge follow exactly, as does the kernel.
        for dealer in dealers[:15]:
            dealer.close(linger=0)
        wait_until(
            lambda: value(daemon.scrape(), "zmq_disconnected_total", socket="backend") == 15,
            what="15 disconnected",
        )
        wait_until(lambda: established(port) == k - 15, what="kernel sees 25")
        m = daemon.scrape()
        assert value(m, "zmq_connections", socket="backend") == k - 15 == established(port)
        assert value(m, "zmq_accepted_total", socket="backend") == k


PEER = textwrap.dedent("""\
    import sys, time, zmq
    ctx = zmq.Context()
    socks = []
    for _ in range(int(sys.argv[2])):
        s = ctx.socket(zmq.DEALER)
        s.connect(sys.argv[1])
        socks.append(s)
    print("ready", flush=True)
    time.sleep(120)  # killed by the test long before
    """)


def test_sigkilled_peer_process_drops_the_gauge() -> None:
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    with Daemon(router_config(port)) as daemon:
        survivor = subprocess.Popen(
            [sys.executable, "-c", PEER, ep, "3"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        victim = subprocess.Popen(
            [sys.executable, "-c", PEER, ep, "7"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        try:
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connections", socket="backend") == 10,
                timeout=20,
                what="10 connections",
            )
            assert established(port) == 10
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connections", socket="backend") == 3,
                what="gauge back to the survivor's 3",
            )
            assert established(port) == 3
            assert value(daemon.scrape(), "zmq_disconnected_total", socket="backend") == 7
        finally:
            for proc in (survivor, victim):
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)


def test_connect_to_nothing_retries_then_connects(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    config = f"""\
sockets:
  - name: upstream
    type: DEALER
    connect: [{ep}]
    options: {{reconnect_ivl: 100ms}}
"""
    with Daemon(config) as daemon:
        wait_until(
            lambda: (
                (value(daemon.scrape(), "zmq_connect_retried_total", socket="upstream") or 0) >= 3
            ),
            what="3 reconnect attempts",
        )
        m = daemon.scrape()
        assert value(m, "zmq_connections", socket="upstream") == 0
        assert value(m, "zmq_connected_total", socket="upstream") == 0
        assert value(m, "zmq_reconnect_interval_seconds", socket="upstream") > 0  # type: ignore[operator]
        # Closed fds of failed attempts never push the gauge below zero.
        assert value(m, "zmq_closed_total", socket="upstream") >= 3  # type: ignore[operator]

        listener = ctx.socket(zmq.ROUTER)
        listener.bind(ep)
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", socket="upstream", endpoint=ep) == 1,
            what="connected once the listener exists",
        )
        assert value(daemon.scrape(), "zmq_connected_total", socket="upstream") == 1
        assert established(port) == 1


def test_bind_on_port_in_use_is_counted_retried_and_isolated(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    busy_port, good_port = free_port(), free_port()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", busy_port))
    squatter.listen()
    config = f"""\
global:
  bind_retry_interval: 200ms
  bind_retry_max_interval: 400ms
sockets:
  - name: blocked
    type: ROUTER
    bind: [tcp://127.0.0.1:{busy_port}]
  - name: fine
    type: ROUTER
    bind: [tcp://127.0.0.1:{good_port}]
"""
    try:
        with Daemon(config) as daemon:
            busy = f"tcp://127.0.0.1:{busy_port}"
            wait_until(
                lambda: (
                    (
                        value(
                            daemon.scrape(),
                            "zmq_bind_failed_total",
                            socket="blocked",
                            errno="EADDRINUSE",
                        )
                        or 0
                    )
                    >= 2
                ),
                what="bind failures counted and retried",
            )
            m = daemon.scrape()
            assert value(m, "zmq_listening", socket="blocked", endpoint=busy) == 0
            failed = value(
                m, "zmq_bind_failed_total", socket="blocked", endpoint=busy, errno="EADDRINUSE"
            )
            assert failed is not None and failed >= 2, failed
            # The other socket is unaffected: listening and accepting.
            assert value(m, "zmq_listening", socket="fine") == 1
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(f"tcp://127.0.0.1:{good_port}")
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connections", socket="fine") == 1,
                what="the other socket accepts",
            )
            assert "bind failed" in daemon.logs()

            # Free the port: the backoff retry binds it.
            squatter.close()
            wait_until(
                lambda: value(daemon.scrape(), "zmq_listening", socket="blocked") == 1,
                what="bind retried after the port was freed",
            )
            assert "bind succeeded" in daemon.logs()
    finally:
        squatter.close()


def test_curve_wrong_server_key(tmp_path: Path) -> None:
    zmq.auth.create_certificates(str(tmp_path), "server")
    zmq.auth.create_certificates(str(tmp_path), "client")
    wrong_public, _ = zmq.curve_keypair()
    port = free_port()
    config = f"""\
sockets:
  - name: curve-server
    type: ROUTER
    bind: [tcp://127.0.0.1:{port}]
    options:
      curve_server: true
      curve_secretkey_file: {tmp_path / "server.key_secret"}
  - name: curve-client
    type: DEALER
    connect: [tcp://127.0.0.1:{port}]
    options:
      reconnect_ivl: 100ms
      curve_serverkey: "{wrong_public.decode()}"
      curve_secretkey_file: {tmp_path / "client.key_secret"}
"""
    with Daemon(config) as daemon:

        def storm_visible() -> bool:
            m = daemon.scrape()
            return (
                total(m, "zmq_handshake_failed_total", socket="curve-server", reason="protocol")
                >= 3
                and (value(m, "zmq_connect_retried_total", socket="curve-client") or 0) >= 3
            )

        wait_until(storm_visible, timeout=20, what="handshake failures and reconnect loop")
        m = daemon.scrape()
        failed = value(
            m,
            "zmq_handshake_failed_total",
            socket="curve-server",
            reason="protocol",
            error="zmtp_cryptographic",
        )
        assert failed is not None and failed >= 3, failed
        assert total(m, "zmq_handshake_failed_total", socket="curve-client") >= 3
        assert value(m, "zmq_handshake_succeeded_total", socket="curve-server") == 0
        assert value(m, "zmq_connected_total", socket="curve-client") >= 3  # type: ignore[operator]
        # The secret keys are never shown.
        text = http_get(daemon.url + "/metrics")
        for name in ("server.key_secret", "client.key_secret"):
            _, secret = zmq.auth.load_certificate(str(tmp_path / name))
            assert secret is not None
            assert secret.decode() not in text
            assert secret.decode() not in daemon.logs()


def test_ipc_endpoints(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    ep = f"ipc://{tmp_path}/backend.sock"
    config = f"sockets:\n  - {{name: local, type: PULL, bind: ['{ep}']}}\n"
    with Daemon(config) as daemon:
        push = ctx.socket(zmq.PUSH)
        push.connect(ep)
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", socket="local", endpoint=ep) == 1,
            what="ipc connection",
        )
        for _ in range(10):
            push.send(b"x")
        wait_until(
            lambda: value(daemon.scrape(), "zmq_exporter_inbound_messages_dropped_total") == 10,
            what="inbound messages drained",
        )


def test_openmetrics_and_text_format(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    port = free_port()
    with Daemon(router_config(port)) as daemon:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        wait_until(lambda: value(daemon.scrape(), "zmq_accepted_total") == 1, what="accepted")
        om = http_get(
            daemon.url + "/metrics",
            {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
        )
        assert om.endswith("# EOF\n")
        families = {f.name: f for f in text_string_to_metric_families(om)}
        assert families["zmq_accepted"].type == "counter"
        assert families["zmq_connections"].type == "gauge"
        assert families["zmq_listening"].type == "gauge"
        assert families["zmq_bind_succeeded"].type == "counter"
        samples = {
            (s.name, s.labels.get("socket")): s.value for f in families.values() for s in f.samples
        }
        assert samples[("zmq_accepted_total", "backend")] == 1
        assert samples[("zmq_bind_succeeded_total", "backend")] == 1

        text = http_get(daemon.url + "/metrics")
        assert "# TYPE zmq_accepted_total counter" in text
        assert "# TYPE zmq_bind_succeeded_total counter" in text
        assert "# TYPE zmq_listening gauge" in text
        assert "# TYPE zmq_bind_succeeded counter" in om
        m = parse_metrics(text)
        assert value(m, "zmq_accepted_total", socket="backend") == 1
        build = [k for k in m if k[0] == "zmq_exporter_build_info"]
        assert len(build) == 1 and ("version", __version__) in build[0][1]


def test_sigterm_exits_zero_within_two_seconds(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    port = free_port()
    daemon = Daemon(
        router_config(port)
        + """\
  - name: out
    type: DEALER
    connect: [tcp://127.0.0.1:1]
"""
    ).start()
    dealers = [ctx.socket(zmq.DEALER) for _ in range(5)]
    for dealer in dealers:
        dealer.connect(f"tcp://127.0.0.1:{port}")
    wait_until(
        lambda: value(daemon.scrape(), "zmq_connections", socket="backend") == 5,
        what="5 connections",
    )
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(20)
    elapsed = time.monotonic() - started
    assert code == 0, daemon.logs()
    # Prompt, not held by the reconnecting DEALER or a linger (either would hang); the
    # bound holds on a loaded machine.
    assert elapsed < 5.0, f"shutdown took {elapsed:.2f}s"
    wait_until(lambda: established(port) == 0, what="connections closed")


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith(f"zmq-exporter {__version__}"), version.stdout
    helptext = run_cli("--help").stdout
    for flag in (
        "--config.file",
        "--config.check",
        "--web.listen-address",
        "--web.telemetry-path",
        "--log.level",
        "--log.format",
        "--version",
    ):
        assert flag in helptext


def test_json_logs() -> None:
    """With --log.format=json every line the daemon writes (stdout and stderr, from start to
    exit, debug included) is one JSON object with ts, level, logger and msg."""
    port = free_port()
    daemon = Daemon(router_config(port), args=["--log.format=json", "--log.level=debug"])
    with daemon:
        wait_until(lambda: '"msg": "listening"' in daemon.logs(), what="the listening line")
    assert daemon.proc is not None and daemon.proc.returncode == 0, daemon.logs()
    records = []
    for line in daemon.logs().splitlines():
        record = json.loads(line)  # fails on any line that is not JSON
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= record.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), line
        records.append(record)
    by_msg = {r["msg"]: r for r in records}
    started = by_msg["zmq-exporter started"]
    assert started["version"] == __version__ and started["level"] == "info", started
    assert by_msg["listening"]["port"] == daemon.port
    assert "bind succeeded" in by_msg and by_msg["bind succeeded"]["level"] == "debug"
    assert records[-1]["msg"] == "shutting down", records[-1]
