"""Pushes the engine's state over OTLP (gRPC or HTTP/protobuf) with the OpenTelemetry SDK.

Same state, same numbers as `/metrics`: every instrument is observable, and its callback
reads rows built from one `Engine.snapshot()` per collection by the very functions that
build the Prometheus families (`render_sockets`, `render_self`). There is no second count
of events, and a row exists over OTLP exactly when it exists on `/metrics`.

OTel names map back to the Prometheus names of the contract through the standard
OTLP→Prometheus translation (`.` → `_`, unit suffix such as `s` → `_seconds`, `_total`
for monotonic sums; unit annotations in braces add nothing). The contract has a counter
`zmq_listening_total` and a gauge `zmq_listening`: the counter is `zmq.listening_total`
(the translation strips a trailing `total` token and appends `_total` once) and the gauge
`zmq.listening`, two distinct OTel names that do not collide.

A collector that is down or slow does not hurt: export runs on the SDK's
PeriodicExportingMetricReader thread, never on the event path; the SDK exporters retry with
backoff within their timeout; cumulative temporality means nothing is buffered while the
collector is away (each export re-reads the current totals). The SDK exporters log every
failed attempt; their loggers are captured here and we log once per state change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.config import ConfigError, Settings
from exporter.config.otlp import OtlpSettings, resolve_otlp
from exporter.render.prometheus import render_self, render_sockets
from exporter.state import EngineSnapshot

log = logging.getLogger("zmq_exporter.otlp")

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Instrument:
    otel_name: str
    kind: Kind  # counter: ObservableCounter (monotonic, cumulative); gauge: ObservableGauge
    unit: str
    family: str  # the Prometheus family it is rendered from (and translates back to)

    @property
    def prometheus_name(self) -> str:
        """The name the standard OTLP→Prometheus translation gives this instrument."""
        name = self.otel_name.replace(".", "_")
        if self.unit == "s":
            name += "_seconds"
        if self.kind == "counter":
            name = name.removesuffix("_total") + "_total"
        return name


def _counter(otel: str, unit: str, family: str) -> Instrument:
    return Instrument(otel, "counter", unit, family)


def _gauge(otel: str, unit: str, family: str) -> Instrument:
    return Instrument(otel, "gauge", unit, family)


# Order is the README's table. Units in braces are UCUM annotations: they document the
# counted thing and add no suffix in the Prometheus translation.
INSTRUMENTS: tuple[Instrument, ...] = (
    _counter("zmq.connected", "{connection}", "zmq_connected"),
    _counter("zmq.connect_delayed", "{attempt}", "zmq_connect_delayed"),
    _counter("zmq.connect_retried", "{attempt}", "zmq_connect_retried"),
    _counter("zmq.listening_total", "{bind}", "zmq_listening_total"),
    _counter("zmq.bind_failed", "{attempt}", "zmq_bind_failed"),
    _counter("zmq.accepted", "{connection}", "zmq_accepted"),
    _counter("zmq.accept_failed", "{attempt}", "zmq_accept_failed"),
    _counter("zmq.closed", "{fd}", "zmq_closed"),
    _counter("zmq.close_failed", "{attempt}", "zmq_close_failed"),
    _counter("zmq.disconnected", "{connection}", "zmq_disconnected"),
    _counter("zmq.monitor_stopped", "{monitor}", "zmq_monitor_stopped"),
    _counter("zmq.handshake_succeeded", "{handshake}", "zmq_handshake_succeeded"),
    _counter("zmq.handshake_failed", "{handshake}", "zmq_handshake_failed"),
    _gauge("zmq.connections", "{connection}", "zmq_connections"),
    _gauge("zmq.listening", "{listener}", "zmq_listening"),
    _gauge("zmq.reconnect_interval", "s", "zmq_reconnect_interval_seconds"),
    _gauge("zmq.last_event_timestamp", "s", "zmq_last_event_timestamp_seconds"),
    _counter("zmq.unknown_events", "{event}", "zmq_unknown_events"),
    _gauge("zmq.socket_info", "", "zmq_socket_info"),
    _gauge("zmq_exporter.build_info", "", "zmq_exporter_build_info"),
    _counter("zmq_exporter.events_processed", "{event}", "zmq_exporter_events_processed"),
    _gauge("zmq_exporter.reader_backlog_events", "{event}", "zmq_exporter_reader_backlog_events"),
    _gauge(
        "zmq_exporter.reader_backlog_max_events",
        "{event}",
        "zmq_exporter_reader_backlog_max_events",
    ),
    _counter("zmq_exporter.reader_wakeups", "{wakeup}", "zmq_exporter_reader_wakeups"),
    _counter(
        "zmq_exporter.inbound_messages_dropped",
        "{message}",
        "zmq_exporter_inbound_messages_dropped",
    ),
    _counter("zmq_exporter.attach_failures", "{attempt}", "zmq_exporter_attach_failures"),
    _counter("zmq_exporter.engine_errors", "{error}", "zmq_exporter_engine_errors"),
    _gauge("zmq_exporter.sockets", "{socket}", "zmq_exporter_sockets"),
    _gauge(
        "zmq_exporter.config_last_reload_successful",
        "",
        "zmq_exporter_config_last_reload_successful",
    ),
    _gauge(
        "zmq_exporter.config_last_reload_success_timestamp",
        "s",
        "zmq_exporter_config_last_reload_success_timestamp_seconds",
    ),
)

Rows = dict[str, list[tuple[dict[str, str], float]]]  # family -> [(labels, value)]


def render_rows(
    snap: EngineSnapshot, extra: Sequence[Collector] = ()
) -> tuple[Rows, dict[str, str]]:
    """Rows of every family, from the functions that render `/metrics` (and the daemon's
    other collectors in `extra`); and help texts."""
    rows: Rows = {}
    helps: dict[str, str] = {}
    families: list[Metric] = [*render_sockets(snap.sockets), *render_self(snap)]
    for collector in extra:
        families.extend(collector.collect())
    for family in families:
        helps[family.name] = family.documentation
        rows[family.name] = [(dict(s.labels), float(s.value)) for s in family.samples]
    return rows, helps


class _RowSource:
    """One snapshot per collection. The SDK calls the instruments' callbacks one after the
    other on the reader thread; the first call takes a snapshot and pins its rows, the
    others read the pinned rows, and the reader unpins them when the collection is handed
    to the exporter (`_receive_metrics`). `MetricReader.collect` is final in the SDK, so
    there is no hook before the callbacks; a pin older than `MAX_PIN_AGE` is never reused
    (a collection that failed before `_receive_metrics`)."""

    MAX_PIN_AGE = 1.0  # seconds; one collection's callbacks take milliseconds

    def __init__(
        self, snapshot: Callable[[], EngineSnapshot], extra: Sequence[Collector] = ()
    ) -> None:
        self._snapshot = snapshot
        self._extra = tuple(extra)
        self._lock = threading.Lock()
        self._pinned: Rows | None = None
        self._pinned_at = 0.0
        self.snapshots = 0  # snapshots taken, for tests and debugging

    def unpin(self) -> None:
        with self._lock:
            self._pinned = None

    def rows(self, family: str) -> list[tuple[dict[str, str], float]]:
        with self._lock:
            now = time.monotonic()
            if self._pinned is None or now - self._pinned_at > self.MAX_PIN_AGE:
                self.snapshots += 1
                self._pinned = render_rows(self._snapshot(), self._extra)[0]
                self._pinned_at = now
            return self._pinned.get(family, [])

    def help_texts(self) -> dict[str, str]:
        return render_rows(self._snapshot(), self._extra)[1]


class _Reader(PeriodicExportingMetricReader):
    def __init__(self, exporter: MetricExporter, source: _RowSource, interval: float) -> None:
        self._source = source
        super().__init__(
            exporter,
            export_interval_millis=interval * 1000,
            export_timeout_millis=max(interval, 1.0) * 1000,
        )

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._source.unpin()  # the collection is complete; the next one snapshots again
        super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)


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


class _TrackedExporter(MetricExporter):
    """Delegates to the SDK's OTLP exporter, always cumulative; counts and logs outcomes
    and never lets an exception escape into the reader thread."""

    def __init__(self, inner: MetricExporter, stats: ExportStats, endpoint: str) -> None:
        cumulative = AggregationTemporality.CUMULATIVE
        super().__init__(
            preferred_temporality={
                kind: cumulative
                for kind in (
                    Counter,
                    UpDownCounter,
                    Histogram,
                    ObservableCounter,
                    ObservableUpDownCounter,
                    ObservableGauge,
                )
            },
        )
        self.inner = inner
        self._stats = stats
        self._endpoint = endpoint

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        _capture.last = ""
        started = time.monotonic()
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis)
        except Exception as err:
            result = MetricExportResult.FAILURE
            _capture.last = repr(err)
        ok = result == MetricExportResult.SUCCESS
        self._stats.record(ok, time.monotonic() - started, _capture.last, self._endpoint)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis)


def _sdk_exporter(settings: OtlpSettings) -> MetricExporter:
    """The official exporter for the protocol. Other OTEL_EXPORTER_OTLP_* variables
    (certificates, compression) are read by the SDK itself."""
    if settings.protocol == "grpc":
        # grpc core prints its own INFO lines (a GOAWAY from a restarting collector) to
        # stderr unless told otherwise; it reads this when first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(
            endpoint=settings.endpoint,
            insecure=settings.endpoint.startswith("http://"),
            headers=dict(settings.headers),
            timeout=settings.timeout,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(
        endpoint=settings.endpoint, headers=dict(settings.headers), timeout=settings.timeout
    )


def check_otlp(settings: Settings, env: Mapping[str, str] | None = None) -> OtlpSettings | None:
    """Resolve and try the OTLP settings at startup (and for --config.check); every
    problem becomes a one-line `ConfigError`. None when OTLP is off."""
    warnings: list[str] = []
    otlp = resolve_otlp(settings.otlp, os.environ if env is None else env, warnings)
    for message in warnings:
        log.warning(message)
    if otlp is None:
        return None
    try:
        _tame_sdk_logs()
        exporter = _sdk_exporter(otlp)
    except Exception as err:  # e.g. a bad OTEL_EXPORTER_OTLP_COMPRESSION
        raise ConfigError("OTLP exporter", None, (), f"cannot be created: {err}") from None
    exporter.shutdown()
    return otlp


class OtlpPusher:
    """The OTLP side of the daemon: start after the engine, stop before it."""

    def __init__(
        self,
        settings: OtlpSettings,
        snapshot: Callable[[], EngineSnapshot],
        extra: Sequence[Collector] = (),
    ) -> None:
        self.settings = settings
        self.stats = ExportStats()
        self.source = _RowSource(snapshot, extra)
        self._provider: MeterProvider | None = None
        self._exporter: _TrackedExporter | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        snapshot: Callable[[], EngineSnapshot],
        extra: Sequence[Collector] = (),
        env: Mapping[str, str] | None = None,
    ) -> OtlpPusher | None:
        """None when OTLP is off. Settings were checked by `check_otlp` at startup.
        `extra`: the daemon's other collectors of `zmq_exporter_*` families."""
        otlp = resolve_otlp(settings.otlp, os.environ if env is None else env)
        return cls(otlp, snapshot, extra) if otlp is not None else None

    def start(self) -> None:
        _tame_sdk_logs()
        s = self.settings
        self._exporter = _TrackedExporter(_sdk_exporter(s), self.stats, s.endpoint)
        reader = _Reader(self._exporter, self.source, s.interval)
        self._provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create(dict(s.resource)),
            shutdown_on_exit=False,
        )
        meter = self._provider.get_meter("zmq-exporter", __version__)
        helps = self.source.help_texts()
        for inst in INSTRUMENTS:
            create = (
                meter.create_observable_counter
                if inst.kind == "counter"
                else meter.create_observable_gauge
            )
            create(
                inst.otel_name,
                callbacks=[self._callback(inst.family)],
                unit=inst.unit,
                description=helps.get(inst.family, ""),
            )
        log.info(
            "OTLP push started",
            extra={
                "protocol": s.protocol,
                "endpoint": s.endpoint,
                "interval": s.interval,
                "headers": sorted(s.headers),  # names only: values are often credentials
            },
        )

    def _callback(self, family: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, labels) for labels, value in self.source.rows(family)]

        return observe

    def stop(self, timeout: float = 1.0) -> None:
        """Final export, then shut down; bounded by `timeout` even if the collector hangs:
        past it, retries are cut short and the SDK's threads (daemon threads) are left."""
        provider, exporter = self._provider, self._exporter
        if provider is None or exporter is None:
            return
        self._provider = None
        done = threading.Event()

        def shutdown() -> None:
            try:
                provider.shutdown(timeout_millis=timeout * 1000)
            except Exception as err:
                log.debug("OTLP shutdown error", extra={"err": repr(err)})
            finally:
                done.set()

        threading.Thread(target=shutdown, name="zmq-exporter-otlp-stop", daemon=True).start()
        if not done.wait(timeout):
            # Aborts the SDK's retry backoff and closes its channel or session.
            try:
                exporter.inner.shutdown(timeout_millis=0)
            except Exception as err:
                log.debug("OTLP exporter shutdown error", extra={"err": repr(err)})
            if not done.wait(0.2):
                log.warning("OTLP shutdown timed out; last export abandoned")

    def collector(self) -> Collector:
        return _SelfCollector(self.stats)


class _SelfCollector(Collector):
    """`zmq_exporter_otlp_*` on /metrics: how the push is doing."""

    def __init__(self, stats: ExportStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        exports = Metric(
            "zmq_exporter_otlp_exports",
            "OTLP export calls by result (one per interval; SDK retries are inside one call).",
            "counter",
        )
        exports.add_sample("zmq_exporter_otlp_exports_total", {"result": "success"}, stats.success)
        exports.add_sample("zmq_exporter_otlp_exports_total", {"result": "failure"}, stats.failure)
        last = Metric(
            "zmq_exporter_otlp_last_success_timestamp_seconds",
            "Unix time of the last successful OTLP export (0: none yet).",
            "gauge",
        )
        last.add_sample(
            "zmq_exporter_otlp_last_success_timestamp_seconds", {}, stats.last_success_time
        )
        duration = Metric(
            "zmq_exporter_otlp_last_export_duration_seconds",
            "Duration of the last OTLP export call, retries included.",
            "gauge",
        )
        duration.add_sample(
            "zmq_exporter_otlp_last_export_duration_seconds", {}, stats.last_duration
        )
        yield exports
        yield last
        yield duration


def instrument_table() -> Sequence[tuple[str, str, str, str]]:
    """(OTel name, instrument kind, unit, Prometheus name), for the README and tests."""
    return [
        (
            i.otel_name,
            "ObservableCounter" if i.kind == "counter" else "ObservableGauge",
            i.unit,
            i.prometheus_name,
        )
        for i in INSTRUMENTS
    ]
