"""OTLP push end to end: a real daemon process pushing to a real OTLP receiver started here.

The receiver is built on the official `opentelemetry-proto` service definitions: over gRPC
(`MetricsServiceServicer` served by grpcio) and over plain HTTP (`POST /v1/metrics`, body an
`ExportMetricsServiceRequest`). It decodes what arrives; nothing of our exporter is mocked.
"""

from __future__ import annotations

import contextlib
import gzip
import selectors
import socket
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import zmq
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from exporter.core.metrics import (
    CONNECTION_RTT_AVG,
    CONNECTION_RTT_MAX,
    CONNECTION_SEND_QUEUE,
    PUSHED,
)
from exporter.monitor.sockets import build_labels

from helpers import Daemon, Samples, free_port, value, wait_until

INTERVAL_MS = 200
# grpc's default max receive message length, which the Collector's otlp receiver keeps
# unless `max_recv_msg_size_mib` is raised. Set explicitly on the test receiver.
GRPC_DEFAULT_MAX = 4 * 1024 * 1024
Attrs = frozenset[tuple[str, str]]


@dataclass
class Point:
    metric: str
    unit: str
    kind: str  # "sum" or "gauge"
    monotonic: bool
    temporality: int
    attrs: Attrs
    value: float
    start: int = 0  # start_time_unix_nano
    time: int = 0  # time_unix_nano
    description: str = ""


@dataclass
class Export:
    received: float  # time.monotonic() at arrival
    headers: dict[str, str]
    resource: dict[str, str]
    points: list[Point]
    size: int = 0  # serialized bytes of the request (before compression)


def _attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in kvs}


def decode(
    request: metrics_service_pb2.ExportMetricsServiceRequest,
) -> tuple[dict[str, str], list[Point]]:
    resource: dict[str, str] = {}
    points: list[Point] = []
    for rm in request.resource_metrics:
        resource.update(_attrs(rm.resource.attributes))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                assert kind in ("sum", "gauge"), f"{m.name}: unexpected {kind}"
                data = getattr(m, kind)
                for dp in data.data_points:
                    v = dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
                    points.append(
                        Point(
                            m.name,
                            m.unit,
                            kind,
                            bool(getattr(data, "is_monotonic", False)),
                            int(getattr(data, "aggregation_temporality", 0)),
                            frozenset(_attrs(dp.attributes).items()),
                            float(v),
                            int(dp.start_time_unix_nano),
                            int(dp.time_unix_nano),
                            m.description,
                        )
                    )
    return resource, points


class Receiver:
    """A real OTLP metrics receiver on 127.0.0.1; keeps every export it decoded."""

    def __init__(
        self,
        protocol: str,
        port: int | None = None,
        max_bytes: int | None = None,
        delay: float = 0.0,
        reject_metric: str | None = None,
        claim: int | None = None,
    ) -> None:
        """`max_bytes`: the largest request accepted (gRPC: the server's max receive
        message length, grpc's default 4 MiB unless given; HTTP: larger bodies get 413,
        unlimited unless given). `delay`: seconds each request takes to be answered.
        `reject_metric`: the points of this instrument are rejected, as a collector whose
        pipeline drops them does: a partial success naming their number. `claim`: every
        answer is a partial success naming this number instead (a receiver that lies)."""
        self.protocol = protocol
        self.port = port or free_port()
        self.max_bytes = max_bytes
        self.delay = delay
        self.reject_metric = reject_metric
        self.claim = claim
        self.rejected = 0  # HTTP requests refused as too large
        self.points_rejected = 0  # data points answered as rejected (partial successes)
        self.exports: list[Export] = []
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(
        self, body: bytes, headers: dict[str, str]
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        """Keeps the request; the response to send (a partial success if it rejected
        points, counted before the answer leaves)."""
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        request.ParseFromString(body)
        resource, points = decode(request)
        rejected = sum(1 for p in points if p.metric == self.reject_metric)
        if self.claim is not None:
            rejected = self.claim
        response = metrics_service_pb2.ExportMetricsServiceResponse()
        if rejected:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = f"{rejected} {self.reject_metric} points"
        with self._lock:
            self.exports.append(Export(time.monotonic(), headers, resource, points, len(body)))
            self.points_rejected += rejected
        return response

    def start(self) -> Receiver:
        if self.protocol == "grpc":
            receiver = self

            class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
                def Export(self, request: Any, context: Any) -> Any:
                    time.sleep(receiver.delay)
                    headers = {k: str(v) for k, v in context.invocation_metadata()}
                    return receiver.record(request.SerializeToString(), headers)

            limit = GRPC_DEFAULT_MAX if self.max_bytes is None else self.max_bytes
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2),
                options=[("grpc.max_receive_message_length", limit)],
            )
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), server)
            assert server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
            server.start()
            self._grpc = server
        else:
            receiver = self

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                    encoding = self.headers.get("Content-Encoding", "")
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    if self.path != "/v1/metrics":
                        self.send_response(404)
                        self.end_headers()
                        return
                    if receiver.max_bytes is not None and len(body) > receiver.max_bytes:
                        receiver.rejected += 1
                        self.send_response(413)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    time.sleep(receiver.delay)
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    reply = receiver.record(body, headers).SerializeToString()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    # The client may have given up waiting (a `delay` past its deadline).
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self.wfile.write(reply)

                def log_message(self, format: str, *args: Any) -> None:
                    pass

            self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
            self._http.daemon_threads = True
            self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)
            self._http_thread.start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(5)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            assert self._http_thread is not None
            self._http_thread.join(5)
            self._http = None

    def count(self) -> int:
        with self._lock:
            return len(self.exports)

    def rejected_points(self) -> int:
        with self._lock:
            return self.points_rejected

    def request_bytes(self) -> int:
        """Serialized bytes of every request received."""
        with self._lock:
            return sum(e.size for e in self.exports)

    def last(self) -> Export | None:
        with self._lock:
            return self.exports[-1] if self.exports else None

    def after(self, t: float) -> Export | None:
        """The first export that arrived after monotonic time `t`."""
        with self._lock:
            return next((e for e in self.exports if e.received > t), None)


def point(export: Export, metric: str, **attrs: str) -> Point | None:
    want = set(attrs.items())
    found = [p for p in export.points if p.metric == metric and want <= p.attrs]
    assert len(found) <= 1, f"{metric}{attrs} matches {len(found)} points"
    return found[0] if found else None


def prometheus_name(p: Point) -> str:
    """The standard OTLP→Prometheus translation, written out independently of the exporter:
    `.` → `_`, unit `s` → `_seconds`, `By` → `_bytes`, monotonic sums end in `_total`
    exactly once."""
    name = p.metric.replace(".", "_")
    if p.unit == "s":
        name += "_seconds"
    elif p.unit == "By":
        name += "_bytes"
    if p.kind == "sum" and p.monotonic:
        name = name.removesuffix("_total") + "_total"
    return name


def router_config(port: int, extra: str = "") -> str:
    return (
        "global:\n  labels: {team: payments}\n"
        "sockets:\n"
        f"  - {{name: backend, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
        f"  - {{name: client, type: DEALER, connect: ['tcp://127.0.0.1:{port}']}}\n" + extra
    )


def connect_dealers(ctx: zmq.Context[zmq.Socket[bytes]], port: int, k: int) -> list[Any]:
    dealers = []
    for _ in range(k):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        dealers.append(s)
    return dealers


def accepted_everywhere(
    d: Daemon, rx: Receiver, want: int, labels: dict[str, str]
) -> tuple[Samples, Export]:
    """Wait until /metrics shows `want`, then scrape and take the first export that left
    after that scrape: both are readings of the same, now idle, state."""
    wait_until(
        lambda: value(d.scrape(), "zmq_accepted_total", **labels) == want,
        timeout=10,
        what=f"/metrics accepted == {want}",
    )
    t = time.monotonic()
    scraped = d.scrape()
    export = wait_until(lambda: rx.after(t), timeout=10, what="an export after the scrape")
    assert export is not None
    return scraped, export


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "yaml"])
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_k_connections_arrive_over_otlp_equal_to_metrics(
    ctx: zmq.Context[zmq.Socket[bytes]], protocol: str, source: str
) -> None:
    rx = Receiver(protocol).start()
    zport = free_port()
    env = {"OTEL_METRICS_EXPORTER": "", "OTEL_EXPORTER_OTLP_HEADERS": ""}
    extra = ""
    if source == "env":
        env = {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cret%20value,x-tenant=acme",
            "OTEL_METRIC_EXPORT_INTERVAL": str(INTERVAL_MS),
            "OTEL_SERVICE_NAME": "zmq-sidecar",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,k8s.pod.name=pod-1",
        }
    else:
        extra = (
            "otlp:\n"
            f"  protocol: {protocol}\n"
            f"  endpoint: {rx.endpoint}\n"
            "  headers: {x-api-key: s3cret value, x-tenant: acme}\n"
            f"  interval: {INTERVAL_MS}ms\n"
            "  service_name: zmq-sidecar\n"
            "  resource_attributes: {deployment.environment: test, k8s.pod.name: pod-1}\n"
        )
        # The config file wins over the environment where both are set.
        env = {
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc" if protocol != "grpc" else "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_SERVICE_NAME": "loses-to-the-config-file",
        }
    k = 7
    d = Daemon(router_config(zport, extra), env=env).start()
    try:
        dealers = connect_dealers(ctx, zport, k)
        labels = {"socket": "backend", "endpoint": f"tcp://127.0.0.1:{zport}"}
        # The connection sampler (issue 18) has seen the client's tcp connection on both
        # sides: from here on the connection families keep their series.
        wait_until(
            lambda: all(
                value(d.scrape(), "zmq_connection_rtt_max_seconds", socket=name) is not None
                for name in ("backend", "client")
            ),
            timeout=10,
            what="the client's connection sampled",
        )
        # The exporter's own DEALER `client` is connected too: K + 1 accepted.
        scraped, export = accepted_everywhere(d, rx, k + 1, labels)
        p = point(export, "zmq.accepted", **labels)
        assert p is not None
        assert p.value == k + 1 == value(scraped, "zmq_accepted_total", **labels)
        assert (p.kind, p.monotonic, p.temporality) == ("sum", True, 2)  # 2: CUMULATIVE
        assert dict(p.attrs)["team"] == "payments"  # configured labels are attributes
        conn = point(export, "zmq.connections", **labels)
        assert conn is not None and conn.kind == "gauge" and conn.value == k + 1

        # Headers passed through, resource attributes present.
        assert export.headers.get("x-api-key") == "s3cret value"
        assert export.headers.get("x-tenant") == "acme"
        assert export.resource["service.name"] == "zmq-sidecar"
        assert export.resource["service.version"]
        assert export.resource["host.name"] == socket.gethostname()
        assert export.resource["deployment.environment"] == "test"
        assert export.resource["k8s.pod.name"] == "pod-1"
        assert export.resource["telemetry.sdk.language"] == "python"
        assert export.resource["telemetry.sdk.name"] == "zmq-exporter"
        # Stable across restarts (the host or pod name), unlike a random id per start.
        assert export.resource["service.instance.id"] == socket.gethostname()

        # Every data point equals the /metrics sample of its translated name; every socket
        # series (zmq_*) of /metrics arrived over OTLP, and so did every self-metric the
        # docs/otlp.md lists as pushed (web-server and OTLP self-metrics describe the endpoints
        # themselves and stay on /metrics).
        got = {(prometheus_name(q), q.attrs): q.value for q in export.points}
        pushed = {f.name for f in PUSHED}
        want = {key: v for key, v in scraped.items() if key[0] in pushed}
        # A connection sample may have come between the scrape and the export: the
        # smoothed RTTs may then differ (nothing else does on idle connections).
        rtt = {CONNECTION_RTT_MAX.name, CONNECTION_RTT_AVG.name}
        assert {key for key in got if key[0] in rtt} == {key for key in want if key[0] in rtt}
        assert {key: v for key, v in got.items() if key[0] not in rtt} == {
            key: v for key, v in want.items() if key[0] not in rtt
        }
        assert any(key[0] == CONNECTION_SEND_QUEUE.name for key in got)
        socket_series = {k for k in scraped if k[0].startswith("zmq_") and "exporter" not in k[0]}
        assert socket_series <= set(got)

        wait_until(
            lambda: value(d.scrape(), "zmq_exporter_otlp_exports_total", result="success"),
            timeout=5,
            what="successful exports counted on /metrics",
        )
        assert value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure") == 0
        for s in dealers:
            s.close(linger=0)
    finally:
        assert d.stop() == 0
        rx.stop()
    logs = d.logs()
    assert "OTLP export working" in logs
    assert "s3cret" not in logs  # header values are never logged
    assert "Traceback" not in logs


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_down_then_back(ctx: zmq.Context[zmq.Socket[bytes]], protocol: str) -> None:
    rx = Receiver(protocol).start()
    zport = free_port()
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": str(INTERVAL_MS),
        "OTEL_EXPORTER_OTLP_TIMEOUT": "500",  # milliseconds, as the specification says
        "OTEL_EXPORTER_OTLP_HEADERS": "",
    }
    d = Daemon(router_config(zport), env=env).start()
    assert d.proc is not None
    labels = {"socket": "backend", "endpoint": f"tcp://127.0.0.1:{zport}"}
    dealers: list[Any] = []
    try:
        dealers += connect_dealers(ctx, zport, 3)
        accepted_everywhere(d, rx, 4, labels)
        failures_before = value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure")
        assert failures_before == 0

        rx.stop()
        # While the receiver is away: connections keep being counted, exports fail and
        # are counted, the daemon's memory stays flat.
        dealers += connect_dealers(ctx, zport, 5)
        wait_until(
            lambda: (
                (value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure") or 0) >= 3
            ),
            timeout=15,
            what="failed exports counted",
        )
        baseline = rss_kib(d.proc.pid)
        samples = []
        outage_end = time.monotonic() + 8.0
        while time.monotonic() < outage_end:
            samples.append(rss_kib(d.proc.pid))
            time.sleep(0.25)  # sampling period, not a wait for a condition
        assert d.proc.poll() is None
        failures = value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure") or 0
        print(
            f"\n{protocol}: outage 8 s, {failures:.0f} failed exports; RSS baseline "
            f"{baseline} KiB, min {min(samples)}, max {max(samples)}, last {samples[-1]} KiB"
        )
        assert failures >= 10  # about one per interval, not one per backoff attempt
        assert max(samples) - baseline < 4096, samples  # KiB

        seen = rx.count()
        rx.start()  # same port
        scraped, export = accepted_everywhere(d, rx, 9, labels)
        assert rx.count() > seen
        p = point(export, "zmq.accepted", **labels)
        assert p is not None and p.value == 9 == value(scraped, "zmq_accepted_total", **labels)
        c = point(export, "zmq.connections", **labels)
        assert c is not None and c.value == 9
    finally:
        for s in dealers:
            s.close(linger=0)
        assert d.stop() == 0
        rx.stop()
    logs = d.logs()
    # Once per state change, not once per attempt; the SDK's per-attempt lines are taken off.
    assert logs.count("OTLP export failing") == 1, logs
    assert logs.count("OTLP export recovered") == 1, logs
    assert "logger=opentelemetry" not in logs and "Transient error" not in logs, logs
    assert "chttp2" not in logs, logs  # grpc core's own INFO lines are quietened too
    assert "Traceback" not in logs


@pytest.mark.parametrize(
    ("protocol", "reject_metric"),
    [("grpc", "zmq.accepted"), ("http/protobuf", "zmq.accepted"), ("http/protobuf", None)],
)
def test_points_the_receiver_rejects_are_counted_on_metrics(
    protocol: str, reject_metric: str | None
) -> None:
    """zmq_exporter_otlp_points_rejected_total equals the data points the receiver's
    partial successes named (here: every zmq.accepted point, the ROUTER's bind endpoint's,
    in every export); 0 while it rejects none. The exports still succeed."""
    rx = Receiver(protocol, reject_metric=reject_metric).start()
    d = Daemon(router_config(free_port()), env=base_env(protocol, rx.endpoint)).start()
    try:
        wait_until(lambda: rx.count() >= 3, timeout=10, what="three exports")

        def counted() -> tuple[float, int] | None:
            # Scraped before the receiver's total is read: the daemon counts a rejection
            # only after the answer, so equal readings are of an export fully handled.
            scraped = value(d.scrape(), "zmq_exporter_otlp_points_rejected_total")
            answered = rx.rejected_points()
            return (scraped, answered) if scraped == answered else None

        got = wait_until(counted, timeout=10, what="counter == points the receiver rejected")
        assert got is not None
        samples = d.scrape()
        assert (value(samples, "zmq_exporter_otlp_exports_total", result="success") or 0) >= 3
        assert value(samples, "zmq_exporter_otlp_exports_total", result="failure") == 0
        # One zmq.accepted point (the bind endpoint's) in each of the three or more exports.
        assert got == (0, 0) if reject_metric is None else got[1] >= 3, got
    finally:
        assert d.stop() == 0
        rx.stop()
    logs = d.logs()
    assert ("rejected part of an export" in logs) == (reject_metric is not None), logs
    if reject_metric is not None:
        assert "zmq.accepted points" in logs  # the receiver's message


@pytest.mark.parametrize("claim", [-5, 2**62])
def test_a_receiver_that_lies_about_rejected_points_cannot_break_the_counter(claim: int) -> None:
    """A partial success naming a negative or a huge number of points: the counter never goes
    down, and grows by at most the bytes of the requests answered (each point took some)."""
    rx = Receiver("grpc", claim=claim).start()
    d = Daemon(router_config(free_port()), env=base_env("grpc", rx.endpoint)).start()
    try:
        seen: list[float] = []

        def three_answered() -> bool:
            seen.append(value(d.scrape(), "zmq_exporter_otlp_points_rejected_total") or 0)
            return rx.count() >= 3 and seen[-1] > 0 if claim > 0 else rx.count() >= 3

        wait_until(three_answered, timeout=10, what="three exports answered")
        final = value(d.scrape(), "zmq_exporter_otlp_points_rejected_total") or 0
        assert seen == sorted(seen) and final >= seen[-1], seen
        request_bytes = rx.request_bytes()
        assert final == 0 if claim < 0 else 0 < final <= request_bytes, (final, request_bytes)
        assert value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure") == 0
    finally:
        assert d.stop() == 0
        rx.stop()


class BlackHole:
    """Accepts TCP connections and reads what arrives, never answering: a hung collector.
    `received` counts the bytes of the requests it swallowed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="black-hole", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        conns: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.fileobj is self.sock:
                        conn, _ = self.sock.accept()
                        conns.append(conn)
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    assert isinstance(key.fileobj, socket.socket)
                    data = key.fileobj.recv(65536)
                    if not data:
                        sel.unregister(key.fileobj)
                    self.received += len(data)
        finally:
            sel.close()
            for conn in conns:
                conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_hung_collector_does_not_hurt_scrapes_or_shutdown(protocol: str) -> None:
    hole = BlackHole()
    zport = free_port()
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hole.port}",
        "OTEL_METRIC_EXPORT_INTERVAL": str(INTERVAL_MS),
        "OTEL_EXPORTER_OTLP_TIMEOUT": "",  # the default 10 s: an export hangs that long
        "OTEL_EXPORTER_OTLP_HEADERS": "",
    }
    # The final export's budget, spent waiting on the hole.
    d = Daemon(router_config(zport, "otlp:\n  shutdown_timeout: 1s\n"), env=env).start()
    try:
        # An export is stuck in flight (waiting for a reply that never comes)...
        wait_until(lambda: hole.received > 0, timeout=30, what="an export sent to the hole")
        # ...and /metrics stays exact, and is not held up by it: the export hangs for
        # 10 s, so a scrape that waited for it would take that long (the bound is loose
        # for a loaded machine).
        worst = 0.0
        for _ in range(20):
            t = time.monotonic()
            samples = d.scrape()
            worst = max(worst, time.monotonic() - t)
        assert value(samples, "zmq_exporter_otlp_exports_total", result="success") == 0
        assert worst < 5.0, worst
    finally:
        t = time.monotonic()
        rc = d.stop(timeout=5)
        took = time.monotonic() - t
        hole.close()
    print(f"\n{protocol}: SIGTERM with an export hanging: exit {rc} after {took:.2f} s")
    assert rc == 0
    assert took < 4.0  # the 1 s budget, the 0.5 s grace, then exit
    assert "Traceback" not in d.logs()


def test_one_snapshot_per_export() -> None:
    """In-process: every export takes exactly one engine snapshot, and the final export at
    stop is one more."""
    from exporter.config.otlp import OtlpSettings
    from exporter.monitor.engine import Engine
    from exporter.otlp.export import OtlpOutput

    engine = Engine()
    calls = 0

    def snapshot() -> Any:
        nonlocal calls
        calls += 1
        return engine.snapshot()

    rx = Receiver("http/protobuf").start()
    # A long interval: the exports of this test are the ones it makes.
    output = OtlpOutput(
        OtlpSettings("http/protobuf", rx.endpoint + "/v1/metrics", interval=3600),
        snapshot,
        build_labels(),
    )
    try:
        output.start()
        for n in range(1, 4):
            assert output.export_once()
            assert (calls, rx.count(), output.stats.success) == (n, n, n)
        output.stop()
        assert (calls, rx.count(), output.stats.success) == (4, 4, 4)
        assert output.stats.failure == 0
    finally:
        output.stop()
        rx.stop()
        engine.stop()


def test_idle_sockets_keep_their_points_and_the_payload_stays_equal(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """In-process, a real engine: between two exports an idle socket's data points are
    kept, not rebuilt (only their collection time moves on); a socket with an event gets
    new ones, with the same start time. Over a real receiver, two exports of an idle state
    carry the same series, values and start times, and only time_unix_nano moves on."""
    from exporter.config import parse_config
    from exporter.config.otlp import OtlpSettings
    from exporter.monitor.engine import Engine
    from exporter.otlp.export import OtlpOutput

    zport, idle_port = free_port(), free_port()
    settings = parse_config(
        "sockets:\n"
        f"  - {{name: busy, type: ROUTER, bind: ['tcp://127.0.0.1:{zport}']}}\n"
        f"  - {{name: idle, type: PULL, bind: ['tcp://127.0.0.1:{idle_port}']}}\n",
        "c.yml",
    )
    engine = Engine()
    rx = Receiver("grpc").start()
    output = OtlpOutput(
        OtlpSettings("grpc", rx.endpoint, interval=3600), engine.snapshot, build_labels()
    )
    dealers: list[Any] = []
    rebuilt: list[str] = []  # sockets whose points a build made anew, over all builds

    def points(name: str) -> dict[tuple[str, Attrs], Point]:
        request = output.builder.build(engine.snapshot())
        rebuilt.extend(output.builder.last_built)
        return {
            (p.metric, p.attrs): p
            for p in decode(request)[1]
            if dict(p.attrs).get("socket") == name
        }

    def count(name: str, metric: str) -> float:
        return sum(p.value for (m, _), p in points(name).items() if m == metric)

    try:
        engine.start()
        engine.apply(settings).result(10)
        wait_until(
            lambda: count("busy", "zmq.listening") == count("idle", "zmq.listening") == 1,
            timeout=10,
            what="both sockets listening",
        )
        idle1, busy1 = points("idle"), points("busy")
        rebuilt.clear()
        time.sleep(0.01)  # so that the next collection has a later clock
        idle2, busy2 = points("idle"), points("busy")
        assert rebuilt == []  # both idle: every point kept
        assert idle1.keys() == idle2.keys() and busy1.keys() == busy2.keys()
        for before, after in ((idle1, idle2), (busy1, busy2)):
            for k, p in before.items():
                q = after[k]
                assert (q.value, q.start) == (p.value, p.start)
                assert q.time > p.time
                assert p.time >= p.start > 0 if p.kind == "sum" else p.start == 0
        assert len({p.time for p in idle2.values()}) == 1

        dealers = connect_dealers(ctx, zport, 1)
        wait_until(
            lambda: count("busy", "zmq.handshake_succeeded") == 1,
            timeout=10,
            what="the dealer's handshake counted",
        )
        idle3, busy3 = points("idle"), points("busy")
        assert "busy" in rebuilt and "idle" not in rebuilt
        assert {k: p.value for k, p in idle3.items()} == {k: p.value for k, p in idle1.items()}
        start = {p.start for p in busy1.values() if p.kind == "sum"}
        assert len(start) == 1
        assert {p.start for p in busy3.values() if p.kind == "sum"} == start

        # Over a real receiver: two exports of the (again idle) state.
        output.start()
        assert output.export_once() and output.export_once()
        first, second = rx.exports[-2], rx.exports[-1]

        def table(export: Export) -> dict[tuple[str, Attrs], tuple[Any, ...]]:
            return {
                (p.metric, p.attrs): (
                    p.unit,
                    p.kind,
                    p.monotonic,
                    p.temporality,
                    p.value if p.metric.startswith("zmq.") else None,
                    p.start if p.kind == "sum" else None,
                    p.description,
                )
                for p in export.points
            }

        assert table(first) == table(second)
        assert first.resource == second.resource
        assert len({p.time for p in second.points}) == 1
        assert second.points[0].time > first.points[0].time
        sums = [p for p in second.points if p.kind == "sum"]
        assert sums and all(p.temporality == 2 and 0 < p.start < p.time for p in sums)
        assert all(p.description for p in second.points)
        units = {f.otel_name: f.otel_unit for f in PUSHED}
        assert all(p.unit == units[p.metric] for p in second.points)
        assert {"telemetry.sdk.language", "telemetry.sdk.name", "telemetry.sdk.version"} <= set(
            second.resource
        )
    finally:
        for sock in dealers:
            sock.close(linger=0)
        output.stop()
        rx.stop()
        engine.stop()


def base_env(protocol: str, endpoint: str, **more: str) -> dict[str, str]:
    return {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": str(INTERVAL_MS),
        "OTEL_EXPORTER_OTLP_HEADERS": "",
        **more,
    }


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metric_export_timeout_bounds_each_export(protocol: str) -> None:
    """OTEL_METRIC_EXPORT_TIMEOUT bounds an export (retries included) even when the
    exporter's own OTEL_EXPORTER_OTLP_TIMEOUT is longer: against a hung collector each
    export fails after ~0.3 s, not after 10 s."""
    hole = BlackHole()
    env = base_env(
        protocol,
        f"http://127.0.0.1:{hole.port}",
        OTEL_EXPORTER_OTLP_TIMEOUT="10000",
        OTEL_METRIC_EXPORT_TIMEOUT="300",
    )
    d = Daemon(router_config(free_port()), env=env).start()
    try:
        wait_until(
            lambda: (
                (value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure") or 0) >= 2
            ),
            timeout=8,
            what="two exports failed within their deadline",
        )
        took = value(d.scrape(), "zmq_exporter_otlp_last_export_duration_seconds")
        assert took is not None and 0.25 <= took < 1.5, took
    finally:
        assert d.stop() == 0
        hole.close()
    assert "OTLP export failing" in d.logs()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_gzip_compression_arrives(protocol: str) -> None:
    """OTEL_EXPORTER_OTLP_COMPRESSION=gzip is used by both protocols (an invalid value
    stops both: tests/otlp/test_otlp_config.py)."""
    rx = Receiver(protocol).start()
    env = base_env(protocol, rx.endpoint, OTEL_EXPORTER_OTLP_COMPRESSION="gzip")
    d = Daemon(router_config(free_port()), env=env).start()
    try:
        export = wait_until(rx.last, timeout=10, what="an export")
        assert export is not None
        assert point(export, "zmq.socket_info", socket="backend") is not None
        if protocol == "http/protobuf":  # (grpcio decompresses before the servicer sees it)
            assert export.headers.get("content-encoding") == "gzip", export.headers
    finally:
        assert d.stop() == 0
        rx.stop()


@pytest.mark.parametrize(
    ("variables", "arrives"),
    [
        ({"OTEL_EXPORTER_OTLP_INSECURE": "true"}, True),
        (
            {
                "OTEL_EXPORTER_OTLP_INSECURE": "false",
                "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
            },
            True,
        ),
        ({}, False),  # default: TLS, which a plaintext receiver refuses
    ],
    ids=["insecure", "metrics-insecure", "default-tls"],
)
def test_grpc_endpoint_without_scheme(variables: dict[str, str], arrives: bool) -> None:
    """`host:port` is a gRPC endpoint (the specification); OTEL_EXPORTER_OTLP_INSECURE
    decides plaintext for it."""
    rx = Receiver("grpc").start()
    unset = {"OTEL_EXPORTER_OTLP_INSECURE": "", "OTEL_EXPORTER_OTLP_METRICS_INSECURE": ""}
    # A refused TLS handshake is retried (UNAVAILABLE) until the export's deadline: 1 s,
    # not the default, so the failure is counted soon (it took 6-7.5 s of a 10 s wait).
    env = base_env(
        "grpc",
        f"127.0.0.1:{rx.port}",
        OTEL_METRIC_EXPORT_TIMEOUT="1000",
        **{**unset, **variables},
    )
    d = Daemon(router_config(free_port()), env=env).start()
    result = "success" if arrives else "failure"
    try:
        wait_until(
            lambda: value(d.scrape(), "zmq_exporter_otlp_exports_total", result=result),
            timeout=30,
            what=f"an export counted as {result}",
        )
        if arrives:
            export = rx.last()
            assert export is not None
            assert point(export, "zmq.socket_info", socket="backend") is not None
        else:
            assert rx.count() == 0
    finally:
        assert d.stop() == 0
        rx.stop()


def _sockets() -> tuple[Any, ...]:
    """Snapshots of sockets with every kind of row: configured labels (non-ASCII, and
    longer than 127 bytes: two-byte lengths), counters beyond 2**32, errno and unknown
    event rows, endpoints of both roles."""
    from exporter.core.endpoints import EndpointMap
    from exporter.core.events import Event
    from exporter.core.state import SocketState, apply_event, snapshot_socket

    long = "x" * 200
    states = [
        SocketState(
            "router-é",
            "ROUTER",
            {"team": "zürich", "note": long},
            EndpointMap(("tcp://127.0.0.1:5555",), ()),
        ),
        SocketState(
            "dealer", "DEALER", {}, EndpointMap((), ("tcp://127.0.0.1:5555", "ipc:///tmp/a"))
        ),
    ]
    router, dealer = states
    for t, (event, arg) in enumerate(
        [
            (Event.LISTENING, 9),
            (Event.ACCEPTED, 10),
            (Event.HANDSHAKE_SUCCEEDED, 0),
            (Event.HANDSHAKE_FAILED_AUTH, 400),
            (Event.DISCONNECTED, 11),
            (Event.ACCEPT_FAILED, 24),
        ]
    ):
        apply_event(router, int(event), arg, "tcp://127.0.0.1:5555", 1_700_000_000.0 + t)
    apply_event(router, 1 << 20, 0, "tcp://127.0.0.1:5555", 1_700_000_100.0)  # unknown event
    router.endpoints["tcp://127.0.0.1:5555"].counts[Event.ACCEPTED] += 5_000_000_000
    apply_event(dealer, int(Event.CONNECT_DELAYED), 0, "tcp://127.0.0.1:5555", 1_700_000_000.0)
    apply_event(dealer, int(Event.CONNECT_RETRIED), 100, "ipc:///tmp/a", 1_700_000_001.0)
    return tuple(snapshot_socket(s) for s in states)


def test_request_equals_the_official_encoding() -> None:
    """The request `MetricsBuilder` writes by hand (kept serialized points joined with
    each export's time) parses to the very message the official encoder
    (`encode_metrics`) makes of the same series as SDK data classes: the rows of
    /metrics, one start time per socket, the export's time on every point."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from exporter import __version__
    from exporter.core.metrics import SOCKET_FAMILIES
    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.otlp.request import MetricsBuilder
    from exporter.render.prometheus import render_self
    from exporter.render.rows import row_labels, socket_rows

    attributes = {"service.name": "t", "k8s.pod.name": "pod-ü", "service.instance.id": "h"}
    resource = Resource(attributes)
    times = iter([10**18, 10**18 + 5, 10**18 + 9, 10**18 + 20])
    builder = MetricsBuilder(attributes, build_labels(), clock=lambda: next(times))
    snap = EngineSnapshot(_sockets(), ReaderStats(), True)

    def reference(now: int, start: int) -> Any:
        slots: list[list[NumberDataPoint]] = [[] for _ in PUSHED]
        for sock in snap.sockets:
            for index, endpoint, extra, v in socket_rows(sock):
                slot = PUSHED.index(SOCKET_FAMILIES[index])
                labels = row_labels(sock, endpoint, extra)
                slots[slot].append(NumberDataPoint(labels, start, now, float(v)))
        by_name = {f.metric_name: n for n, f in enumerate(PUSHED)}
        for family in render_self(snap, build_labels()):
            if family.name in by_name:
                slots[by_name[family.name]] += [
                    NumberDataPoint(dict(s.labels), 10**18, now, float(s.value))
                    for s in family.samples
                ]
        out = []
        for pushed, points in zip(PUSHED, slots, strict=True):
            if points:
                data = (
                    Sum(points, AggregationTemporality.CUMULATIVE, True)
                    if pushed.type == "counter"
                    else Gauge(points)
                )
                assert pushed.otel_name is not None  # PUSHED: every one has a name
                out.append(Metric(pushed.otel_name, pushed.help, pushed.otel_unit, data))
        scope = ScopeMetrics(InstrumentationScope("zmq-exporter", __version__), out, "")
        return encode_metrics(MetricsData([ResourceMetrics(resource, [scope], "")]))

    first = builder.build(snap)  # the sockets are new: their start time is this export's
    assert first == reference(10**18 + 5, 10**18 + 5)
    assert builder.last_built == ["router-é", "dealer"]
    second = builder.build(snap)  # kept points, a new time
    assert builder.last_built == []
    assert second == reference(10**18 + 9, 10**18 + 5)
    assert len(second.SerializeToString()) == len(builder.encode(snap))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_transport_sends_the_built_request(protocol: str) -> None:
    """The transport sends the builder's bytes as they are (gRPC: a generic unary call
    without a serializer; HTTP: the POST body) and the receiver, on the official generated
    service, decodes the same points."""
    from exporter.config.otlp import OtlpSettings, Protocol
    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.otlp.request import MetricsBuilder
    from exporter.otlp.transport import make_transport, send

    rx = Receiver(protocol).start()
    endpoint = rx.endpoint if protocol == "grpc" else rx.endpoint + "/v1/metrics"
    transport = make_transport(OtlpSettings(cast(Protocol, protocol), endpoint, interval=3600))
    try:
        builder = MetricsBuilder({}, build_labels(), clock=lambda: 10**18)
        snap = EngineSnapshot(_sockets(), ReaderStats(), True)
        payload = builder.encode(snap)
        result = send(transport, payload, lambda: time.monotonic() + 5.0)
        assert result.ok and result.attempts == 1, result
        assert rx.count() == 1
        assert rx.exports[0].points == decode(builder.build(snap))[1]
        assert rx.exports[0].headers["user-agent"].startswith("zmq-exporter/")
    finally:
        transport.close()
        rx.stop()


# ---------------------------------------------------------------------------------------
# Large exports: split into requests within a byte budget.


def many_sockets(count: int, endpoints: int = 1) -> tuple[Any, ...]:
    """Snapshots of `count` ROUTER sockets with `endpoints` bound endpoints each, every
    endpoint with listening, accepted, handshake and disconnect rows (as bench/scrape.py)."""
    from exporter.core.endpoints import EndpointMap
    from exporter.core.events import Event
    from exporter.core.state import SocketState, apply_event, snapshot_socket

    events = (
        (Event.LISTENING, 9),
        (Event.ACCEPTED, 10),
        (Event.HANDSHAKE_SUCCEEDED, 0),
        (Event.ACCEPTED, 11),
        (Event.HANDSHAKE_FAILED_AUTH, 400),
        (Event.DISCONNECTED, 11),
    )
    snaps = []
    for i in range(count):
        binds = tuple(f"tcp://127.0.0.1:{20000 + i * endpoints + e}" for e in range(endpoints))
        state = SocketState(f"router-{i}", "ROUTER", {"team": "big"}, EndpointMap(binds, ()))
        for endpoint in binds:
            for t, (event, arg) in enumerate(events):
                apply_event(state, int(event), arg, endpoint, 1_700_000_000.0 + t)
        snaps.append(snapshot_socket(state))
    return tuple(snaps)


def _row(p: Point) -> tuple[Any, ...]:
    return (
        p.metric,
        p.unit,
        p.kind,
        p.monotonic,
        p.temporality,
        p.attrs,
        p.value,
        p.start,
        p.time,
        p.description,
    )


def split_output(
    protocol: str, rx: Receiver, sockets: tuple[Any, ...], budget: int, **more: Any
) -> Any:
    """An `OtlpOutput` (the daemon's export path, the official exporter) over `sockets`,
    its builder's clock fixed so that an unsplit build of the same state has the same
    times."""
    from exporter.config.otlp import OtlpSettings, Protocol
    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.otlp.export import OtlpOutput
    from exporter.otlp.request import MetricsBuilder

    endpoint = rx.endpoint if protocol == "grpc" else rx.endpoint + "/v1/metrics"
    settings = OtlpSettings(
        cast(Protocol, protocol), endpoint, interval=3600, max_request_bytes=budget, **more
    )
    output = OtlpOutput(
        settings, lambda: EngineSnapshot(sockets, ReaderStats(), True), build_labels()
    )
    assert output.builder.max_request_bytes == budget  # the setting reaches the builder
    output.builder = MetricsBuilder(
        settings.resource,
        build_labels(),
        clock=lambda: 1_800_000_000 * 10**9,
        max_request_bytes=budget,
    )
    return output


def check_split(rx: Receiver, output: Any, sockets: tuple[Any, ...], budget: int) -> None:
    """Every request of the last export arrived, each within `budget`, each a whole
    request (resource, and every metric with its name, unit, description, kind and
    temporality), and together they carry exactly the points of one unsplit request."""
    from exporter.core.state import EngineSnapshot, ReaderStats

    n = output.stats.last_requests
    got = rx.exports[-n:]
    assert len(got) == n == len(output.builder.last_sizes)
    assert [e.size for e in got] == output.builder.last_sizes
    assert all(e.size <= budget for e in got), [e.size for e in got]
    unsplit = output.builder.build(EngineSnapshot(sockets, ReaderStats(), True))
    resource, want = decode(unsplit)
    assert all(e.resource == resource for e in got)
    union = [_row(p) for e in got for p in e.points]
    assert sorted(union, key=repr) == sorted(map(_row, want), key=repr)
    assert len(union) == len(set(union))  # no point sent twice
    table = {f.otel_name: f for f in PUSHED}
    for e in got:
        for p in e.points:
            family = table[p.metric]
            assert (p.unit, p.description) == (family.otel_unit, family.help)
            kind = ("sum", True, 2) if family.type == "counter" else ("gauge", False, 0)
            assert (p.kind, p.monotonic, p.temporality) == kind


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_large_export_arrives_in_requests_within_the_receivers_limit(protocol: str) -> None:
    """4,000 sockets: one unsplit request is 5.4 MB, which a receiver with gRPC's default
    4 MiB limit refuses (as it refused every export before the split); the export
    arrives whole in two requests of at most 4,000,000 bytes each, counted as one
    successful export. A small export stays one request."""
    from exporter.config.otlp import DEFAULT_MAX_REQUEST_BYTES
    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.otlp.transport import send

    sockets = many_sockets(4000)
    rx = Receiver(protocol, max_bytes=GRPC_DEFAULT_MAX).start()
    output = split_output(protocol, rx, sockets, DEFAULT_MAX_REQUEST_BYTES, timeout=5.0)
    try:
        output.start()
        t = time.monotonic()
        unsplit = output.builder.build(EngineSnapshot(sockets, ReaderStats(), True))
        assert unsplit.ByteSize() > GRPC_DEFAULT_MAX
        # The receiver's limit is real: the unsplit request is refused (not retryable).
        refused = send(output._transport, unsplit.SerializeToString(), lambda: t + 5.0)
        assert not refused.ok and refused.attempts == 1, refused
        assert rx.count() == 0

        assert output.export_once()
        assert (output.stats.success, output.stats.failure) == (1, 0)
        assert output.stats.last_requests == rx.count() == 2
        print(f"\n{protocol}: unsplit {unsplit.ByteSize()} bytes; {output.builder.last_sizes}")
        check_split(rx, output, sockets, DEFAULT_MAX_REQUEST_BYTES)

        small = split_output(protocol, rx, sockets[:10], DEFAULT_MAX_REQUEST_BYTES)
        small.start()
        try:
            assert small.export_once()
            assert small.stats.last_requests == 1 and rx.count() == 3
            check_split(rx, small, sockets[:10], DEFAULT_MAX_REQUEST_BYTES)
            state = EngineSnapshot(sockets[:10], ReaderStats(), True)
            assert small.builder.encode_requests(state) == [small.builder.encode(state)]
        finally:
            small.stop()
    finally:
        output.stop()
        rx.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_one_socket_larger_than_the_budget_splits_at_points(protocol: str) -> None:
    """A single socket (300 endpoints, 2,400 points, ~250 KB) with a 16 KiB budget: its
    points, and those of each of its metrics, are cut at point boundaries over many
    requests, each whole and within the budget."""
    budget = 16_384
    sockets = many_sockets(1, endpoints=300)
    rx = Receiver(protocol, max_bytes=budget).start()
    output = split_output(protocol, rx, sockets, budget)
    try:
        output.start()
        assert output.export_once()
        n = output.stats.last_requests
        assert n > 10 and rx.count() == n
        check_split(rx, output, sockets, budget)
        # One metric's points went over several requests, each with the metric's head.
        carrying = [e for e in rx.exports if any(p.metric == "zmq.accepted" for p in e.points)]
        assert len(carrying) > 1
        # Fuller than half the budget except the last: no request wasted on a few points.
        assert all(e.size > budget // 2 for e in rx.exports[:-1]), [e.size for e in rx.exports]
    finally:
        output.stop()
        rx.stop()


def test_split_budget_edges() -> None:
    """In-process: over a range of budgets the requests stay within them (a request is
    never cut inside a point), join to the unsplit points, and a budget too small for
    even one point sends each point alone rather than nothing."""
    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.otlp.request import MetricsBuilder

    snap = EngineSnapshot(many_sockets(3, endpoints=4), ReaderStats(), True)
    builder = MetricsBuilder({}, build_labels(), clock=lambda: 10**18)
    want = sorted(map(_row, decode(builder.build(snap))[1]), key=repr)
    total = len(builder.encode(snap))
    for budget in (1, 600, 1000, 2000, 5000, total - 1, total, total + 1000):
        builder.max_request_bytes = budget
        requests = builder.build_requests(snap)
        sizes = [r.ByteSize() for r in requests]
        assert sizes == builder.last_sizes
        points = [p for r in requests for p in decode(r)[1]]
        assert sorted(map(_row, points), key=repr) == want, budget
        # Over the budget only when one point alone does not fit in it.
        for request, size in zip(requests, sizes, strict=True):
            assert size <= budget or len(decode(request)[1]) == 1, (budget, size)
        if budget >= 1000:
            assert max(sizes) <= budget, (budget, sizes)
        if budget == 1:
            assert len(requests) == len(want)
        assert builder.points == len(want)
        if budget >= total + 1000:
            assert len(requests) == 1


def test_export_deadline_bounds_all_requests_together() -> None:
    """A receiver taking 0.3 s a request and an export of ~15 requests with a 1 s deadline:
    the export stops at the deadline (not after 15 requests of 0.3 s), is counted as one failure,
    and says why."""
    budget = 16_384
    sockets = many_sockets(1, endpoints=300)
    rx = Receiver("http/protobuf", delay=0.3).start()
    output = split_output("http/protobuf", rx, sockets, budget, timeout=1.0)
    try:
        output.start()
        t = time.monotonic()
        assert not output.export_once()
        took = time.monotonic() - t
        assert 0.9 <= took < 1.6, took
        assert (output.stats.success, output.stats.failure) == (0, 1)
        assert len(output.builder.last_sizes) > 10
        assert rx.count() < len(output.builder.last_sizes)
    finally:
        output.stop()
        rx.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_daemon_splits_at_the_configured_max_request_bytes(protocol: str) -> None:
    """A real daemon, `otlp: max_request_bytes: 16384`, and a receiver refusing anything
    larger: each export of 40 sockets arrives as several requests, none refused, counted
    as one successful export each; together one export's requests carry every socket."""
    budget = 16_384
    rx = Receiver(protocol, max_bytes=budget).start()
    sockets = "".join(
        f"  - {{name: s{i}, type: ROUTER, bind: ['tcp://127.0.0.1:{free_port()}']}}\n"
        for i in range(40)
    )
    config = (
        "global:\n  labels: {team: payments}\n"
        f"sockets:\n{sockets}"
        "otlp:\n"
        f"  protocol: {protocol}\n"
        f"  endpoint: {rx.endpoint}\n"
        f"  interval: {INTERVAL_MS}ms\n"
        f"  max_request_bytes: {budget}\n"
    )
    d = Daemon(config, env={"OTEL_METRICS_EXPORTER": "", "OTEL_EXPORTER_OTLP_HEADERS": ""})
    d.start()
    try:
        wait_until(
            lambda: (
                (value(d.scrape(), "zmq_exporter_otlp_exports_total", result="success") or 0) >= 2
            ),
            timeout=15,
            what="two successful exports",
        )
        assert value(d.scrape(), "zmq_exporter_otlp_exports_total", result="failure") == 0
        with rx._lock:
            exports = list(rx.exports)
        assert all(e.size <= budget for e in exports)
        assert rx.rejected == 0
        # The requests of one export share its time; those of the second export (both
        # first ones are complete) carry every socket's listening point, each once.
        times = sorted({p.time for e in exports for p in e.points})
        second = [p for e in exports for p in e.points if p.time == times[1]]
        listening = sorted(dict(p.attrs)["socket"] for p in second if p.metric == "zmq.listening")
        assert listening == sorted(f"s{i}" for i in range(40))
        requests = sum(1 for e in exports if any(p.time == times[1] for p in e.points))
        print(f"\n{protocol}: one export of 40 sockets in {requests} requests")
        assert requests > 1
    finally:
        assert d.stop() == 0
        rx.stop()
    assert "Traceback" not in d.logs()
