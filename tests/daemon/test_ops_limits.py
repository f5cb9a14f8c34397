"""Cardinality and limits: limits.max_sockets / limits.max_series refuse a config at start
with one line, the series estimate matches a real scrape, label values come only from the
config and bounded decodings, and the scrape self-metrics add up."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import zmq

from exporter.config import parse_config
from exporter.config.cardinality import (
    FIXED_SERIES,
    TCP_CONNECTION_SERIES,
    connection_series,
    estimate_series,
)
from exporter.core import metrics
from exporter.core.events import HANDSHAKE_REASONS, ZAP_STATUS, ZMTP_ERRORS

from helpers import ROOT, Daemon, Samples, total, value
from testkit import free_port, wait_until


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", f"--config.file={config}",
         f"--web.listen-address=127.0.0.1:{free_port()}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_limits_refuse_config_at_start(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    socks = "".join(
        f"  - {{name: s{i}, type: DEALER, connect: [tcp://127.0.0.1:{i + 1}]}}\n" for i in range(3)
    )
    config.write_text("limits:\n  max_sockets: 2\nsockets:\n" + socks)
    proc = run(config)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"zmq-exporter: {config}:3: sockets: 3 sockets configured, more than limits.max_sockets (2)"
    ), proc.stderr
    estimate = estimate_series(parse_config(f"sockets:\n{socks}", "c.yml").sockets)
    config.write_text(f"limits:\n  max_series: {estimate - 1}\nsockets:\n" + socks)
    proc = run(config)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"zmq-exporter: {config}:2: limits.max_series: about {estimate} series estimated for "
        f"3 sockets, more than limits.max_series ({estimate - 1})"
    ], proc.stderr
    config.write_text(f"limits:\n  max_series: {estimate}\nsockets:\n" + socks)
    assert run(config, "--config.check").returncode == 0


CONNECTION_NAMES = frozenset(f.name for f in metrics.CONNECTION_FAMILIES)


def test_series_estimate_matches_a_scrape(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router, dead = free_port(), free_port()
    text = textwrap.dedent(f"""\
        connections: {{sample_interval: 200ms}}
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{router}, tcp://127.0.0.1:{free_port()}]
          - name: client
            type: DEALER
            connect: [tcp://127.0.0.1:{dead}, tcp://127.0.0.1:{router}]
            options: {{reconnect_ivl: 100ms}}
        """)
    settings = parse_config(text, "x.yml")
    estimate = estimate_series(settings.sockets, settings.connections)
    connection_estimate = sum(connection_series(s, settings.connections) for s in settings.sockets)
    assert connection_estimate == 4 * TCP_CONNECTION_SERIES  # 4 tcp endpoints, 6 each
    with Daemon(text) as daemon:
        wait_until(
            lambda: (
                value(
                    daemon.scrape(),
                    "zmq_connection_rtt_max_seconds",
                    socket="client",
                    endpoint=f"tcp://127.0.0.1:{router}",
                )
                is not None
            ),
            what="client connected and sampled",
        )
        m = daemon.scrape()
        zmq_series = [k for k in m if k[0].startswith("zmq_") and not k[0].startswith("zmq_exp")]
        sockets = [k for k in zmq_series if k[0] not in CONNECTION_NAMES]
        connections = [k for k in zmq_series if k[0] in CONNECTION_NAMES]
        socket_estimate = estimate - FIXED_SERIES - connection_estimate
        print(f"estimate {estimate} series ({socket_estimate} socket series, "
              f"{connection_estimate} connection series), scrape {len(m)} "
              f"({len(sockets)} socket series, {len(connections)} connection series)")  # fmt: skip
        assert len(sockets) <= socket_estimate
        assert len(sockets) >= 0.8 * socket_estimate
        # 4 families on each of the 4 endpoints, the 2 RTT families on the 2 connected.
        assert len(connections) == 4 * 4 + 2 * 2 <= connection_estimate
        assert len(m) <= estimate
        # The fixed part: everything but the OTLP push's own series (it is off here).
        otlp = sum(f.series for f in metrics.OTLP_FAMILIES)
        assert len(m) - len(zmq_series) == FIXED_SERIES - otlp
        # zmq_exporter_series is the size of the previous scrape; nothing changes between
        # these two, so it equals the sample count of the first.
        first = daemon.scrape()
        second = daemon.scrape()
        assert value(second, "zmq_exporter_series") == len(first)
        scrapes = value(second, "zmq_exporter_scrapes_total")
        assert scrapes is not None and scrapes >= 3  # completed before this one
        assert value(second, "zmq_exporter_scrape_duration_seconds_count") == scrapes
        assert value(second, "zmq_exporter_scrape_duration_seconds_bucket", le="+Inf") == scrapes
        for name in ("process_resident_memory_bytes", "zmq_exporter_events_processed_total",
                     "zmq_exporter_reader_backlog_events"):  # fmt: skip
            assert value(second, name) is not None, name


def _connection_series(m: Samples) -> list[tuple[str, frozenset[tuple[str, str]]]]:
    return [k for k in m if k[0] in CONNECTION_NAMES]


def test_connection_series_estimate_is_exact_when_every_endpoint_is_connected(
    tmp_path: Path,
) -> None:
    """Every tcp endpoint with a tcp connection and an ipc endpoint with one: the connection
    series served are the estimate's, exactly; with `metrics: false`, none and none
    estimated; per peer, the estimate bounds them."""
    a, b = free_port(), free_port()
    ipc = tmp_path / "s.ipc"
    sockets = textwrap.dedent(f"""\
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{a}, tcp://127.0.0.1:{b}, ipc://{ipc}]
          - name: client
            type: DEALER
            connect: [tcp://127.0.0.1:{a}, tcp://127.0.0.1:{b}, ipc://{ipc}]
        """)
    for section, want in (
        ("connections: {sample_interval: 200ms}\n", 4 * 6 + 2 * 4),
        ("connections: {sample_interval: 200ms, per_peer: true, max_peers_per_endpoint: 3}\n",
         4 * 6 + 2 * 4),
        ("connections: {metrics: false}\n", 0),
    ):  # fmt: skip
        text = section + sockets
        settings = parse_config(text, "x.yml")
        estimate = sum(connection_series(s, settings.connections) for s in settings.sockets)
        if settings.connections.per_peer:
            assert estimate == want * 4  # max_peers_per_endpoint + 1 (`other`)
        else:
            assert estimate == want
        with Daemon(text) as daemon:
            if want:
                wait_until(
                    lambda n=want: len(_connection_series(daemon.scrape())) == n,  # type: ignore[misc]
                    what=f"{want} connection series",
                )
            else:
                wait_until(
                    lambda: total(daemon.scrape(), "zmq_connections", socket="client") == 3,
                    what="3 client connections",
                )
            m = daemon.scrape()
            assert len(_connection_series(m)) == want <= estimate
            if not want:
                assert not [k for k in m if k[0].startswith("zmq_exporter_connection_sample")]


def test_label_values_come_from_config_and_bounded_decodings(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router, dead = free_port(), free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    text = textwrap.dedent(f"""\
        global:
          labels: {{team: ops}}
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{router}, tcp://127.0.0.1:{busy_port}]
            options: {{handshake_ivl: 300ms}}
          - name: client
            type: DEALER
            connect: [tcp://localhost:{dead}]
            options: {{reconnect_ivl: 100ms}}
        """)
    configured = {
        "socket": {"backend", "client"},
        "endpoint": {f"tcp://127.0.0.1:{router}", f"tcp://127.0.0.1:{busy_port}",
                     f"tcp://localhost:{dead}", "", "unmapped"},
        "team": {"ops"},
        "type": {"ROUTER", "DEALER"},
        "reason": set(HANDSHAKE_REASONS),
        "errno": set(errno.errorcode.values()) | {"other"},
        "error": set(errno.errorcode.values()) | set(ZMTP_ERRORS.values())
        | set(ZAP_STATUS.values()) | {"other", "none"},
    }  # fmt: skip
    try:
        with Daemon(text) as daemon:
            # Garbage, silent and half-open TCP peers, a failing bind and a dead connect.
            for payload in (b"", b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n"):
                with socket.create_connection(("127.0.0.1", router), timeout=5) as s:
                    s.sendall(payload)
            wait_until(
                lambda: (value(daemon.scrape(), "zmq_bind_failed_total", errno="EADDRINUSE")
                         or 0) > 0
                and (value(daemon.scrape(), "zmq_connect_retried_total", socket="client") or 0)
                > 0
                and sum(v for (n, ls), v in daemon.scrape().items()
                        if n == "zmq_handshake_failed_total" and ("error", "none") not in ls)
                >= 2,
                what="bind failure, retries and handshake failures counted",
            )  # fmt: skip
            m = daemon.scrape()
            for name, labels in m:
                if not name.startswith("zmq_") or name.startswith("zmq_exporter_"):
                    continue
                for key, val in labels:
                    assert key in configured, (name, key, val)
                    assert val in configured[key], (name, key, val)
    finally:
        busy.close()
