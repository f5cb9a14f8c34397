"""The OTLP output: pushes the engine's state over OTLP (gRPC or HTTP/protobuf), beside the
web server (`web.py`), from the same rows as `/metrics`.

Same state, same numbers as `/metrics`: each export takes one `Engine.snapshot()` and builds
its `ExportMetricsServiceRequest` from `socket_rows` (the rows `SocketText` renders) and
`render_self` plus the daemon's other collectors. There is no second count of events, and a
series exists over OTLP exactly when it exists on `/metrics`. Neither the SDK's instruments
and aggregation nor its encoder (SDK data classes -> protobuf objects) are on the path: at
10,000 sockets each costs more than `generate_latest`. Like the /metrics text cache, each
socket's data points are kept, serialized, while `Engine.snapshot()` hands out the same
`SocketSnapshot` object (the socket had no event), so an idle socket costs a list extend;
an export joins the kept bytes with its time and parses the result into the request
message (tests/test_otlp.py checks it against the official encoder's). An export larger
than `max_request_bytes` (default 4,000,000: gRPC servers refuse messages above 4 MiB by
default) is cut at point boundaries into several whole requests, each sent with the
time the export has left; the export succeeds when all of them do.

The official exporters (`opentelemetry-exporter-otlp-proto-grpc`/`-http`) do transport,
retries with backoff, TLS, certificates, compression and headers; they are handed the
request through the private method where they would encode it (`sdk_exporter`, `HOOKS`;
the exporters are pinned to the minor version checked). Every other setting is resolved
once at startup (`exporter.config.otlp.resolve_otlp`, via `check_otlp`) and given to them
explicitly.

OTel names map back to the Prometheus names of the contract through the standard
OTLP→Prometheus translation (`.` → `_`, unit suffix such as `s` → `_seconds`, `_total`
for monotonic sums; unit annotations in braces add nothing). Names come from the metrics
table (`exporter.core.metrics`), which keeps them distinct.

A collector that is down or slow does not hurt: exports run on a thread of their own, never
on the event path, each bounded by the export deadline; cumulative temporality means nothing
is buffered while the collector is away (each export carries the current totals). The SDK
exporters log every failed attempt; their loggers are captured here and we log once per
state change.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, cast

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Metric,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.resources import Resource
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector

from exporter._version import __version__
from exporter.config import ConfigError, Settings
from exporter.config.otlp import DEFAULT_MAX_REQUEST_BYTES, OtlpSettings, resolve_otlp
from exporter.core import metrics
from exporter.core.state import EngineSnapshot, SocketSnapshot
from exporter.render.prometheus import one_sample, render_self
from exporter.render.rows import row_labels, socket_rows

log = logging.getLogger("zmq_exporter.otlp")

STOP_TIMEOUT = 0.5  # seconds the final export may take at shutdown

# The instruments: the families of the metrics table that are pushed, in its order (the
# order of the metrics in an export). Counters are monotonic cumulative Sums, gauges Gauges.
_SLOT = {f.metric_name: n for n, f in enumerate(metrics.PUSHED)}  # by prometheus_client name
# Socket row index (rows.SOCKET_FAMILIES) -> slot (every socket family is pushed).
_SOCKET_SLOT = tuple(metrics.PUSHED.index(f) for f in metrics.SOCKET_FAMILIES)


# ---------------------------------------------------------------------------------------
# The export request from rows.
#
# The request is written as protobuf wire format. Each data point is serialized once,
# without its time, and kept as bytes while its socket's `SocketSnapshot` is unchanged; its
# time field is last and always 9 bytes (fixed64), so an export joins the kept bytes with
# its collection time (one `bytes.join` per metric) and wraps them in the metric, scope and
# resource messages, whose own fields `opentelemetry-proto` serializes once at start.
# Parsers accept fields in any order. The official encoder (SDK data classes -> protobuf
# objects, ~10 us a point on every export) took longer than `generate_latest` alone at
# 10,000 sockets; this takes ~0.035 s, and parsing it into the request message ~0.03 s.

_LEN = 2  # wire type of length-delimited fields
_POINTS = 1  # Sum.data_points and Gauge.data_points
_TIME = b"\x19"  # NumberDataPoint.time_unix_nano: field 3, fixed64 (always 8 bytes)
_TIMED = 9  # bytes the time adds to a point
_STAMP = 8  # bytes the export adds to a kept point (the time's tag is kept with it)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (an embedded message) of a message."""
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _any_value(value: object) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _string(number: int, text: str) -> bytes:
    raw = text.encode()
    return _varint(number << 3 | _LEN) + _varint(len(raw)) + raw


def _attribute(key: str, value: str) -> bytes:
    """`NumberDataPoint.attributes` entry: KeyValue{key, AnyValue{string_value}}."""
    return _field(7, _string(1, key) + _field(2, _string(1, value)))


_START = b"\x11"  # NumberDataPoint.start_time_unix_nano: field 2, fixed64
_DOUBLE = b"\x21"  # NumberDataPoint.as_double: field 4, fixed64 (IEEE 754 double)
_pack_double = struct.Struct("<d").pack


def _point(
    labels: Mapping[str, str],
    start: int | None,
    value: float,
    memo: dict[tuple[str, str], bytes],
) -> bytes:
    """One data point as a repeated `data_points` entry, up to its time: the export
    appends the 8 bytes of its collection time (the length prefix counts them). Written
    by hand: the protobuf classes take ~10 us a point, which is every point of an export
    where every socket changed (tests/test_otlp.py checks it against them)."""
    parts = [_DOUBLE, _pack_double(value)]
    if start is not None:  # sums only: the official encoder gives gauges no start time
        parts += (_START, start.to_bytes(8, "little"))
    for item in labels.items():
        encoded = memo.get(item)
        if encoded is None:
            encoded = memo[item] = _attribute(*item)
        parts.append(encoded)
    body = b"".join(parts)
    return _varint(_POINTS << 3 | _LEN) + _varint(len(body) + _TIMED) + body + _TIME


def _family_parts(family: metrics.Family) -> tuple[bytes, int, bytes]:
    """The metric's fields before its data, the data field's number, and the data
    message's fields after its points (temporality, monotonic)."""
    assert family.otel_name is not None  # a pushed family
    head = Metric(
        name=family.otel_name, description=family.help, unit=family.otel_unit
    ).SerializeToString()
    if family.type == "counter":
        tail = Sum(
            aggregation_temporality=AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE,
            is_monotonic=True,
        ).SerializeToString()
        return head, Metric.SUM_FIELD_NUMBER, tail
    return head, Metric.GAUGE_FIELD_NUMBER, b""


_FAMILIES = tuple(_family_parts(f) for f in metrics.PUSHED)
_IS_SUM = tuple(f.type == "counter" for f in metrics.PUSHED)

# One socket's points: (the snapshot they were built from, start time of its series,
# (instrument slot, serialized points, their bytes with the time) for each family it has
# rows in).
_Entry = tuple[SocketSnapshot, int, tuple[tuple[int, list[bytes], int], ...]]

# What a request adds around its points, at most: a length-delimited field's tag (1 byte
# here) and length (a varint, at most 5 bytes below 2**35).
_FIELD_MAX = 1 + 5


class MetricsBuilder:
    """Builds one export's `ExportMetricsServiceRequest`s from an engine snapshot, keeping
    each socket's serialized data points for as long as its `SocketSnapshot` object is
    handed in again.

    An export is one request, or several when its serialized size would exceed
    `max_request_bytes` (gRPC servers, the Collector's otlp receiver among them, refuse a
    message above 4 MiB by default): the points are cut at point boundaries, in order, and
    every request is a whole one (the resource, the scope, and each metric it carries
    points of, with its name, unit, description, temporality and monotonicity). The kept
    bytes are cut, never serialized again.

    Every point of one export carries that export's collection time (as the SDK stamps
    every point of a collection), a kept point too: its value was read from a snapshot
    that is still current, so it is observed again, never stale. Cumulative sums carry a
    start time per series: when this builder first saw the socket (a socket removed and
    added again starts anew). Not thread-safe: one export thread."""

    def __init__(
        self,
        resource: Resource,
        build: Mapping[str, str],
        extra: Sequence[Collector] = (),
        clock: Callable[[], int] = time.time_ns,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self._build_labels = dict(build)
        self._extra = tuple(extra)
        self._time = clock
        self._started = clock()  # start time of the non-socket series
        self._entries: dict[str, _Entry] = {}
        self.max_request_bytes = max_request_bytes
        self.built = 0  # sockets whose points were (re)built, for tests and the bench
        self.last_built: list[str] = []  # the sockets the last build (re)built, by name
        self.points = 0  # data points in the last export
        self.last_sizes: list[int] = []  # serialized bytes of each request of the last export
        pb_resource = PbResource(
            attributes=[
                KeyValue(key=k, value=_any_value(v)) for k, v in resource.attributes.items()
            ]
        )
        scope = InstrumentationScope(name="zmq-exporter", version=__version__)
        # ResourceMetrics and ScopeMetrics fields before their one scope and its metrics.
        self._resource_head = ResourceMetrics(
            resource=pb_resource, schema_url=resource.schema_url
        ).SerializeToString()
        self._scope_head = ScopeMetrics(scope=scope).SerializeToString()
        # The most a request takes besides its metrics: request.resource_metrics and
        # ResourceMetrics.scope_metrics fields around the two heads.
        self._envelope = len(self._resource_head) + len(self._scope_head) + 2 * _FIELD_MAX

    def build(self, snap: EngineSnapshot) -> ExportMetricsServiceRequest:
        """One unsplit request of the export (parsed from `encode`'s bytes), whatever its
        size: for tests and the bench; the daemon sends `build_requests`."""
        request = ExportMetricsServiceRequest()
        request.ParseFromString(self.encode(snap))
        return request

    def build_requests(self, snap: EngineSnapshot) -> list[ExportMetricsServiceRequest]:
        """The requests of one export, each at most `max_request_bytes` serialized."""
        requests = []
        for payload in self.encode_requests(snap):
            request = ExportMetricsServiceRequest()
            request.ParseFromString(payload)
            requests.append(request)
        return requests

    def encode(self, snap: EngineSnapshot) -> bytes:
        """The serialized `ExportMetricsServiceRequest` of one export, unsplit."""
        now, slots, _ = self._collect(snap)
        stamp = now.to_bytes(8, "little")
        metrics_fields = [
            self._metric(slot, stamp, points) for slot, points in enumerate(slots) if points
        ]
        self.points = sum(len(points) for points in slots)
        payload = self._request(metrics_fields)
        self.last_sizes = [len(payload)]
        return payload

    def encode_requests(self, snap: EngineSnapshot) -> list[bytes]:
        """The serialized requests of one export, each at most `max_request_bytes` (but a
        request of a single point, whatever it takes: a point is never cut). One request
        when the export fits, as `encode` writes it."""
        now, slots, sizes = self._collect(snap)
        stamp = now.to_bytes(8, "little")
        self.points = sum(len(points) for points in slots)
        overhead = [_FIELD_MAX + len(h) + _FIELD_MAX + len(t) for h, _, t in _FAMILIES]
        total = self._envelope + sum(
            overhead[slot] + size for slot, size in enumerate(sizes) if slots[slot]
        )
        if total <= self.max_request_bytes:  # the usual case: one request, nothing cut
            metrics_fields = [
                self._metric(slot, stamp, points) for slot, points in enumerate(slots) if points
            ]
            payloads = [self._request(metrics_fields)]
        else:
            payloads = self._split(slots, stamp, overhead)
        self.last_sizes = [len(p) for p in payloads]
        return payloads

    def _split(self, slots: list[list[bytes]], stamp: bytes, overhead: list[int]) -> list[bytes]:
        """Cut the export into requests at point boundaries: each metric's points in order,
        as many as the room left in the current request takes, the rest in the next.
        Sizes are bounds (every length varint counted at its longest), so a request never
        exceeds the budget; the bisection over the points' running sizes keeps the cost
        at one pass over their lengths."""
        budget = self.max_request_bytes - self._envelope
        payloads: list[bytes] = []
        current: list[bytes] = []  # ScopeMetrics.metrics fields of the request being filled
        used = 0
        for slot, points in enumerate(slots):
            if not points:
                continue
            # ends[k]: bytes of points[:k], each with its time.
            ends = list(itertools.accumulate(map(_STAMP.__add__, map(len, points)), initial=0))
            start, count = 0, len(points)
            while start < count:
                room = budget - used - overhead[slot]
                stop = bisect.bisect_right(ends, ends[start] + room, lo=start) - 1
                if stop <= start:  # not even the next point fits
                    if current:  # a new request
                        payloads.append(self._request(current))
                        current, used = [], 0
                        continue
                    stop = start + 1  # an empty request: the point goes alone
                current.append(self._metric(slot, stamp, points[start:stop]))
                used += overhead[slot] + ends[stop] - ends[start]
                start = stop
                if start < count:  # the metric goes on in the next request
                    payloads.append(self._request(current))
                    current, used = [], 0
        if current or not payloads:
            payloads.append(self._request(current))
        return payloads

    def _metric(self, slot: int, stamp: bytes, points: list[bytes]) -> bytes:
        """A `ScopeMetrics.metrics` field: the metric's head, its points stamped."""
        head, data_field, tail = _FAMILIES[slot]
        data = stamp.join(points) + stamp + tail
        return _field(2, head + _field(data_field, data))

    def _request(self, metrics_fields: list[bytes]) -> bytes:
        scope = self._scope_head + b"".join(metrics_fields)
        resource = self._resource_head + _field(2, scope)  # .scope_metrics
        return _field(1, resource)  # ExportMetricsServiceRequest.resource_metrics

    def _collect(self, snap: EngineSnapshot) -> tuple[int, list[list[bytes]], list[int]]:
        """The export's time, its points by instrument slot (kept ones joined with new
        ones) and their serialized bytes by slot, each point counted with its time."""
        now = self._time()
        self.last_built = []
        slots: list[list[bytes]] = [[] for _ in metrics.PUSHED]
        sizes = [0] * len(metrics.PUSHED)
        old, entries = self._entries, {}
        for sock in snap.sockets:
            entry = old.get(sock.name)
            if entry is None or entry[0] is not sock:
                entry = self._build(sock, now if entry is None else entry[1])
            entries[sock.name] = entry
            for slot, points, size in entry[2]:
                slots[slot] += points
                sizes[slot] += size
        self._entries = entries
        others: list[PromMetric] = list(render_self(snap, self._build_labels))
        for collector in self._extra:
            others.extend(collector.collect())
        for other in others:
            found = _SLOT.get(other.name)
            if found is None:
                continue  # not pushed (the table says which families are)
            memo: dict[tuple[str, str], bytes] = {}
            start = self._started if _IS_SUM[found] else None
            new = [_point(s.labels, start, float(s.value), memo) for s in other.samples]
            slots[found] += new
            sizes[found] += sum(map(len, new)) + _STAMP * len(new)
        return now, slots, sizes

    def _build(self, sock: SocketSnapshot, start: int) -> _Entry:
        self.built += 1
        self.last_built.append(sock.name)
        by_slot: dict[int, list[bytes]] = {}
        memo: dict[tuple[str, str], bytes] = {}  # a socket's labels repeat in its rows
        for index, endpoint, extra, value in socket_rows(sock):
            slot = _SOCKET_SLOT[index]
            since = start if _IS_SUM[slot] else None
            point = _point(row_labels(sock, endpoint, extra), since, float(value), memo)
            points = by_slot.get(slot)
            if points is None:
                by_slot[slot] = [point]
            else:
                points.append(point)
        kept = tuple(
            (slot, points, sum(map(len, points)) + _STAMP * len(points))
            for slot, points in by_slot.items()
        )
        return sock, start, kept


def make_resource(settings: OtlpSettings) -> Resource:
    """The resolved resource attributes plus the SDK's `telemetry.sdk.*`."""
    return Resource.create(dict(settings.resource))


# ---------------------------------------------------------------------------------------
# Export outcome: counted, and logged once per state change.


class _SdkLogCapture(logging.Handler):
    """Takes the SDK exporters' per-attempt log records off the root logger; keeps the
    last message as the reason shown in our state-change log lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string in a third-party log call
            message = str(record.msg)
        if record.levelno >= logging.WARNING:
            self.last = message
        log.debug("sdk: %s", message, extra={"sdk_logger": record.name})


_SDK_LOGGERS = ("opentelemetry.exporter.otlp", "opentelemetry.exporter.http")
_capture = _SdkLogCapture()


def _tame_sdk_logs() -> None:
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if _capture not in logger.handlers:
            logger.addHandler(_capture)
        logger.propagate = False


class ExportStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = 0
        self.failure = 0
        self.last_success_time = 0.0
        self.last_duration = 0.0
        self.failing: bool | None = None  # None: no export yet
        self.last_requests = 0  # requests the last export sent (a large export: several)

    def record(
        self, ok: bool, duration: float, reason: str, endpoint: str, requests: int = 1
    ) -> None:
        """One export: `ok` when every one of its `requests` succeeded."""
        with self._lock:
            self.last_requests = requests
            was_failing = self.failing
            outage = self.failure  # failures so far, to report the outage's size
            if ok:
                self.success += 1
                self.last_success_time = time.time()
            else:
                self.failure += 1
            self.failing = not ok
            self.last_duration = duration
        if ok and was_failing is not False:
            if was_failing is None:
                log.info("OTLP export working", extra={"endpoint": endpoint, "requests": requests})
            else:
                log.info(
                    "OTLP export recovered",
                    extra={"endpoint": endpoint, "failed_exports_total": outage},
                )
        elif not ok and was_failing is not True:
            log.warning(
                "OTLP export failing; retrying every interval (logged again on recovery)",
                extra={"endpoint": endpoint, "err": reason or "unknown"},
            )


# ---------------------------------------------------------------------------------------
# The official exporters, given every resolved setting.


class PayloadExporter(Protocol):
    """An official exporter that is handed the request itself (see `sdk_exporter`)."""

    def export(
        self, metrics_data: ExportMetricsServiceRequest, timeout_millis: float = ...
    ) -> MetricExportResult: ...

    def shutdown(self, timeout_millis: float = ...) -> None: ...

    def send(self, request: ExportMetricsServiceRequest, timeout: float) -> MetricExportResult: ...


# The private methods of the official exporters that `sdk_exporter`'s subclasses rely on,
# by class: checked when an exporter is made, so that a version without them stops
# startup with a clear message instead of sending nothing (or encoding slowly).
# Verified with 1.45; pyproject.toml pins the exporters to that minor version.
HOOKS = {
    "grpc": ("_translate_data", "_count_data", "_export"),
    "http/protobuf": ("_export_batch",),
}
# The attribute each made exporter reads its per-request deadline from (seconds, retries
# included), set before each request of an export to the time the export has left: the
# export's deadline bounds all its requests together.
TIMEOUT_HOOKS = {"grpc": "_timeout", "http/protobuf": "_client._timeout"}


def _check_hooks(cls: type, protocol: str) -> None:
    missing = [name for name in HOOKS[protocol] if not hasattr(cls, name)]
    if missing:
        raise RuntimeError(
            f"{cls.__module__}.{cls.__name__} has no {', '.join(missing)}: this version of "
            "the OTLP exporter is not supported (see pyproject.toml for the versions that are)"
        )


def _check_timeout_hook(exporter: object, protocol: str) -> None:
    owner = exporter
    path = TIMEOUT_HOOKS[protocol].split(".")
    for name in path[:-1]:
        owner = getattr(owner, name, None)
    if not isinstance(getattr(owner, path[-1], None), (int, float)):
        cls = type(exporter).__mro__[1]
        raise RuntimeError(
            f"{cls.__module__}.{cls.__name__} has no {TIMEOUT_HOOKS[protocol]}: this version "
            "of the OTLP exporter is not supported (see pyproject.toml for the versions that are)"
        )


def sdk_exporter(settings: OtlpSettings) -> PayloadExporter:
    """The official exporter for the protocol, with the settings resolved here (so the
    SDK's own reading of the same variables never disagrees); it still reads the
    certificate variables (OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE, ..._CLIENT_*).

    Its `export` is handed the `ExportMetricsServiceRequest` that `MetricsBuilder` built,
    not a `MetricsData`: the subclasses below replace only the step that encodes
    (`encode_metrics`), so transport, retries with backoff, TLS, compression, headers and
    the exporter's own size check and metrics are the official code."""
    timeout = settings.export_deadline  # seconds, the exporter's retries included
    if settings.protocol == "grpc":
        # grpc core prints its own INFO lines (a GOAWAY from a restarting collector) to
        # stderr unless told otherwise; it reads this when first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        import grpc  # only for Compression (no stubs: pyproject's mypy override)
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        _check_hooks(GrpcExporter, "grpc")

        class _Grpc(GrpcExporter):
            # export() hands its argument to _export(), which calls _translate_data on
            # each attempt and _count_data once (the exporter's own metrics).
            def _translate_data(  # type: ignore[override]
                self, data: ExportMetricsServiceRequest
            ) -> ExportMetricsServiceRequest:
                return data

            def _count_data(self, data: ExportMetricsServiceRequest) -> int:  # type: ignore[override]
                return count_points(data)

            def send(
                self, request: ExportMetricsServiceRequest, timeout: float
            ) -> MetricExportResult:
                # _export's deadline (its retries included) is now + self._timeout.
                self._timeout = timeout
                result: MetricExportResult = self._export(request)
                return result

        made = _Grpc(
            endpoint=settings.endpoint,
            insecure=settings.plaintext,
            headers=dict(settings.headers),
            timeout=timeout,
            compression=(
                grpc.Compression.Gzip
                if settings.compression == "gzip"
                else grpc.Compression.NoCompression
            ),
        )
        _check_timeout_hook(made, "grpc")
        return cast(PayloadExporter, made)
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    _check_hooks(HttpExporter, "http/protobuf")

    class _Http(HttpExporter):
        # The official export() is encode_metrics() then _export_batch(request) (count,
        # serialize, size check, send with retries); this export() skips the encoding.
        def export(  # type: ignore[override]
            self,
            metrics_data: ExportMetricsServiceRequest,
            timeout_millis: float | None = 10000,
            **kwargs: object,
        ) -> MetricExportResult:
            if self._shutdown:
                log.debug("OTLP exporter already shut down; export skipped")
                return MetricExportResult.FAILURE
            result: MetricExportResult = self._export_batch(metrics_data)
            return result

        def send(self, request: ExportMetricsServiceRequest, timeout: float) -> MetricExportResult:
            # The client's export() deadline (its retries included) is now + its _timeout.
            self._client._timeout = timeout
            return self.export(request)

    http = _Http(
        endpoint=settings.endpoint,
        headers=dict(settings.headers),
        timeout=timeout,
        compression=(
            Compression.Gzip if settings.compression == "gzip" else Compression.NoCompression
        ),
    )
    _check_timeout_hook(http, "http/protobuf")
    return cast(PayloadExporter, http)


def count_points(request: ExportMetricsServiceRequest) -> int:
    """The data points of a request (every metric here is a Sum or a Gauge)."""
    return sum(
        len(getattr(m, m.WhichOneof("data") or "gauge").data_points)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )


def check_otlp(settings: Settings, env: Mapping[str, str] | None = None) -> OtlpSettings | None:
    """Resolve the OTLP settings (the `otlp:` section and the OTEL_* environment) once at
    startup and for --config.check, log what is ignored, and try building the exporter;
    every problem becomes a one-line `ConfigError`. None when OTLP is off. The daemon is
    handed the result."""
    warnings: list[str] = []
    otlp = resolve_otlp(settings.otlp, os.environ if env is None else env, warnings, settings.file)
    for message in warnings:
        log.warning(message)
    if otlp is None:
        return None
    try:
        _tame_sdk_logs()
        exporter = sdk_exporter(otlp)
    except Exception as err:  # e.g. an unreadable OTEL_EXPORTER_OTLP_CERTIFICATE
        raise ConfigError("OTLP exporter", None, (), f"cannot be created: {err}") from None
    exporter.shutdown()
    return otlp


class OtlpOutput:
    """The OTLP side of the daemon: start after the engine, stop before it. One thread
    exports every `interval`, each export bounded by `export_deadline`; `stop` makes a
    final export, bounded by its `timeout`."""

    def __init__(
        self,
        settings: OtlpSettings,
        snapshot: Callable[[], EngineSnapshot],
        build: Mapping[str, str],
        extra: Sequence[Collector] = (),
    ) -> None:
        self.settings = settings
        self.stats = ExportStats()
        self.builder = MetricsBuilder(
            make_resource(settings), build, extra, max_request_bytes=settings.max_request_bytes
        )
        self._snapshot = snapshot
        self._exporter: PayloadExporter | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        _tame_sdk_logs()
        s = self.settings
        self._exporter = sdk_exporter(s)
        self._thread = threading.Thread(target=self._run, name="zmq-exporter-otlp", daemon=True)
        self._thread.start()
        log.info(
            "OTLP push started",
            extra={
                "protocol": s.protocol,
                "endpoint": s.endpoint,
                "interval": s.interval,
                "timeout": s.export_deadline,
                "max_request_bytes": s.max_request_bytes,
                "headers": sorted(s.headers),  # names only: values are often credentials
            },
        )

    def _run(self) -> None:
        while not self._stopping.wait(self.settings.interval):
            self.export_once()
        self.export_once()  # the final export, bounded by stop()

    def export_once(self) -> bool:
        """One export of the current state; counted and logged, never raises."""
        exporter = self._exporter
        if exporter is None:
            return False
        started = time.monotonic()
        deadline = started + self.settings.export_deadline
        _capture.last = ""
        sent = failed = 0
        try:
            requests = self.builder.build_requests(self._snapshot())
            for number, request in enumerate(requests, 1):
                # Each request gets the time the export has left (its retries included).
                left = deadline - time.monotonic()
                if left <= 0:
                    failed += len(requests) - sent
                    _capture.last = (
                        f"export deadline ({self.settings.export_deadline:g} s) passed before "
                        f"request {number} of {len(requests)}"
                    )
                    break
                sent += 1
                # A request that fails does not stop the others: each carries current
                # cumulative totals of its own series, useful without the rest.
                if exporter.send(request, left) != MetricExportResult.SUCCESS:
                    failed += 1
            ok = failed == 0
        except Exception as err:  # the thread must go on whatever one export does
            ok = False
            _capture.last = repr(err)
        self.stats.record(
            ok, time.monotonic() - started, _capture.last, self.settings.endpoint, sent
        )
        return ok

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Final export, then shut down; bounded by `timeout` even if the collector hangs:
        past it, retries are cut short and the channel or session closed; an export stuck
        in a read is left to its (daemon) thread."""
        thread, exporter = self._thread, self._exporter
        if thread is None or exporter is None:
            return
        self._thread = None
        self._stopping.set()
        thread.join(timeout)
        self._exporter = None  # an export not yet begun is not begun any more
        try:
            # Aborts the SDK's retry backoff and closes its channel or session.
            exporter.shutdown(timeout_millis=0)
        except Exception as err:
            log.debug("OTLP exporter shutdown error", extra={"err": repr(err)})
        if thread.is_alive():
            thread.join(0.2)
            if thread.is_alive():
                log.warning("OTLP shutdown timed out; last export abandoned")

    def collector(self) -> Collector:
        return _SelfCollector(self.stats)


class _SelfCollector(Collector):
    """`zmq_exporter_otlp_*` on /metrics: how the push is doing."""

    def __init__(self, stats: ExportStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[PromMetric]:
        stats = self._stats
        f = metrics.OTLP_EXPORTS
        exports = PromMetric(f.metric_name, f.help, f.type)
        counts = {"success": stats.success, "failure": stats.failure}
        for result in f.values:
            exports.add_sample(f.name, {"result": result}, counts[result])
        yield exports
        yield one_sample(metrics.OTLP_LAST_SUCCESS, stats.last_success_time)
        yield one_sample(metrics.OTLP_LAST_DURATION, stats.last_duration)
