"""The OTLP output: pushes the engine's state over OTLP (gRPC or HTTP/protobuf), beside the
web server (`web.py`), from the same rows as `/metrics`.

Same state, same numbers as `/metrics`: each export takes one `Engine.snapshot()` and builds
its `MetricsData` from `socket_rows` (the rows `SocketText` renders) and `render_self` plus
the daemon's other collectors. There is no second count of events, and a series exists over
OTLP exactly when it exists on `/metrics`. The SDK's instruments and aggregation are not on
the path: at 10,000 sockets they cost more than the export itself. Like the /metrics text
cache, each socket's data points are kept while `Engine.snapshot()` hands out the same
`SocketSnapshot` object (the socket had no event), so an idle socket costs a list extend.

The official exporters (`opentelemetry-exporter-otlp-proto-grpc`/`-http`) do transport,
retries with backoff, TLS and certificates; every other setting is resolved once at startup
(`exporter.config.otlp.resolve_otlp`, via `check_otlp`) and given to them explicitly.

OTel names map back to the Prometheus names of the contract through the standard
OTLP→Prometheus translation (`.` → `_`, unit suffix such as `s` → `_seconds`, `_total`
for monotonic sums; unit annotations in braces add nothing). The contract has a counter
`zmq_listening_total` and a gauge `zmq_listening`: the counter is `zmq.listening_total`
(the translation strips a trailing `total` token and appends `_total` once) and the gauge
`zmq.listening`, two distinct OTel names that do not collide.

A collector that is down or slow does not hurt: exports run on a thread of their own, never
on the event path, each bounded by the export deadline; cumulative temporality means nothing
is buffered while the collector is away (each export carries the current totals). The SDK
exporters log every failed attempt; their loggers are captured here and we log once per
state change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector

from exporter import __version__, metrics
from exporter.config import ConfigError, Settings
from exporter.config.otlp import OtlpSettings, resolve_otlp
from exporter.render.prometheus import one_sample, render_self
from exporter.render.rows import row_labels, socket_rows
from exporter.state import EngineSnapshot, SocketSnapshot

log = logging.getLogger("zmq_exporter.otlp")

STOP_TIMEOUT = 0.5  # seconds the final export may take at shutdown

# The instruments: the families of the metrics table that are pushed, in its order (the
# order of the metrics in an export). Counters are monotonic cumulative Sums, gauges Gauges.
_SLOT = {f.metric_name: n for n, f in enumerate(metrics.PUSHED)}  # by prometheus_client name
# Socket row index (rows.SOCKET_FAMILIES) -> slot (every socket family is pushed).
_SOCKET_SLOT = tuple(metrics.PUSHED.index(f) for f in metrics.SOCKET_FAMILIES)


# ---------------------------------------------------------------------------------------
# MetricsData from rows.


class _Clock:
    """The time of the collection being built, shared by every point of one builder."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0


class _Point(NumberDataPoint):
    """A `NumberDataPoint` kept across exports while its socket is idle. Its value was
    read from a snapshot that is still current, so it is observed again at each
    collection: `time_unix_nano` is the collection time of its builder, as the SDK stamps
    every point of a collection, and never a stale one (a receiver would mark the series
    stale). Everything else is fixed at creation."""

    _clock: _Clock

    def __init__(
        self, attributes: dict[str, str], start_time_unix_nano: int, value: float, clock: _Clock
    ) -> None:
        # The dataclass is frozen; its own __init__ would also set time_unix_nano.
        setattr_ = object.__setattr__
        setattr_(self, "attributes", attributes)
        setattr_(self, "start_time_unix_nano", start_time_unix_nano)
        setattr_(self, "value", value)
        setattr_(self, "exemplars", ())
        setattr_(self, "_clock", clock)

    @property
    def time_unix_nano(self) -> int:
        return self._clock.now


# One socket's points: (the snapshot they were built from, start time of its series,
# (instrument slot, points) for each family it has rows in).
_Entry = tuple[SocketSnapshot, int, tuple[tuple[int, list[NumberDataPoint]], ...]]


class MetricsBuilder:
    """Builds one export's `MetricsData` from an engine snapshot, keeping each socket's
    data points for as long as its `SocketSnapshot` object is handed in again.

    Cumulative sums carry a start time per series: when this builder first saw the socket
    (a socket removed and added again starts anew). Not thread-safe: one export thread."""

    def __init__(
        self,
        resource: Resource,
        extra: Sequence[Collector] = (),
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._resource = resource
        self._scope = InstrumentationScope("zmq-exporter", __version__)
        self._extra = tuple(extra)
        self._time = clock
        self._clock = _Clock()
        self._started = clock()  # start time of the non-socket series
        self._entries: dict[str, _Entry] = {}
        self.built = 0  # sockets whose points were (re)built, for tests and the bench

    def build(self, snap: EngineSnapshot) -> MetricsData:
        now = self._time()
        self._clock.now = now
        slots: list[list[NumberDataPoint]] = [[] for _ in metrics.PUSHED]
        old, entries = self._entries, {}
        for sock in snap.sockets:
            entry = old.get(sock.name)
            if entry is None or entry[0] is not sock:
                entry = self._build(sock, now if entry is None else entry[1])
            entries[sock.name] = entry
            for slot, points in entry[2]:
                slots[slot] += points
        self._entries = entries
        others: list[PromMetric] = list(render_self(snap))
        for collector in self._extra:
            others.extend(collector.collect())
        for other in others:
            found = _SLOT.get(other.name)
            if found is None:
                continue  # not pushed (the table says which families are)
            slots[found] += [
                _Point(dict(s.labels), self._started, float(s.value), self._clock)
                for s in other.samples
            ]
        pushed = [
            _metric(family, points)
            for family, points in zip(metrics.PUSHED, slots, strict=True)
            if points  # as the SDK: an instrument without points is left out
        ]
        scope = ScopeMetrics(self._scope, pushed, "")
        return MetricsData([ResourceMetrics(self._resource, [scope], "")])

    def _build(self, sock: SocketSnapshot, start: int) -> _Entry:
        self.built += 1
        clock = self._clock
        by_slot: dict[int, list[NumberDataPoint]] = {}
        for index, endpoint, extra, value in socket_rows(sock):
            point = _Point(row_labels(sock, endpoint, extra), start, float(value), clock)
            slot = _SOCKET_SLOT[index]
            points = by_slot.get(slot)
            if points is None:
                by_slot[slot] = [point]
            else:
                points.append(point)
        return sock, start, tuple(by_slot.items())


_CUMULATIVE = AggregationTemporality.CUMULATIVE


def _metric(family: metrics.Family, points: list[NumberDataPoint]) -> Metric:
    counter = family.type == "counter"
    data = Sum(points, _CUMULATIVE, is_monotonic=True) if counter else Gauge(points)
    assert family.otel_name is not None  # a pushed family
    return Metric(family.otel_name, family.help, family.otel_unit, data)


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

    def record(self, ok: bool, duration: float, reason: str, endpoint: str) -> None:
        with self._lock:
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
                log.info("OTLP export working", extra={"endpoint": endpoint})
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


def sdk_exporter(settings: OtlpSettings) -> MetricExporter:
    """The official exporter for the protocol, with the settings resolved here (so the
    SDK's own reading of the same variables never disagrees); it still reads the
    certificate variables (OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE, ..._CLIENT_*)."""
    timeout = settings.export_deadline  # seconds, the exporter's retries included
    if settings.protocol == "grpc":
        # grpc core prints its own INFO lines (a GOAWAY from a restarting collector) to
        # stderr unless told otherwise; it reads this when first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        import grpc  # type: ignore[import-untyped]  # no stubs; only for Compression
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(
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
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(
        endpoint=settings.endpoint,
        headers=dict(settings.headers),
        timeout=timeout,
        compression=(
            Compression.Gzip if settings.compression == "gzip" else Compression.NoCompression
        ),
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
        extra: Sequence[Collector] = (),
    ) -> None:
        self.settings = settings
        self.stats = ExportStats()
        self.builder = MetricsBuilder(make_resource(settings), extra)
        self._snapshot = snapshot
        self._exporter: MetricExporter | None = None
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
        _capture.last = ""
        try:
            data = self.builder.build(self._snapshot())
            result = exporter.export(data, timeout_millis=self.settings.export_deadline * 1000)
        except Exception as err:  # the thread must go on whatever one export does
            result = MetricExportResult.FAILURE
            _capture.last = repr(err)
        ok = result == MetricExportResult.SUCCESS
        self.stats.record(ok, time.monotonic() - started, _capture.last, self.settings.endpoint)
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
