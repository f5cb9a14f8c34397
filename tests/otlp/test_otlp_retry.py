"""The OTLP transport's retries, as the OTLP specification says, against real receivers
on loopback that answer from a script: HTTP 503/429 with and without `Retry-After`, gRPC
UNAVAILABLE and RESOURCE_EXHAUSTED with and without `google.rpc.RetryInfo`, errors that
are not retried, partial success; and the final export at SIGTERM of a daemon under churn,
delivered to a slow receiver that first asks for a retry.

Timing asserts are lower bounds (a wait at least as long as asked) or generous upper
bounds (a hint past the deadline is not waited for)."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import grpc
import pytest
import zmq
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

from exporter.config.otlp import OtlpSettings, Protocol
from exporter.otlp import transport as tx

from helpers import Daemon, free_port, value, wait_until

# An answer: HTTP (status, headers, body) or gRPC (code name or "OK", RetryInfo seconds or
# None, rejected points).
HttpAnswer = tuple[int, dict[str, str], bytes]
GrpcAnswer = tuple[str, float | None, int]


def partial(rejected: int, message: str = "") -> bytes:
    response = metrics_service_pb2.ExportMetricsServiceResponse()
    response.partial_success.rejected_data_points = rejected
    response.partial_success.error_message = message
    return cast(bytes, response.SerializeToString())


class Scripted:
    """A receiver answering request n with script[n] (the last answer repeats), after
    `delay` seconds; keeps each request's arrival time and body."""

    def __init__(self, protocol: str, script: list[Any], delay: float = 0.0) -> None:
        self.protocol = protocol
        self.script = script
        self.delay = delay
        self.port = free_port()
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()
        self._grpc: Any = None
        self._http: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        base = f"http://127.0.0.1:{self.port}"
        return base if self.protocol == "grpc" else base + "/v1/metrics"

    def _next(self, body: bytes) -> Any:
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.bodies.append(body)
            n = len(self.arrivals) - 1
        time.sleep(self.delay)  # a slow receiver: the answer takes this long
        return self.script[min(n, len(self.script) - 1)]

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def gaps(self) -> list[float]:
        with self._lock:
            return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def start(self) -> Scripted:
        if self.protocol == "grpc":

            def export(request: bytes, context: Any) -> bytes:
                code, hint, rejected = self._next(request)
                if code == "OK":
                    return partial(rejected)
                status = status_pb2.Status(code=getattr(code_pb2, code), message=f"scripted {code}")
                if hint is not None:
                    detail = any_pb2.Any()
                    seconds = int(hint)
                    detail.Pack(
                        error_details_pb2.RetryInfo(
                            retry_delay=duration_pb2.Duration(
                                seconds=seconds, nanos=int((hint - seconds) * 1e9)
                            )
                        )
                    )
                    status.details.append(detail)
                context.set_trailing_metadata(
                    (("grpc-status-details-bin", status.SerializeToString()),)
                )
                context.abort(getattr(grpc.StatusCode, code), f"scripted {code}")
                return b""  # not reached: abort raises

            handler = grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.metrics.v1.MetricsService",
                {"Export": grpc.unary_unary_rpc_method_handler(export)},
            )
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            server.add_generic_rpc_handlers((handler,))
            assert server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
            server.start()
            self._grpc = server
            return self
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, headers, reply = receiver._next(body)
                self.send_response(status)
                for name, text in headers.items():
                    self.send_header(name, text)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up
                    self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def send(rx: Scripted, seconds: float) -> tuple[tx.Result, float]:
    settings = OtlpSettings(cast(Protocol, rx.protocol), rx.endpoint, interval=3600)
    transport = tx.make_transport(settings)
    try:
        started = time.monotonic()
        result = tx.send(transport, b"", lambda: started + seconds)
        return result, time.monotonic() - started
    finally:
        transport.close()


OK_HTTP: HttpAnswer = (200, {}, b"")


@pytest.mark.parametrize(
    ("first", "at_least"),
    [
        ((503, {}, b""), 0.5),  # no hint: backoff, 0.5 to 1 s before the first retry
        ((429, {}, b""), 0.5),
        ((502, {}, b""), 0.5),
        ((504, {}, b""), 0.5),
        ((503, {"Retry-After": "2"}, b""), 2.0),  # the hint, longer than any first backoff
        ((429, {"Retry-After": "2"}, b""), 2.0),
    ],
)
def test_http_retryable_answers_are_retried(first: HttpAnswer, at_least: float) -> None:
    rx = Scripted("http/protobuf", [first, OK_HTTP]).start()
    try:
        result, _ = send(rx, 10.0)
        assert result.ok and result.attempts == 2, result
        assert rx.gaps()[0] >= at_least * 0.98, rx.gaps()
    finally:
        rx.stop()


def test_http_retry_after_as_a_date_and_zero() -> None:
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3))
    rx = Scripted(
        "http/protobuf",
        [(503, {"Retry-After": when}, b""), (503, {"Retry-After": "0"}, b""), OK_HTTP],
    ).start()
    try:
        result, _ = send(rx, 15.0)
        assert result.ok and result.attempts == 3, result
        gaps = rx.gaps()
        assert gaps[0] >= 1.0, gaps  # the date is 2-3 s away (second resolution)
    finally:
        rx.stop()


def test_http_hint_past_the_deadline_is_not_waited_for() -> None:
    rx = Scripted("http/protobuf", [(503, {"Retry-After": "30"}, b"")]).start()
    try:
        result, took = send(rx, 3.0)
        assert not result.ok and result.attempts == 1, result
        assert "HTTP 503" in result.reason and "no time left" in result.reason
        assert took < 2.5, took  # gave up at once instead of waiting past the deadline
    finally:
        rx.stop()


def test_http_errors_that_are_not_retryable() -> None:
    error = status_pb2.Status(code=3, message="bad metric name").SerializeToString()
    for status in (400, 401, 413, 500):
        rx = Scripted("http/protobuf", [(status, {}, error), OK_HTTP]).start()
        try:
            result, _ = send(rx, 10.0)
            assert not result.ok and result.attempts == 1 and rx.count() == 1, result
            assert result.reason == f"HTTP {status}: bad metric name", result
        finally:
            rx.stop()


def test_http_retries_end_at_the_deadline() -> None:
    """Always 503, no hint: retried with backoff until the deadline, never past it."""
    rx = Scripted("http/protobuf", [(503, {}, b"")]).start()
    try:
        result, took = send(rx, 2.5)
        assert not result.ok and result.attempts >= 2, result
        assert took < 4.0, took
        gaps = rx.gaps()
        assert all(g >= 0.49 for g in gaps), gaps
        assert len(gaps) < 2 or gaps[1] >= 1.0 * 0.98, gaps  # the backoff grows
    finally:
        rx.stop()


def test_http_partial_success_is_counted() -> None:
    rx = Scripted("http/protobuf", [(200, {}, partial(7, "7 points: bad unit"))]).start()
    try:
        result, _ = send(rx, 5.0)
        assert result.ok and result.rejected == 7 and result.message == "7 points: bad unit"
    finally:
        rx.stop()


@pytest.mark.parametrize(
    ("first", "retried", "at_least"),
    [
        (("UNAVAILABLE", None, 0), True, 0.5),  # no hint: backoff
        (("UNAVAILABLE", 2.0, 0), True, 2.0),  # RetryInfo: longer than any first backoff
        (("RESOURCE_EXHAUSTED", 1.5, 0), True, 1.5),  # retryable only with RetryInfo
        (("RESOURCE_EXHAUSTED", None, 0), False, 0.0),
        (("DEADLINE_EXCEEDED", None, 0), True, 0.5),
        (("ABORTED", None, 0), True, 0.5),
        (("INVALID_ARGUMENT", None, 0), False, 0.0),
        (("UNAUTHENTICATED", 0.1, 0), False, 0.0),  # a hint does not make it retryable
        (("PERMISSION_DENIED", None, 0), False, 0.0),
    ],
)
def test_grpc_answers(first: GrpcAnswer, retried: bool, at_least: float) -> None:
    rx = Scripted("grpc", [first, ("OK", None, 0)]).start()
    try:
        result, _ = send(rx, 10.0)
        assert result.ok is retried, result
        assert result.attempts == (2 if retried else 1) == rx.count(), result
        if retried:
            assert rx.gaps()[0] >= at_least * 0.98, rx.gaps()
        else:
            assert result.reason.startswith(f"gRPC {first[0]}: scripted"), result
    finally:
        rx.stop()


def test_grpc_partial_success_is_counted() -> None:
    rx = Scripted("grpc", [("OK", None, 3)]).start()
    try:
        result, _ = send(rx, 5.0)
        assert result.ok and result.rejected == 3, result
    finally:
        rx.stop()


def test_grpc_retry_info_past_the_deadline_is_not_waited_for() -> None:
    rx = Scripted("grpc", [("UNAVAILABLE", 60.0, 0)]).start()
    try:
        result, took = send(rx, 3.0)
        assert not result.ok and result.attempts == 1 and "no time left" in result.reason
        assert took < 2.5, took
    finally:
        rx.stop()


def test_partial_success_reaches_the_daemons_log() -> None:
    rx = Scripted("http/protobuf", [(200, {}, partial(4, "4 points dropped"))]).start()
    config = (
        "sockets:\n"
        f"  - {{name: r, type: ROUTER, bind: ['tcp://127.0.0.1:{free_port()}']}}\n"
        "otlp:\n"
        f"  metrics_endpoint: {rx.endpoint}\n"
        "  interval: 300ms\n"
    )
    d = Daemon(config).start()
    try:
        wait_until(lambda: "rejected part of an export" in d.logs(), timeout=15, what="log")
        samples = d.scrape()
        assert (value(samples, "zmq_exporter_otlp_exports_total", result="success") or 0) >= 1
    finally:
        assert d.stop() == 0
        rx.stop()
    assert "4 points dropped" in d.logs()


# ---------------------------------------------------------------------------------------
# The final export at SIGTERM.


def churn(port: int, stop: threading.Event) -> None:
    """DEALERs connecting to the daemon's ROUTER and closing, until `stop` (bounded)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for _ in range(100_000):
            if stop.is_set():
                break
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
            stop.wait(0.01)
            sock.close()
    finally:
        ctx.term()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_final_export_at_sigterm_arrives_under_churn(protocol: str) -> None:
    """A daemon whose only export is the final one (interval 1 h), sockets churning until
    SIGTERM, and a live receiver that takes 0.8 s to answer and asks for a retry first:
    the final export is retried and delivered within otlp.shutdown_timeout (3 s here), with
    the churned counts. (A fixed 0.5 s limit abandoned it.)"""
    retry: Any = ("UNAVAILABLE", 0.2, 0) if protocol == "grpc" else (503, {"Retry-After": "0"}, b"")
    ok: Any = ("OK", None, 0) if protocol == "grpc" else OK_HTTP
    rx = Scripted(protocol, [retry, ok], delay=0.8).start()
    port = free_port()
    config = (
        "sockets:\n"
        f"  - {{name: r, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
        "otlp:\n"
        f"  protocol: {protocol}\n"
        f"  {'endpoint' if protocol == 'grpc' else 'metrics_endpoint'}: {rx.endpoint}\n"
        "  interval: 1h\n"
        "  shutdown_timeout: 3s\n"
    )
    d = Daemon(config).start()
    stop = threading.Event()
    churner = threading.Thread(target=churn, args=(port, stop), daemon=True)
    churner.start()
    try:
        accepted = wait_until(
            lambda: (value(d.scrape(), "zmq_accepted_total", socket="r") or 0) >= 20,
            timeout=30,
            what="churn accepted",
        )
        assert accepted and rx.count() == 0  # nothing exported before the final export
        t = time.monotonic()
        rc = d.stop(timeout=10)  # SIGTERM while the churn goes on
        took = time.monotonic() - t
    finally:
        stop.set()
        churner.join(10)
        rx.stop()
    logs = d.logs()
    assert rc == 0, logs
    assert rx.count() == 2, (rx.count(), logs)  # asked to retry, then delivered
    assert "abandoned" not in logs and "final export failed" not in logs, logs
    assert took < 6.0, took
    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(rx.bodies[-1])
    values = [
        p.as_double
        for m in request.resource_metrics[0].scope_metrics[0].metrics
        if m.name == "zmq.accepted"
        for p in m.sum.data_points
    ]
    assert values and max(values) >= 20, values
