"""GET /probe on a real daemon (issue 17): a probe-only config (modules, no sockets), the
blackbox-style API over HTTP, modules replaced by a reload, and 1,000 probes in a row
through the web server leave the daemon's fd count flat."""

from __future__ import annotations

import http.client
import signal
import socket
import time
import urllib.error
import urllib.parse

import zmq

from helpers import Daemon, http_get, open_fds, parse_metrics, value, write_atomic
from testkit import wait_until

Ctx = zmq.Context[zmq.Socket[bytes]]

CONFIG = """\
modules:
  local:
    timeout: 2s
    allowed_targets: ["tcp://127.0.0.1:*"]
"""


def url_of(daemon: Daemon, target: str, **params: str) -> str:
    query = urllib.parse.urlencode({"target": target, **params})
    return f"{daemon.url}/probe?{query}"


def status_of(url: str) -> tuple[int, str]:
    try:
        return 200, http_get(url)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_over_http(ctx: Ctx) -> None:
    router = ctx.socket(zmq.ROUTER)
    target = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    dead = f"tcp://127.0.0.1:{free_tcp_port()}"
    with Daemon(CONFIG) as daemon:
        body = http_get(url_of(daemon, target), {"X-Prometheus-Scrape-Timeout-Seconds": "3"})
        samples = parse_metrics(body)
        assert value(samples, "probe_success") == 1.0, body
        assert value(samples, "probe_zmtp_info", mechanism="NULL", version="3.1") == 1.0
        samples = parse_metrics(http_get(url_of(daemon, dead, module="local")))
        assert value(samples, "probe_success") == 0.0
        assert value(samples, "probe_zmtp_failure_info", reason="connect_refused") == 1.0
        text = http_get(url_of(daemon, dead, debug="true"))
        assert text.startswith("Logs for the probe:\n") and "reason=connect_refused" in text
        assert status_of(url_of(daemon, target, module="nope"))[0] == 400
        assert status_of(f"{daemon.url}/probe")[0] == 400
        code, text = status_of(url_of(daemon, "tcp://192.0.2.1:5555", module="local"))
        assert code == 403 and "not allowed" in text
        # /metrics is still the daemon's own: no probe families there.
        assert "probe_success" not in http_get(daemon.url + "/metrics")


def test_reload_replaces_modules(ctx: Ctx) -> None:
    router = ctx.socket(zmq.ROUTER)
    target = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    with Daemon(CONFIG) as daemon:
        assert status_of(url_of(daemon, target, module="later"))[0] == 400
        assert daemon.config_path is not None and daemon.proc is not None
        write_atomic(daemon.config_path, CONFIG + "  later: {socket_type: REQ}\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: status_of(url_of(daemon, target, module="later"))[0] == 200,
            timeout=10,
            what="module `later` after the reload",
        )


def test_thousand_probes_leave_the_daemon_fds_flat(ctx: Ctx) -> None:
    router = ctx.socket(zmq.ROUTER)
    live = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    dead = f"tcp://127.0.0.1:{free_tcp_port()}"
    with Daemon(CONFIG) as daemon:
        assert daemon.proc is not None
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)

        def probe(target: str) -> str:
            conn.request("GET", "/probe?" + urllib.parse.urlencode({"target": target}))
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 200, body
            return body

        for target in (live, dead):  # warm up: the prober's context, the DNS threads
            probe(target)
        before = open_fds(daemon.proc.pid)
        started = time.monotonic()
        for i in range(1000):
            body = probe(live if i % 2 == 0 else dead)
            assert ("probe_success 1.0" in body) == (i % 2 == 0), (i, body)
        took = time.monotonic() - started
        conn.close()
        pid = daemon.proc.pid
        # libzmq closes sockets on its own threads: let them settle (a leak never does).
        wait_until(lambda: open_fds(pid) <= before + 2, timeout=5, what=f"fds back to {before}")
    assert took < 60, took
