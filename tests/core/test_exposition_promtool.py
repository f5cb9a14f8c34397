"""A real /metrics in both formats, every family of the table present (OTLP on, to a port
nobody listens on, so its own families are there too): `promtool check metrics` (Debian's
Prometheus 2.42, which lints the text format 0.0.4) finds nothing, and prometheus_client's
parsers read every family once, with its type, and in OpenMetrics with its unit. Before
issue 12 the counter zmq_listening_total and the gauge zmq_listening shared the
OpenMetrics family name `zmq_listening`, so the counter came out typed `unknown`."""

from __future__ import annotations

import subprocess
import textwrap
from collections import Counter

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from test_deploy_tools import tool

from exporter.core import metrics

from helpers import Daemon, http_get
from testkit import free_port, wait_until

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def test_promtool_and_both_parsers_accept_every_family() -> None:
    router = free_port()
    # The connection sampler every 100 ms: its RTT families need a sampled tcp connection.
    config = textwrap.dedent(f"""\
        connections: {{sample_interval: 100ms}}
        sockets:
          - {{name: backend, type: ROUTER, bind: ['tcp://127.0.0.1:{router}']}}
          - name: client
            type: DEALER
            connect: ['tcp://127.0.0.1:{router}', 'tcp://127.0.0.1:{free_port()}']
        """)
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    }
    with Daemon(config, env=env) as daemon:
        wait_until(
            lambda: "zmq_connection_rtt_max_seconds{" in http_get(daemon.url + "/metrics"),
            what="the client's tcp connection sampled",
        )
        text = http_get(daemon.url + "/metrics")
        om = http_get(daemon.url + "/metrics", {"Accept": OPENMETRICS})

    lint = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (lint.returncode, lint.stdout, lint.stderr) == (0, "", ""), lint

    table = {f.metric_name: f for f in metrics.DAEMON_FAMILIES}
    for openmetrics, body in ((False, text), (True, om)):
        parsed = list((parse_openmetrics if openmetrics else parse_text)(body))
        names = Counter(f.name for f in parsed)
        assert [n for n, c in names.items() if c > 1] == [], names  # one family per name
        ours = {f.name: f for f in parsed if f.name in table}
        assert set(ours) == set(table), set(table) ^ set(ours)
        for name, family in ours.items():
            spec = table[name]
            assert family.type == spec.type, (openmetrics, name, family.type)
            if openmetrics:
                assert family.unit == (spec.unit or ""), name
                if spec.unit:
                    assert f"# UNIT {name} {spec.unit}\n" in body
    assert "# UNIT" not in text  # the text format has no units
