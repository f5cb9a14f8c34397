"""The OTLP export request, written from the rows `/metrics` renders.

Same state, same numbers as `/metrics`: each export takes one `Engine.snapshot()` and builds
its `ExportMetricsServiceRequest` from `socket_rows` (the rows `SocketText` renders) and
`render_self` plus the daemon's other collectors. There is no second count of events, and a
series exists over OTLP exactly when it exists on `/metrics`. No OpenTelemetry SDK is on the
path (neither its instruments and aggregation nor its encoder: at 10,000 sockets each costs
more than `generate_latest`). The request is protobuf wire format, which is public: the
metric, scope and resource messages around the points are serialized once, at start, by
the public generated classes of `opentelemetry-proto`; each data point is written here and
kept, serialized, while `Engine.snapshot()` hands out the same `SocketSnapshot` object (the
socket had no event), so an idle socket costs a list extend. The transport sends these
bytes as they are (exporter/otlp/transport.py). An export larger than `max_request_bytes`
(default 4,000,000: gRPC servers refuse messages above 4 MiB by default) is cut at point
boundaries into several whole requests.

OTel names map back to the Prometheus names of the contract through the standard
OTLP→Prometheus translation (`.` → `_`, unit suffix such as `s` → `_seconds`, `_total`
for monotonic sums; unit annotations in braces add nothing). Names come from the metrics
table (`exporter.core.metrics`), which keeps them distinct.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import time
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
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
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector

from exporter._version import __version__
from exporter.config.otlp import DEFAULT_MAX_REQUEST_BYTES
from exporter.core import metrics
from exporter.core.state import EngineSnapshot, SocketSnapshot
from exporter.render.prometheus import render_self
from exporter.render.rows import row_labels, socket_rows

# The instrumentation scope of every metric: this program, at its version. The scope names
# what produced the metrics (the OTLP data model's "instrumentation library"); receivers
# keep it (Prometheus: `otel_scope_name`/`otel_scope_version` labels), so a series can be
# traced back to the exporter release that wrote it.
SCOPE_NAME = "zmq-exporter"
SCOPE_VERSION = __version__

# The instruments, in the order of the metrics in an export: metrics.DAEMON_INSTRUMENTS (a
# socket family's slot: metrics.SOCKET_SLOTS; any family's: DAEMON_INSTRUMENT_SLOT by
# prometheus_client name). Counters are monotonic cumulative Sums, gauges Gauges.
_INSTRUMENTS = metrics.DAEMON_INSTRUMENTS


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
    where every socket changed (tests/otlp/test_otlp.py checks it against them)."""
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


_FAMILIES = tuple(_family_parts(f) for f in _INSTRUMENTS)
_IS_SUM = tuple(f.type == "counter" for f in _INSTRUMENTS)

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
        resource: Mapping[str, str],
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
        # The resource's attributes (exporter.config.otlp.resolve_otlp: every one is a
        # string), in the order given.
        pb_resource = PbResource(
            attributes=[
                KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in resource.items()
            ]
        )
        scope = InstrumentationScope(name=SCOPE_NAME, version=SCOPE_VERSION)
        # ResourceMetrics and ScopeMetrics fields before their one scope and its metrics.
        self._resource_head = ResourceMetrics(resource=pb_resource).SerializeToString()
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
        slots: list[list[bytes]] = [[] for _ in _INSTRUMENTS]
        sizes = [0] * len(_INSTRUMENTS)
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
            found = metrics.DAEMON_INSTRUMENT_SLOT.get(other.name)
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
            slot = metrics.SOCKET_SLOTS[index]
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


def count_points(request: ExportMetricsServiceRequest) -> int:
    """The data points of a request (every metric here is a Sum or a Gauge)."""
    return sum(
        len(getattr(m, m.WhichOneof("data") or "gauge").data_points)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )
