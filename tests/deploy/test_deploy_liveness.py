"""Liveness against real peers and a real Prometheus (Debian's /usr/bin/prometheus, 1 s scrape
and evaluation, deploy/prometheus/alerts.yml with every `for:` set to FOR and nothing else
changed), all on 127.0.0.1:

- a peer ROUTER process stopped with SIGSTOP: `zmq_connection_ready` drops to 0 within
  heartbeat_timeout + handshake_ivl + 2 s while `zmq_connections` still counts its TCP
  connection, ZmqConnectEndpointNotReady becomes active; SIGCONT: ready is 1 again and the
  alert resolves;
- a peer that is killed and stays down (libzmq's default reconnect_ivl, no backoff: 6.7
  connect retries/s) fires ZmqConnectEndpointDisconnected and nothing else: not
  ZmqReconnectStorm (it did before issue 12), not ZmqConnectEndpointNotReady;
- a bind that fails once and is never retried (bind_retry_interval 1h) fires ZmqBindFailed,
  whether its errno row exists at the first scrape or appears after Prometheus has scraped
  the exporter for a while (added by a reload); the frozen peer's first handshake failure
  (a new `error="EAGAIN"` row) fires ZmqHandshakeFailures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_e2e import ALERTS, SCRAPE_CONFIG, Prometheus, start_peer, stop_peer

from helpers import Daemon, http_post, value, write_atomic
from testkit import free_port, wait_until

pytestmark = pytest.mark.slow

FOR = "2s"
# The frozen peer's socket overrides the exporter's heartbeat defaults (5s/15s/10s) to keep
# the test short; the mechanism is the same.
HEARTBEAT_IVL, HEARTBEAT_TIMEOUT, HANDSHAKE_IVL = 1.0, 3.0, 2.0
READY_WITHIN = HEARTBEAT_TIMEOUT + HANDSHAKE_IVL + 2


def rules_with_short_for() -> str:
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    return str(yaml.safe_dump(doc, sort_keys=False))


def config(frozen: str, gone: str, busy: int, late: int | None = None) -> str:
    text = textwrap.dedent(f"""\
        global:
          bind_retry_interval: 1h      # a failed bind is not retried during the test
          bind_retry_max_interval: 1h
        sockets:
          - name: frozen
            type: DEALER
            connect: ['{frozen}']
            options: {{heartbeat_ivl: 1s, heartbeat_timeout: 3s, handshake_ivl: 2s}}
          - name: gone                 # libzmq's reconnect defaults: 100ms, no backoff
            type: DEALER
            connect: ['{gone}']
          - {{name: once, type: ROUTER, bind: ['tcp://127.0.0.1:{busy}']}}
        """)
    if late is not None:
        text += f"  - {{name: late, type: ROUTER, bind: ['tcp://127.0.0.1:{late}']}}\n"
    return text


def held_port() -> tuple[socket.socket, int]:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


def start_prometheus(tmp: Path, instance: str) -> Prometheus:
    rules = tmp / "alerts.yml"
    rules.write_text(rules_with_short_for())
    prom_config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    prom_config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    prom_config["rule_files"] = [str(rules)]
    (job,) = prom_config["scrape_configs"]
    job["static_configs"] = [{"targets": [instance]}]
    return Prometheus.start(tmp, prom_config)


def active(prom: Prometheus) -> list[tuple[str, str, str]]:
    """(alert, socket, state) of every pending or firing alert."""
    return sorted(
        (a["labels"]["alertname"], a["labels"].get("socket", ""), a["state"])
        for a in prom.api("/api/v1/alerts")["alerts"]
    )


def has(prom: Prometheus, alert: str, sock: str, state: str | None = None) -> bool:
    return any(
        (a, s) == (alert, sock) and (state is None or st == state) for a, s, st in active(prom)
    )


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zmq-exporter-liveness-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_frozen_peer_down_peer_and_a_bind_that_fails_once(tmp: Path) -> None:
    started = time.monotonic()
    frozen_ep = f"tcp://127.0.0.1:{free_port()}"
    gone_ep = f"tcp://127.0.0.1:{free_port()}"
    (holder, busy), (late_holder, late) = held_port(), held_port()
    peers = {"frozen": start_peer(frozen_ep), "gone": start_peer(gone_ep)}
    daemon = Daemon(config(frozen_ep, gone_ep, busy))
    prom: Prometheus | None = None
    try:
        daemon.start()

        def ready(sock: str) -> float | None:
            return value(daemon.scrape(), "zmq_connection_ready", socket=sock)

        wait_until(lambda: ready("frozen") == ready("gone") == 1, timeout=10, what="ready")
        prom = start_prometheus(tmp, f"127.0.0.1:{daemon.port}")
        p = prom
        wait_until(
            lambda: p.query('count_over_time(up{job="zmq"}[1m]) >= 3'), timeout=20, what="scrapes"
        )

        # A bind that failed once at start: its errno row is there from the first scrape.
        wait_until(lambda: has(p, "ZmqBindFailed", "once", "firing"), timeout=10, what="once")
        # One that fails once after Prometheus has scraped the exporter: the row appears.
        assert daemon.config_path is not None
        write_atomic(daemon.config_path, config(frozen_ep, gone_ep, busy, late))
        assert http_post(daemon.url + "/-/reload")[0] == 200
        wait_until(lambda: has(p, "ZmqBindFailed", "late", "firing"), timeout=10, what="late")
        m = daemon.scrape()
        for sock in ("once", "late"):
            assert value(m, "zmq_bind_failed_total", socket=sock, errno="EADDRINUSE") == 1
            assert value(m, "zmq_listening", socket=sock) == 0

        # Freeze one peer, kill the other for good.
        stopped = time.monotonic()
        os.kill(peers["frozen"].pid, signal.SIGSTOP)
        stop_peer(peers["gone"], signal.SIGKILL)
        seen: set[tuple[str, str, str]] = set()

        def frozen_not_ready() -> bool:
            seen.update(active(p))
            m = daemon.scrape()
            return value(m, "zmq_connection_ready", socket="frozen") == 0

        wait_until(frozen_not_ready, timeout=READY_WITHIN, interval=0.1, what="frozen not ready")
        not_ready_after = time.monotonic() - stopped

        def alerts_active() -> bool:
            seen.update(active(p))
            return has(p, "ZmqConnectEndpointNotReady", "frozen", "firing") and has(
                p, "ZmqConnectEndpointDisconnected", "gone", "firing"
            )

        wait_until(alerts_active, timeout=20, interval=0.2, what="not-ready and down alerts")
        alert_after = time.monotonic() - stopped
        # Still connected at TCP level: the peer's kernel accepts every reconnect.
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", socket="frozen") == 1,
            timeout=5,
            what="frozen peer's kernel accepts",
        )
        assert value(daemon.scrape(), "zmq_connection_ready", socket="frozen") == 0
        # The first handshake that timed out is a new row, and its alert fires. Its `error`
        # is whatever errno libzmq's I/O thread saw last (a timeout sets none): EAGAIN in
        # issue 12, ECONNREFUSED here, from the dead peer's connects in the same context.

        def handshake_timed_out() -> bool:
            return any(
                name == "zmq_handshake_failed_total"
                and {("socket", "frozen"), ("reason", "no_detail")} <= labels
                and ("error", "none") not in labels
                and v > 0
                for (name, labels), v in daemon.scrape().items()
            )

        wait_until(handshake_timed_out, timeout=HANDSHAKE_IVL + 3, what="handshake timeout")
        wait_until(
            lambda: has(p, "ZmqHandshakeFailures", "frozen", "firing"), timeout=10, what="hs"
        )
        # The dead peer: retrying at libzmq's default pace, down and nothing else.
        retries = prom.query('rate(zmq_connect_retried_total{socket="gone"}[5s])')
        assert float(retries[0]["value"][1]) > 2, retries

        # Resume: ready again, and the not-ready alert resolves.
        resumed = time.monotonic()
        os.kill(peers["frozen"].pid, signal.SIGCONT)
        wait_until(lambda: ready("frozen") == 1, timeout=READY_WITHIN, what="ready again")
        ready_again_after = time.monotonic() - resumed

        def resolved() -> bool:
            seen.update(active(p))
            return not has(p, "ZmqConnectEndpointNotReady", "frozen")

        wait_until(resolved, timeout=15, interval=0.2, what="not-ready alert resolved")
        seen.update(active(p))
        print(
            f"\nliveness: not ready {not_ready_after:.1f}s after SIGSTOP (bound {READY_WITHIN}s),"
            f" alerts firing after {alert_after:.1f}s (for: {FOR}), ready again"
            f" {ready_again_after:.1f}s after SIGCONT, {time.monotonic() - started:.0f}s in all"
        )
        assert not_ready_after <= READY_WITHIN
        # Only the down alert for the dead peer; no storm anywhere; the frozen peer is not
        # taken for a dead one either.
        assert {a for a, s, _ in seen if s == "gone"} == {"ZmqConnectEndpointDisconnected"}, seen
        assert not [x for x in seen if x[0] == "ZmqReconnectStorm"], seen
        assert ("ZmqConnectEndpointDisconnected", "frozen", "firing") not in seen, seen
        assert time.monotonic() - started < 90
    finally:
        if peers["frozen"].poll() is None:
            os.kill(peers["frozen"].pid, signal.SIGCONT)
        for peer in peers.values():
            stop_peer(peer)
        if prom is not None:
            prom.stop()
        assert daemon.stop() == 0
        holder.close()
        late_holder.close()
        if daemon.config_path is not None:
            subprocess.run(["rm", "-rf", str(daemon.config_path.parent)], check=False)


def test_alert_rules_reference_only_served_families() -> None:
    """Every metric the rules and the dashboard select is a family of the table (or `up`,
    `process_*`): a renamed family cannot leave a rule selecting nothing."""
    from test_deploy_e2e import DASHBOARD, metric_names

    from exporter.core import metrics

    # The message families are served by applications (library mode) and relay sidecars,
    # the relay's own by a daemon whose relay is on.
    families = (*metrics.DAEMON_FAMILIES, *metrics.MESSAGE_FAMILIES, *metrics.RELAY_FAMILIES)
    served = {f.name for f in families} | {"up"}
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    exprs: list[Any] = [r["expr"] for r in rules]
    dash = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    for expr in exprs:
        for name in metric_names(expr):
            assert name in served or name.startswith("process_"), (name, expr)
    assert any("zmq_connection_ready" in e for e in exprs[: len(rules)])
    assert any("zmq_connection_ready" in e for e in exprs[len(rules) :])
