"""The deploy files against a real Prometheus (Debian's /usr/bin/prometheus) scraping a real
daemon, every second, on 127.0.0.1.

Prometheus runs on deploy/prometheus/prometheus.yml with three mechanical changes: the
target is the test's daemon, scrape and evaluation intervals are 1 s, and it loads a copy of
deploy/prometheus/alerts.yml in which every `for:` is replaced by FOR (10 s) - thresholds,
windows and expressions are the real file's, byte for byte.

The daemon watches: a ROUTER + DEALER pair of its own; DEALER `storm` connected to a peer
ROUTER process that the test kills (SIGKILL) and restarts in a bounded loop; DEALER `quiet`
connected to an identical peer process that is left alone for the same time (the control);
DEALER `missing` pointed at a port where nothing listens (1 s base interval, 30 s backoff:
below the storm threshold); ROUTER `busy` binding a port the test holds (EADDRINUSE).

The same Prometheus also runs the `zmq_probe` job of deploy/prometheus/prometheus-probe.yml
(relabelling as shipped; targets, exporter address and interval replaced): it probes the
`quiet` peer's ROUTER (live) and the `missing` port (nothing listens), so the dashboard's
Probes row is evaluated against real probe results.

The Connection health row and the connection alerts are evaluated against the daemon's real
connection sampler: its tcp connections (worker -> backend, storm, quiet) have RTT samples,
the others (missing: no peer; busy: no listener) only the queue families at 0. No daemon
socket sends application messages (greetings and heartbeats only), so none of their send
queues can be made to grow here and ZmqSlowConsumer cannot be made to fire for real; its
logic is proven by deploy/prometheus/alerts_test.yml. Here each connection rule returns
nothing at its real threshold and, with only its threshold lowered, one row per endpoint
the daemon serves, with the labels its annotations use.

The Messages row is fed as deploy/README.md and docs/relay.md mean it to be: an application
process (APP) counts its own sockets in library mode (`instrument(sock, name,
messages=True, relay=...)`) and relays them to the daemon, which listens on `relay.listen`
and serves them with a `process` label. It exchanges MESSAGE_RATE messages a second
PUSH -> PULL over tcp (bounded in count), and its DEALER `app-stalled` (no peer) makes a
blocking send time out twice a second, so would-block and blocked time are real too.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_tools import DEPLOY, tool

from helpers import Daemon, http_get, value
from testkit import free_port, wait_until

pytestmark = pytest.mark.slow

FOR = "10s"
RATE_INTERVAL = "10s"  # what the test substitutes for Grafana's $__rate_interval
STALE_AFTER = 12  # seconds: the sampler-stale threshold in the stale test's copy of the rules
DASHBOARD = DEPLOY / "grafana" / "zmq-exporter.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROBE_SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus-probe.yml"
PROBE_JOB = "zmq_probe"  # the job of PROBE_SCRAPE_CONFIG (and of probe-alerts.yml)

PEER = textwrap.dedent("""\
    import sys
    import zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(sys.argv[1])
    sys.stdin.read()  # until the test closes stdin (or kills the process)
    router.close()
    ctx.term()
    """)


APP_PROCESS = "e2e-app"  # the application's relay_id: its series' `process` label
APP_SOCKETS = {"app-out", "app-in", "app-stalled"}
MESSAGE_RATE = 50  # messages a second the application sends (and receives)
MESSAGE_BYTES = 100
STALL = 0.1  # s: the stalled socket's SNDTIMEO, met twice a second (a blocked share of ~0.2)
APP = textwrap.dedent(f"""\
    import json, select, sys, time
    import zmq
    import exporter
    relay = sys.argv[1]
    ctx = zmq.Context()
    def counted(kind, name):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        handle = exporter.instrument(sock, name, registry=None, relay=relay,
                                     relay_id="{APP_PROCESS}", messages=True)
        return sock, handle
    pull, pull_h = counted(zmq.PULL, "app-in")
    pull_h.bind("tcp://127.0.0.1:0")
    port = pull.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
    push, push_h = counted(zmq.PUSH, "app-out")
    push_h.connect(f"tcp://127.0.0.1:{{port}}")
    stalled, stalled_h = counted(zmq.DEALER, "app-stalled")  # no peer: sends wait
    stalled.setsockopt(zmq.SNDTIMEO, {int(STALL * 1000)})
    tally = dict(sent=0, received=0, bytes_sent=0, bytes_received=0, would_block=0)
    body = b"m" * {MESSAGE_BYTES}
    period = 1 / {MESSAGE_RATE}
    started = time.monotonic()
    # Bounded: 10 minutes' worth of messages, or until the test says stop (or closes stdin).
    while tally["sent"] < {MESSAGE_RATE} * 600:
        if select.select([sys.stdin], [], [], 0)[0]:
            break
        push.send(body)
        tally["sent"] += 1
        tally["bytes_sent"] += len(body)
        tally["bytes_received"] += len(pull.recv())
        tally["received"] += 1
        if tally["sent"] % ({MESSAGE_RATE} // 2) == 0:
            try:
                stalled.send(b"never")
            except zmq.Again:
                tally["would_block"] += 1
        time.sleep(max(0.0, started + tally["sent"] * period - time.monotonic()))
    print(json.dumps(tally), flush=True)
    sys.stdin.read()  # keeps relaying the final state until the test closes stdin
    for handle in (pull_h, push_h, stalled_h):
        handle.close()
    for sock in (pull, push, stalled):
        sock.close()
    ctx.term()
    """)


def start_peer(endpoint: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", PEER, endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_peer(peer: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if peer.poll() is None:
        peer.send_signal(sig)
    try:
        peer.wait(5)
    except subprocess.TimeoutExpired:
        peer.kill()
        peer.wait(5)
    for stream in (peer.stdin, peer.stderr):
        if stream is not None:
            stream.close()


def stop_app(app: subprocess.Popen[str]) -> None:
    """Closing stdin stops APP (after its tally line, if it was still sending)."""
    try:
        if app.stdin is not None:
            app.stdin.close()
        app.wait(10)
    except (subprocess.TimeoutExpired, BrokenPipeError):
        app.kill()
        app.wait(5)
    if app.stdout is not None:
        app.stdout.close()


def rewrite_for(rules_text: str) -> str:
    """alerts.yml with every `for:` set to FOR, nothing else changed."""
    doc = yaml.safe_load(rules_text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    return str(yaml.safe_dump(doc, sort_keys=False))


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def start(cls, tmp: Path, config: dict[str, Any]) -> Prometheus:
        """A real Prometheus on `config` (written to tmp/prometheus.yml), data in tmp,
        ready to query. The caller stops it with `stop()`."""
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp,
            )
        prom = cls(proc, f"http://127.0.0.1:{port}", log)

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()}"
            try:
                http_get(prom.url + "/-/ready", timeout=1)
                return True
            except OSError:
                return False

        try:
            wait_until(ready, timeout=30, interval=0.1, what="prometheus ready")
        except BaseException:
            prom.stop()
            raise
        return prom

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(f"{self.url}{path}?{query}", timeout=10))
        except urllib.error.HTTPError as e:  # PromQL errors come as 400 with a JSON body
            raise AssertionError(f"{path} {params}: {e.code} {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]


@dataclass
class Stack:
    prom: Prometheus
    daemon: Daemon
    instance: str
    storm_endpoint: str
    quiet_endpoint: str
    peers: list[subprocess.Popen[bytes]]
    probe_live: str  # probe targets of the zmq_probe job
    probe_dead: str
    app: subprocess.Popen[str]  # APP, relaying its counted sockets to the daemon


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    tool("prometheus")  # fails (CI) or skips before any peer starts
    tmp = Path(tempfile.mkdtemp(prefix="zmq-exporter-e2e-"))
    backend, storm, quiet, missing = free_port(), free_port(), free_port(), free_port()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    relay = f"ipc://{tmp}/relay.sock"
    storm_ep, quiet_ep = f"tcp://127.0.0.1:{storm}", f"tcp://127.0.0.1:{quiet}"
    peers = [start_peer(storm_ep), start_peer(quiet_ep)]
    config = textwrap.dedent(f"""\
        global:
          labels: {{app: e2e}}
          options: {{reconnect_ivl: 100ms}}
        sockets:
          - {{name: backend, type: ROUTER, bind: ['tcp://127.0.0.1:{backend}']}}
          - {{name: worker, type: DEALER, connect: ['tcp://127.0.0.1:{backend}']}}
          - {{name: storm, type: DEALER, connect: ['{storm_ep}']}}
          - {{name: quiet, type: DEALER, connect: ['{quiet_ep}']}}
          - name: missing
            type: DEALER
            connect: ['tcp://127.0.0.1:{missing}']
            options: {{reconnect_ivl: 1s, reconnect_ivl_max: 30s}}
          - {{name: busy, type: ROUTER, bind: ['tcp://127.0.0.1:{busy}']}}
        relay: {{listen: ['{relay}'], ipc_mode: "0600"}}
        """)
    daemon = Daemon(config)
    prom: Prometheus | None = None
    app: subprocess.Popen[str] | None = None
    try:
        daemon.start()
        app = subprocess.Popen(
            [sys.executable, "-c", APP, relay],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        instance = f"127.0.0.1:{daemon.port}"
        rules = tmp / "alerts.yml"
        rules.write_text(rewrite_for(ALERTS.read_text()))
        prom_config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        prom_config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        prom_config["rule_files"] = [str(rules)]
        (job,) = prom_config["scrape_configs"]
        job["static_configs"] = [{"targets": [instance]}]
        (probe_job,) = yaml.safe_load(PROBE_SCRAPE_CONFIG.read_text())["scrape_configs"]
        assert probe_job["job_name"] == PROBE_JOB
        probe_dead = f"tcp://127.0.0.1:{missing}"
        probe_job["static_configs"] = [{"targets": [quiet_ep, probe_dead]}]
        probe_job["relabel_configs"][-1]["replacement"] = instance  # the exporter itself
        prom_config["scrape_configs"].append(probe_job)
        prom = Prometheus.start(tmp, prom_config)
        yield Stack(prom, daemon, instance, storm_ep, quiet_ep, peers, quiet_ep, probe_dead, app)
    finally:
        if prom is not None:
            prom.stop()
        if app is not None:
            stop_app(app)
        for peer in peers:
            stop_peer(peer)
        assert daemon.stop() == 0
        holder.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
        if daemon.config_path is not None:
            subprocess.run(["rm", "-rf", str(daemon.config_path.parent)], check=False)


def substitute(expr: str, instance: str, socket_re: str = ".*") -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$instance", instance)
        .replace("$socket", socket_re)
        .replace("$probe_job", PROBE_JOB)
        .replace("$target", ".*")  # All
    )


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (PromQL functions and keywords never start so)."""
    return set(re.findall(r"\b((?:zmq|process)_[a-z_]+|up)\b(?=\s*[{\[)<>!=])", expr))


def probe_metric_names(expr: str) -> set[str]:
    """The /probe families an expression selects (served by /probe, not /metrics)."""
    return set(re.findall(r"\b(probe_[a-z_]+)\b(?=\s*[{\[)])", expr))


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [
        (panel["title"], target["expr"])
        for panel in dash["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(out) >= 20
    return out


def message_panels() -> list[tuple[str, str]]:
    from exporter.core import metrics

    families = {f.name for f in metrics.MESSAGE_FAMILIES}
    return [(t, e) for t, e in dashboard_queries() if metric_names(e) & families]


def test_every_dashboard_and_rule_expression_evaluates(stack: Stack) -> None:
    prom, instance = stack.prom, stack.instance
    # Enough scrapes for every 10 s rate window, and the rules evaluated a few times.
    wait_until(
        lambda: prom.query(f'count_over_time(up{{job="zmq",instance="{instance}"}}[1m]) >= 12'),
        timeout=40,
        interval=0.5,
        what="12 scrapes",
    )
    (up,) = prom.query(f'up{{job="zmq",instance="{instance}"}}')
    assert up["value"][1] == "1"

    # Dashboard variables: label_values(zmq_exporter_build_info, instance) and
    # label_values(zmq_socket_info{instance=~"$instance"}, socket).
    assert {s["metric"]["instance"] for s in prom.query("zmq_exporter_build_info")} == {instance}
    # The daemon's own sockets, and the application's relayed ones with their `process`.
    sockets = {
        (s["metric"].get("process"), s["metric"]["socket"])
        for s in prom.query(substitute('zmq_socket_info{instance=~"$instance"}', instance))
    }
    own = {"backend", "worker", "storm", "quiet", "missing", "busy"}
    assert sockets == {(None, n) for n in own} | {(APP_PROCESS, n) for n in APP_SOCKETS}
    # label_values(probe_success, job) and label_values(probe_success{job=~"$probe_job"},
    # instance): the probe job, and each probed target as its instance.
    assert {s["metric"]["job"] for s in prom.query("probe_success")} == {PROBE_JOB}
    probed = {
        s["metric"]["instance"]: s["value"][1]
        for s in prom.query(substitute('probe_success{job=~"$probe_job"}', instance))
    }
    assert probed == {stack.probe_live: "1", stack.probe_dead: "0"}, probed

    empty = []
    for title, expr in dashboard_queries():
        real = substitute(expr, instance)
        result = prom.query(real)  # raises on any PromQL error
        names = metric_names(expr) | probe_metric_names(expr)
        assert names, (title, expr)
        present = all(prom.query(f'count({{__name__="{n}"}})') for n in names)
        if present:
            assert result, f"{title}: no data for {real}"
        else:
            empty.append(title)
    # Only the failure counters this setup never produces may be absent.
    assert set(empty) <= {"Accept / close failures /s", "Unknown monitor events /s"}, empty
    # The Messages row has data, from the relayed application's sockets only.
    messages = message_panels()
    assert len(messages) == 6, messages
    for title, expr in messages:
        shown = prom.query(substitute(expr, instance))
        labels = {(s["metric"].get("process"), s["metric"]["socket"]) for s in shown}
        assert labels == {(APP_PROCESS, n) for n in APP_SOCKETS}, (title, shown)

    # The Relay row: the one relaying application, its sockets, its series within the budget.
    def relay_value(name: str) -> float:
        (sample,) = prom.query(substitute(f'{name}{{instance=~"$instance"}}', instance))
        return float(sample["value"][1])

    relay_panels = [t for t, e in dashboard_queries() if "zmq_exporter_relay_" in e]
    assert len(relay_panels) == 7, relay_panels  # 4 panels, 7 queries
    assert relay_value("zmq_exporter_relay_processes") == 1
    assert relay_value("zmq_exporter_relay_sockets") == len(APP_SOCKETS)
    series, limit = (relay_value(f"zmq_exporter_relay_series{s}") for s in ("", "_limit"))
    assert 0 < series <= limit, (series, limit)

    # The Probes row says what happened: the dead target fails as connect_refused, the live
    # one has a greeting (NULL, ZMTP 3.1) and a handshake time, the dead one none.
    probe_panels = {title: expr for title, expr in dashboard_queries() if "probe_" in expr}
    assert len(probe_panels) == 4, probe_panels  # success, steps (4 queries), reasons, info
    (failure,) = [e for t, e in dashboard_queries() if "probe_zmtp_failure_info" in e]
    reasons = {
        (s["metric"]["instance"], s["metric"]["reason"])
        for s in prom.query(substitute(failure, instance))
    }
    assert reasons == {(stack.probe_dead, "connect_refused")}, reasons
    (info,) = [e for t, e in dashboard_queries() if "probe_zmtp_info" in e]
    greetings = [s["metric"] for s in prom.query(substitute(info, instance))]
    assert [(g["instance"], g["version"], g["mechanism"]) for g in greetings] == [
        (stack.probe_live, "3.1", "NULL")
    ], greetings
    (handshake,) = [e for t, e in dashboard_queries() if "probe_zmtp_handshake" in e]
    timed = {s["metric"]["instance"] for s in prom.query(substitute(handshake, instance))}
    assert timed == {stack.probe_live}, timed

    # Rule expressions: each evaluates, each metric it selects exists here, and exactly the
    # conditions this setup creates return data (thresholds included).
    expected = {
        "ZmqBindFailed": {"busy"},
        "ZmqBindEndpointNotListening": {"busy"},
        "ZmqConnectEndpointDisconnected": {"missing"},
    }
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 6
    for rule in rules:
        for name in metric_names(rule["expr"]):
            assert prom.query(f'count({{__name__="{name}"}})'), (rule["alert"], name)
        result = prom.query(rule["expr"])
        got = {s["metric"].get("socket") for s in result}
        assert got == expected.get(rule["alert"], set()), (rule["alert"], result)

    # The connection rules with only their threshold lowered: the expression selects one row
    # per endpoint the sampler serves (per instance for the sampler's age), with the labels
    # the annotations and the routing use; so at the real threshold only the value decides.
    by_name = {rule["alert"]: rule["expr"] for rule in rules}
    lowered = {
        "ZmqSlowConsumer": ("> 1048576", "> -1"),
        "ZmqConnectionRetransmitting": (">= 0.5", ">= 0"),
        "ZmqExporterConnectionSamplerStale": ("> 60", "> -1"),
    }
    every_socket = {"backend", "worker", "storm", "quiet", "missing", "busy"}
    for alert, (threshold, low) in lowered.items():
        assert by_name[alert].count(threshold) == 1, (alert, by_name[alert])
        low_expr = by_name[alert].replace(threshold, low)
        # A subquery's points are aligned to multiples of its step (30 s): a young
        # Prometheus may not have one yet.

        def rows(expr: str = low_expr) -> list[dict[str, Any]]:
            return prom.query(expr)

        result = wait_until(rows, timeout=40, interval=0.5, what=low_expr)
        assert {s["metric"]["instance"] for s in result} == {instance}, (alert, result)
        assert {s["metric"]["job"] for s in result} == {"zmq"}, (alert, result)
        if alert == "ZmqExporterConnectionSamplerStale":
            assert len(result) == 1, result
            continue
        assert {s["metric"]["socket"] for s in result} == every_socket, (alert, result)
        assert len(result) == len(every_socket), (alert, result)  # one endpoint each
        assert all(s["metric"]["endpoint"].startswith("tcp://") for s in result), result
        assert all(s["metric"]["app"] == "e2e" for s in result), result
    # And the values the real thresholds compare: small queues, nothing retransmitting
    # on loopback, a sampler that is seconds old.
    queues = prom.query(f'zmq_connection_send_queue_max_bytes{{instance="{instance}"}}')
    assert queues and all(float(s["value"][1]) < 1048576 for s in queues), queues
    (age,) = prom.query(f'zmq_exporter_connection_sample_age_seconds{{instance="{instance}"}}')
    assert 0 <= float(age["value"][1]) < 60, age


def test_messages_row_matches_the_applications_tally(stack: Stack) -> None:
    """The Messages row's values against what APP did. While it sends: messages out on
    app-out and in on app-in at about MESSAGE_RATE, exactly MESSAGE_BYTES per message in
    the bytes panel, would-block on app-stalled only, each costing about STALL of blocked
    time (a blocked share well below ZmqSendBlockedMostOfTheTime's 0.5). Stopped: the
    daemon's relayed totals, and Prometheus's latest samples, equal the app's own tally."""
    from exporter.core import metrics

    prom, instance, app = stack.prom, stack.instance, stack.app
    panels: dict[str, str] = {}
    for _, expr in message_panels():
        (family,) = metric_names(expr)
        panels[family] = expr

    def per_socket(family: str, at: float | None = None) -> dict[str, float]:
        """The panel's values, at one evaluation time `at` (default: now)."""
        when = {} if at is None else {"time": f"{at:.3f}"}
        data = prom.api("/api/v1/query", query=substitute(panels[family], instance), **when)
        rows = data["result"]
        assert {s["metric"].get("process") for s in rows} <= {APP_PROCESS}, rows
        return {s["metric"]["socket"]: float(s["value"][1]) for s in rows}

    # The rate window (RATE_INTERVAL, 10 s) full of sending: this test may run alone on a
    # young stack, where a rate over a series younger than its window is too low. 13 samples
    # in 15 s at the 1 s scrape span more than the window.
    out = f'{metrics.MESSAGES_SENT.name}{{process="{APP_PROCESS}",socket="app-out"}}'
    wait_until(
        lambda: prom.query(f"count_over_time({out}[15s]) >= 13"),
        timeout=60,
        interval=0.5,
        what="app-out's count over a whole rate window in Prometheus",
    )
    at = time.time()  # every panel at the same instant: the same samples in each window
    sent = per_socket(metrics.MESSAGES_SENT.name, at)
    received = per_socket(metrics.MESSAGES_RECEIVED.name, at)
    bytes_out = per_socket(metrics.MESSAGE_BYTES_SENT.name, at)
    bytes_in = per_socket(metrics.MESSAGE_BYTES_RECEIVED.name, at)
    would_block = per_socket(metrics.SEND_WOULD_BLOCK.name, at)
    blocked = per_socket(metrics.SEND_BLOCKED.name, at)
    print(
        f"\nMessages row: sent {sent}, received {received}, bytes out {bytes_out}, in "
        f"{bytes_in}, would block {would_block}, blocked share {blocked} "
        f"(app: {MESSAGE_RATE}/s of {MESSAGE_BYTES} B, a {STALL} s stall twice a second)"
    )
    assert MESSAGE_RATE / 3 < sent["app-out"] < MESSAGE_RATE * 1.5, sent
    assert MESSAGE_RATE / 3 < received["app-in"] < MESSAGE_RATE * 1.5, received
    assert sent["app-in"] == sent["app-stalled"] == received["app-out"] == 0, (sent, received)
    # Same counters' samples, same window: the ratio is exact.
    assert bytes_out["app-out"] == pytest.approx(sent["app-out"] * MESSAGE_BYTES), bytes_out
    assert bytes_in["app-in"] == pytest.approx(received["app-in"] * MESSAGE_BYTES), bytes_in
    assert would_block["app-out"] == would_block["app-in"] == 0, would_block
    assert 0 < would_block["app-stalled"] <= 4, would_block
    assert blocked["app-out"] == blocked["app-in"] == 0, blocked
    per_stall = blocked["app-stalled"] / would_block["app-stalled"]
    assert STALL * 0.9 <= per_stall < STALL * 5, (blocked, would_block)
    assert 0 < blocked["app-stalled"] < 0.5, blocked

    # Stopped, the app prints its tally; the relay then brings the totals to it exactly.
    assert app.stdin is not None and app.stdout is not None
    app.stdin.write("stop\n")
    app.stdin.flush()
    line = app.stdout.readline()
    assert line, f"the app exited {app.poll()}"
    tally = json.loads(line)
    assert tally["sent"] > 0 and tally["would_block"] > 0, tally
    expected = {
        (metrics.MESSAGES_SENT.name, "app-out"): tally["sent"],
        (metrics.MESSAGES_RECEIVED.name, "app-in"): tally["received"],
        (metrics.MESSAGE_BYTES_SENT.name, "app-out"): tally["bytes_sent"],
        (metrics.MESSAGE_BYTES_RECEIVED.name, "app-in"): tally["bytes_received"],
        (metrics.SEND_WOULD_BLOCK.name, "app-stalled"): tally["would_block"],
    }

    def relayed() -> dict[tuple[str, str], float | None]:
        samples = stack.daemon.scrape()
        return {
            (name, sock): value(samples, name, process=APP_PROCESS, socket=sock)
            for name, sock in expected
        }

    wait_until(lambda: relayed() == expected, timeout=15, what=f"relayed totals == {tally}")

    def scraped() -> dict[tuple[str, str], float | None]:
        got: dict[tuple[str, str], float | None] = {}
        for name, sock in expected:
            rows = prom.query(
                f'{name}{{instance="{instance}",process="{APP_PROCESS}",socket="{sock}"}}'
            )
            got[name, sock] = float(rows[0]["value"][1]) if len(rows) == 1 else None
        return got

    wait_until(lambda: scraped() == expected, timeout=15, what=f"Prometheus totals == {tally}")


def test_connection_health_row_shows_the_sampled_connections(stack: Stack) -> None:
    """The Connection health row against the daemon's real sampler: RTT for exactly the
    endpoints with a tcp connection, the queue and retransmission panels for every
    endpoint, and the sampler's age and duration in the Exporter row."""
    prom, instance = stack.prom, stack.instance
    panels = dict(dashboard_queries())
    connected = {"backend", "worker", "storm", "quiet"}  # missing: no peer; busy: no listener

    def sockets(title: str) -> dict[str, float]:
        rows = prom.query(substitute(panels[title], instance))
        return {s["metric"]["socket"]: float(s["value"][1]) for s in rows}

    # The sampler samples every 2 s; the fixture's first test waited for 12 scrapes, but
    # this one may run alone: wait for the RTT of every connected endpoint.
    wait_until(
        lambda: set(sockets("Max RTT per endpoint")) == connected,
        timeout=30,
        interval=0.5,
        what="RTT of every connected endpoint in Prometheus",
    )
    for title in ("Max RTT per endpoint", "Average RTT per endpoint"):
        rtt = sockets(title)
        assert set(rtt) == connected, (title, rtt)
        assert all(0 < v < 1 for v in rtt.values()), (title, rtt)  # loopback: microseconds
    every_socket = connected | {"missing", "busy"}
    for title in (
        "Connections retransmitting",
        "Send queue (summed)",
        "Largest send queue",
        "Receive queue (summed)",
    ):
        got = sockets(title)
        assert set(got) == every_socket, (title, got)
        assert all(v < 1048576 for v in got.values()), (title, got)
    assert set(sockets("Connections retransmitting").values()) == {0.0}
    (age_expr, duration_expr) = [
        e for t, e in dashboard_queries() if t == "Connection sampler age and duration"
    ]
    (age,) = prom.query(substitute(age_expr, instance))
    (duration,) = prom.query(substitute(duration_expr, instance))
    assert 0 <= float(age["value"][1]) < 60, age
    assert 0 < float(duration["value"][1]) < 5, duration


def test_dashboard_connection_health_row_selects_the_connection_families() -> None:
    """Every connection family has a panel in the Connection health row, selected by
    `$instance` and `$socket` and grouped per endpoint; byte families in bytes, RTT in
    seconds; every sampler family has one in the Exporter row."""
    from exporter.core import metrics

    dash = json.loads(DASHBOARD.read_text())
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in dash["panels"] if p["type"] == "row")
    assert [t for _, t in rows] == [
        "Connections",
        "Failures",
        "Connection health",
        "Messages",
        "Exporter",
        "Probes",
        "Relay",
    ]

    def row_of(panel: dict[str, Any]) -> str:
        return str([t for y, t in rows if y < panel["gridPos"]["y"]][-1])

    connection = {f.name for f in metrics.CONNECTION_FAMILIES}
    sampler = {f.name for f in metrics.SAMPLER_FAMILIES}
    seen: dict[str, set[str]] = {"Connection health": set(), "Exporter": set()}
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            if names & connection:
                assert row_of(panel) == "Connection health", panel["title"]
                assert 'instance=~"$instance",socket=~"$socket"' in target["expr"]
                assert "by (instance, socket, endpoint)" in target["expr"]
                unit = panel["fieldConfig"]["defaults"]["unit"]
                assert unit == (
                    "s"
                    if "rtt" in target["expr"]
                    else "bytes"
                    if "queue" in target["expr"]
                    else "short"
                ), panel["title"]
                seen["Connection health"] |= names
            if names & sampler:
                assert row_of(panel) == "Exporter", panel["title"]
                seen["Exporter"] |= names
    assert seen == {"Connection health": connection, "Exporter": sampler}


def test_dashboard_messages_row_shows_every_message_family() -> None:
    """Every message family (library mode's `messages=True`) has a panel in the Messages
    row, selected by `$instance` and `$socket`, per socket (and relaying process), as a
    rate; the blocked time as a share of time."""
    from exporter.core import metrics

    dash = json.loads(DASHBOARD.read_text())
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in dash["panels"] if p["type"] == "row")
    families = {f.name for f in metrics.MESSAGE_FAMILIES}
    seen: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names = metric_names(target["expr"]) & families
            if not names:
                continue
            row = [t for y, t in rows if y < panel["gridPos"]["y"]][-1]
            assert row == "Messages", panel["title"]
            expr = target["expr"]
            assert 'instance=~"$instance",socket=~"$socket"' in expr, panel["title"]
            assert "by (instance, process, socket)" in expr and "rate(" in expr, panel["title"]
            unit = panel["fieldConfig"]["defaults"]["unit"]
            blocked = metrics.SEND_BLOCKED.name in names
            assert unit == ("percentunit" if blocked else "Bps" if "bytes" in expr else "short")
            seen |= names
    assert seen == families


def test_dashboard_relay_row_shows_every_relay_family() -> None:
    """Every family of a daemon's relay has a panel in the Relay row, selected by
    `$instance`; counters as rates."""
    from exporter.core import metrics

    dash = json.loads(DASHBOARD.read_text())
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in dash["panels"] if p["type"] == "row")
    families = {f.name: f for f in metrics.RELAY_FAMILIES}
    seen: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names = metric_names(target["expr"]) & set(families)
            if not names:
                continue
            row = [t for y, t in rows if y < panel["gridPos"]["y"]][-1]
            assert row == "Relay", panel["title"]
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
            counters = [n for n in names if families[n].type == "counter"]
            assert not counters or "rate(" in target["expr"], panel["title"]
            seen |= names
    assert seen == set(families)


def connections(daemon: Daemon, endpoint: str) -> float | None:
    return value(daemon.scrape(), "zmq_connections", endpoint=endpoint)


def test_reconnect_storm_fires_while_a_quiet_socket_stays_inactive(stack: Stack) -> None:
    prom, daemon = stack.prom, stack.daemon
    wait_until(lambda: connections(daemon, stack.quiet_endpoint) == 1, what="quiet connected")
    wait_until(lambda: connections(daemon, stack.storm_endpoint) == 1, what="storm connected")
    assert prom.alerts("ZmqReconnectStorm") == []

    start = time.monotonic()
    deadline = start + 90
    cycles = 0
    pending_at = fired_at = None
    quiet_alerts: list[dict[str, Any]] = []
    while cycles < 500 and time.monotonic() < deadline:
        peer = stack.peers[0]
        stop_peer(peer, signal.SIGKILL)  # the peer crashes
        wait_until(lambda: connections(daemon, stack.storm_endpoint) == 0, what="disconnect")
        stack.peers[0] = peer = start_peer(stack.storm_endpoint)  # and comes back

        def reconnected(p: subprocess.Popen[bytes] = peer) -> bool:
            assert p.poll() is None, f"peer exited {p.returncode}"
            return connections(daemon, stack.storm_endpoint) == 1

        wait_until(reconnected, timeout=10, what="storm reconnected")
        cycles += 1
        alerts = prom.alerts("ZmqReconnectStorm")
        quiet_alerts += [a for a in alerts if a["labels"].get("socket") != "storm"]
        storm = [a for a in alerts if a["labels"].get("socket") == "storm"]
        if storm and pending_at is None:
            pending_at = time.monotonic() - start
        if storm and storm[0]["state"] == "firing":
            fired_at = time.monotonic() - start
            break
    elapsed = time.monotonic() - start
    print(
        f"\nreconnect storm: {cycles} kill/restart cycles, pending after {pending_at}s, "
        f"firing after {fired_at}s (for: {FOR}, scrape/eval 1s)"
    )
    assert fired_at is not None, f"ZmqReconnectStorm not firing after {elapsed:.0f}s"
    (alert,) = [a for a in prom.alerts("ZmqReconnectStorm") if a["labels"]["socket"] == "storm"]
    assert alert["labels"]["endpoint"] == stack.storm_endpoint
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["app"] == "e2e"
    assert stack.storm_endpoint in alert["annotations"]["description"]
    assert alert["annotations"]["summary"] == (
        f"ZeroMQ reconnect storm on storm {stack.storm_endpoint}"
    )
    # The control: the quiet socket, with the same kind of peer up for the same time, never
    # had the alert pending or firing, and its storm score is exactly 0.
    assert quiet_alerts == []
    assert [a for a in prom.alerts("ZmqReconnectStorm") if a["labels"]["socket"] != "storm"] == []
    window = f"{max(int(elapsed) + 2, 5)}s"
    quiet = prom.query(
        f'rate(zmq_connect_retried_total{{socket="quiet"}}[{window}])'
        f' + rate(zmq_disconnected_total{{socket="quiet"}}[{window}])'
    )
    assert [s["value"][1] for s in quiet] == ["0"]
    storm = prom.query(f'increase(zmq_disconnected_total{{socket="storm"}}[{window}])')
    assert float(storm[0]["value"][1]) >= cycles * 0.5


def test_sampler_stale_fires_in_a_real_prometheus(tmp_path: Path) -> None:
    """ZmqExporterConnectionSamplerStale from a real daemon whose sampler stops sampling:
    `sample_interval: 1h` makes it take one sample at start and none after, so its age
    grows as a frozen sampler's does. The rule (for: FOR), with its 60 s threshold lowered to
    STALE_AFTER (the 60 s itself is pinned by promtool's unit tests, alerts_test.yml), is
    silent while the age is below it and fires after it; no other connection alert goes
    pending. (With the shipped 60 s this test waited 72 s.)"""
    tool("prometheus")
    backend = free_port()
    config = textwrap.dedent(f"""\
        connections: {{sample_interval: 1h}}
        sockets:
          - {{name: backend, type: ROUTER, bind: ['tcp://127.0.0.1:{backend}']}}
          - {{name: worker, type: DEALER, connect: ['tcp://127.0.0.1:{backend}']}}
        """)
    prom: Prometheus | None = None
    with Daemon(config) as daemon:
        try:
            instance = f"127.0.0.1:{daemon.port}"
            rules = tmp_path / "alerts.yml"
            shipped = rewrite_for(ALERTS.read_text())
            assert shipped.count("zmq_exporter_connection_sample_age_seconds > 60") == 1
            rules.write_text(
                shipped.replace(
                    "zmq_exporter_connection_sample_age_seconds > 60",
                    f"zmq_exporter_connection_sample_age_seconds > {STALE_AFTER}",
                )
            )
            prom_config = yaml.safe_load(SCRAPE_CONFIG.read_text())
            prom_config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            prom_config["rule_files"] = [str(rules)]
            (job,) = prom_config["scrape_configs"]
            job["static_configs"] = [{"targets": [instance]}]
            prom = Prometheus.start(tmp_path, prom_config)
            started = time.monotonic()
            age_expr = f'zmq_exporter_connection_sample_age_seconds{{instance="{instance}"}}'

            def age() -> float:
                rows = prom.query(age_expr) if prom else []
                return float(rows[0]["value"][1]) if rows else -1.0

            connection_alerts = {
                "ZmqExporterConnectionSamplerStale",
                "ZmqSlowConsumer",
                "ZmqConnectionRetransmitting",
            }

            def active() -> list[dict[str, Any]]:
                assert prom is not None
                return [
                    a
                    for a in prom.api("/api/v1/alerts")["alerts"]
                    if a["labels"]["alertname"] in connection_alerts
                ]

            # Below the threshold: silent (checked at every poll, a sampling period of 1 s,
            # until the age is 2 s short of it).
            while (now := age()) < STALE_AFTER - 2:
                assert active() == [], (now, active())
                assert time.monotonic() - started < STALE_AFTER + 30, now
                time.sleep(1)

            def firing() -> list[dict[str, Any]]:
                return [a for a in active() if a["state"] == "firing"]

            (alert,) = wait_until(firing, timeout=60, interval=0.5, what="stale firing")
            print(
                f"\nsampler stale: firing {time.monotonic() - started:.0f}s after Prometheus "
                f"started, age {age():.0f}s (threshold {STALE_AFTER}s, for: {FOR})"
            )
            assert alert["labels"]["alertname"] == "ZmqExporterConnectionSamplerStale"
            assert alert["labels"]["instance"] == instance
            assert alert["labels"]["severity"] == "warning"
            assert float(alert["value"]) > STALE_AFTER
            assert [a["labels"]["alertname"] for a in active()] == [
                "ZmqExporterConnectionSamplerStale"
            ]
        finally:
            if prom is not None:
                prom.stop()
