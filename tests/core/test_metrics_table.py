"""The metrics table (`exporter.core.metrics`) is the one definition of every family: the tables
of docs/metrics.md and docs/otlp.md are generated from it, a real /metrics serves exactly its
families (names, types, help, labels) in both formats, the rows of a fresh socket follow its
initial-zero rules, and the facts derived from it (reserved labels, counters at 0, the series
estimate) agree.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import typing
from dataclasses import replace

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.config import ConfigError, parse_config
from exporter.config.cardinality import BIND_SERIES, CONNECT_SERIES, SOCKET_SERIES
from exporter.connections import sampler
from exporter.connections.kernel import GoneReason
from exporter.core import metrics
from exporter.core.endpoints import EndpointMap
from exporter.core.events import ERRNO_EVENTS
from exporter.core.state import EngineSnapshot, ReaderStats, SocketState, snapshot_socket
from exporter.render.prometheus import render_self
from exporter.render.rows import SOCKET_FAMILIES, socket_rows

from helpers import ROOT, Daemon, http_get, value
from testkit import free_port, wait_until

METRICS_DOC = (ROOT / "docs" / "metrics.md").read_text()
OTLP_DOC = (ROOT / "docs" / "otlp.md").read_text()
# Every page a metric table may be on: the front page and the reference pages.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
FOREIGN = ("process_", "python_")  # prometheus_client's own collectors


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text`: rows of cells, the header row first."""
    out: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if not all(set(c) <= {"-", ":"} for c in cells):  # not the separator row
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


def code_names(cell: str) -> tuple[str, ...]:
    return tuple(re.findall(r"`([^`]*)`", cell))


def test_docs_tables_are_the_table() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "exporter.core.metrics", "--markdown"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert generated == metrics.markdown()
    assert generated in METRICS_DOC, "docs/metrics.md's table: regenerate it with " + (
        "python -m exporter.core.metrics --markdown"
    )
    assert metrics.markdown("otel") in OTLP_DOC, (
        "docs/otlp.md's OTel names table: regenerate it with python -m exporter.core.metrics "
        "--markdown otel"
    )
    # Every row of every metric table of the docs (the OTLP push's own, /probe's, the
    # relay's and the message counts' too) says what the table says, and every family is
    # in exactly one.
    table = {f.name: f for f in metrics.FAMILIES}
    seen = []
    for rows in (rows for page in DOCS for rows in tables(page.read_text())):
        header = rows[0]
        if not header[0].endswith("metric") or header[1] != "type":
            continue
        for row in rows[1:]:
            cell = row[0].strip("`")
            name, _, braces = cell.partition("{")
            assert name in table, f"docs row {row[0]} is not in the table"
            family = table[name]
            labels = code_names(row[2]) if header[2] in ("extra labels", "labels") else (
                tuple(re.findall(r"(\w+)=", braces))
            )  # fmt: skip
            assert (row[1], labels) == (family.type, family.labels), row
            seen.append(name)
    assert sorted(seen) == sorted(table)


def translate(family: metrics.Family) -> str:
    """The standard OTLP→Prometheus name of a pushed family's instrument (docs/otlp.md)."""
    assert family.otel_name is not None
    name = family.otel_name.replace(".", "_")
    if family.otel_unit == "s":
        name += "_seconds"
    elif family.otel_unit == "By":
        name += "_bytes"
    if family.type == "counter":
        name = name.removesuffix("_total") + "_total"
    return name


def test_otel_names_translate_to_the_prometheus_names() -> None:
    assert [translate(f) for f in metrics.PUSHED] == [f.name for f in metrics.PUSHED]
    assert all(f.type in ("counter", "gauge") for f in metrics.PUSHED)
    assert {f.group for f in metrics.PUSHED} == {
        "socket",
        "connection",
        "build",
        "engine",
        "reload",
    }
    rows = tables(metrics.markdown("otel"))[0][1:]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        (f"`{f.otel_name}`", f"`{f.otel_unit}`" if f.otel_unit else "", f"`{f.name}`")
        for f in metrics.PUSHED
    ]


def expected(family: metrics.Family, openmetrics: bool) -> tuple[str, str]:
    """(family name, type) as a parser of the format reports `family`: the same in both
    formats, since no two families share a name under either."""
    return family.metric_name, family.type


def test_scrape_serves_exactly_the_table() -> None:
    """Both formats of a real /metrics, OTLP on (to a port nobody listens on, so its own
    families are there too), the connection sampler on (its default) and a tcp connection
    sampled: every family is in the table with its type, help and labels."""
    router = free_port()
    config = textwrap.dedent(f"""\
        global:
          labels: {{team: ops}}
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{router}]
          - name: client
            type: DEALER
            connect: [tcp://127.0.0.1:{router}, tcp://127.0.0.1:{free_port()}]
        """)
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    }
    with Daemon(config, env=env) as daemon:
        wait_until(
            lambda: (
                value(daemon.scrape(), "zmq_connection_rtt_max_seconds", socket="client")
                is not None
            ),
            what="the client's tcp connection sampled",
        )
        bodies = {
            False: http_get(daemon.url + "/metrics"),
            True: http_get(daemon.url + "/metrics", {"Accept": OPENMETRICS}),
        }
    table = {f.name: f for f in metrics.DAEMON_FAMILIES}
    for openmetrics, body in bodies.items():
        parse = parse_openmetrics if openmetrics else parse_text
        served: dict[str, Metric] = {
            f.name: f for f in parse(body) if not f.name.startswith(FOREIGN)
        }
        want = {expected(f, openmetrics)[0]: f for f in table.values()}
        # Served but not in the table, or in the table but not served:
        assert not set(served) ^ set(want), (openmetrics, set(served) ^ set(want))
        for name, family in served.items():
            spec = want[name]
            assert (family.type, family.documentation) == (
                expected(spec, openmetrics)[1],
                spec.help,
            ), name
            # OpenMetrics declares the unit (`# UNIT`); the text format 0.0.4 has none.
            assert family.unit == ((spec.unit or "") if openmetrics else ""), name
            allowed = {*spec.label_names, "team"} | ({"le"} if spec.type == "histogram" else set())
            for sample in family.samples:
                assert set(sample.labels) <= allowed, sample
                if spec.group not in ("socket", "connection"):
                    assert set(sample.labels) - {"le"} == set(spec.labels), sample
            if spec.values:
                assert sorted(s.labels[spec.labels[0]] for s in family.samples) == sorted(
                    spec.values
                )


def test_fresh_socket_rows_follow_the_initial_rules() -> None:
    binds = ("tcp://127.0.0.1:1", "ipc:///tmp/x")
    connects = ("tcp://127.0.0.1:2",)
    sock = SocketState("s", "DEALER", {}, EndpointMap(binds, connects))
    rows: dict[tuple[str, str | None], int] = {}
    for index, endpoint, _, _ in socket_rows(snapshot_socket(sock)):
        key = (metrics.SOCKET_FAMILIES[index].name, endpoint)
        rows[key] = rows.get(key, 0) + 1
    want: dict[tuple[str, str | None], int] = {}
    for family in metrics.SOCKET_FAMILIES:
        roles = family.initial_roles()
        for role, endpoints in (("bind", binds), ("connect", connects), (None, (None,))):
            if role in roles:
                for endpoint in endpoints:
                    want[(family.name, endpoint)] = family.initial_rows
    assert rows == want
    assert sum(n for (_, ep), n in rows.items() if ep == binds[0]) == BIND_SERIES - 1
    assert sum(n for (_, ep), n in rows.items() if ep == connects[0]) == CONNECT_SERIES - 1
    assert sum(n for (_, ep), n in rows.items() if ep is None) == SOCKET_SERIES - 2


def test_facts_derived_from_the_table() -> None:
    assert [f.sample for f in SOCKET_FAMILIES] == [f.name for f in metrics.SOCKET_FAMILIES]
    errno_counters = {e for e, f in metrics.EVENT_COUNTERS.items() if "errno" in f.labels}
    assert errno_counters == ERRNO_EVENTS
    # Every label name the exporter sets is refused as a configured label.
    assert {"type", "event", "errno", "reason", "error"} == metrics.EXTRA_LABELS
    for name in sorted(metrics.RESERVED_LABELS):
        config = f"sockets:\n  - {{name: s, type: PUB, bind: [tcp://*:1], labels: {{{name}: x}}}}"
        try:
            parse_config(config, "c.yml")
        except ConfigError as err:
            assert f"label name {name!r} is reserved" in str(err)
        else:
            raise AssertionError(f"label {name!r} accepted")


def test_table_and_config_import_no_runtime_module() -> None:
    code = textwrap.dedent("""\
        import sys
        import exporter.core.metrics
        assert not [m for m in sys.modules if m.startswith(("zmq", "prometheus_client"))]
        import exporter.config, exporter.config.cardinality
        runtime = ("exporter.core.state", "exporter.monitor", "exporter.render",
                   "exporter.web", "exporter.daemon", "exporter.otlp", "exporter.relay",
                   "prometheus_client")
        print(sorted(m for m in sys.modules if m.startswith(runtime)))
        """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_renderers_import_no_zmq_and_no_engine() -> None:
    """The data flow: render/ reads snapshots; the build labels come in from the zmq edge."""
    code = textwrap.dedent("""\
        import sys
        import exporter.render.prometheus, exporter.web.status
        io = ("zmq", "exporter.monitor", "exporter.connections.sampler", "exporter.daemon",
              "exporter.web.app", "exporter.web.server", "exporter.otlp", "exporter.relay")
        print(sorted({m.split(".")[0] if m.startswith("zmq") else m
                      for m in sys.modules if m.startswith(io)}))
        """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


BROKEN = {
    "duplicate family name": metrics.CONNECTED,
    "duplicate OTel name": replace(metrics.SOCKETS, name="zmq_x", otel_name="zmq.connected"),
    "samples clash": replace(metrics.SOCKETS, name="zmq_connected", type="gauge"),
    "_total on a gauge": replace(metrics.SOCKETS, name="zmq_y_total", type="gauge"),
    "unit not the suffix": replace(metrics.SOCKETS, name="zmq_z", unit="seconds"),
    "errno counter at 0": replace(metrics.BIND_FAILED, name="zmq_w_total", initial="bind"),
}


@pytest.mark.parametrize("rule", BROKEN)
def test_check_table_refuses_a_family_that_breaks_a_rule(rule: str) -> None:
    """The table's rules hold under `python -O` too: a function that raises, not asserts."""
    metrics.check_table(metrics.FAMILIES)
    with pytest.raises(metrics.TableError):
        metrics.check_table((*metrics.FAMILIES, BROKEN[rule]))


def test_no_module_level_assert_in_the_package() -> None:
    """`python -O` strips asserts: a module's import-time checks must raise instead."""
    found = []
    for path in sorted((ROOT / "exporter").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        found += [f"{path}:{n.lineno}" for n in tree.body if isinstance(n, ast.Assert)]
    assert not found


def test_connection_sampler_follows_the_table() -> None:
    assert len(sampler._FIELDS) == len(metrics.CONNECTION_FAMILIES)
    assert typing.get_args(GoneReason) == metrics.READS_GONE.values


def test_table_imports_under_python_O() -> None:
    out = subprocess.run(
        [sys.executable, "-O", "-m", "exporter.core.metrics", "--markdown", "relay"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert out == metrics.markdown("relay")


def test_reader_stats_are_self_metrics() -> None:
    """Every counter the reader keeps is served: the listener sheds and memory trims too."""
    stats = ReaderStats(listener_sheds=3, memory_trims=2, engine_errors=1)
    served = {m.name: m.samples[0].value for m in render_self(EngineSnapshot((), stats, True), {})}
    assert served["zmq_exporter_listener_sheds"] == 3
    assert served["zmq_exporter_memory_trims"] == 2
    assert served["zmq_exporter_engine_errors"] == 1
