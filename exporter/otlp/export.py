"""The OTLP output: pushes the engine's state over OTLP (gRPC or HTTP/protobuf), beside the
web server, from the same rows as `/metrics`.

Each export takes one `Engine.snapshot()`; `request.MetricsBuilder` writes its serialized
`ExportMetricsServiceRequest`s (several when one would exceed `max_request_bytes`) and
`transport.send` sends each, with the specification's retries, within the time the export
has left. Settings are resolved once at startup (`exporter.config.otlp.resolve_otlp`, via
`check_otlp`). Nothing here uses an OpenTelemetry SDK: the requests are protobuf bytes
(`opentelemetry-proto`'s public classes write the fixed parts) and the transport is grpcio's
or urllib3's public API. They come with the `otlp` extra (`pip install
'zmq-exporter[otlp]'`), imported only when OTLP push is on.

A collector that is down or slow does not hurt: exports run on a thread of their own, never
on the event path, each bounded by the export deadline; cumulative temporality means nothing
is buffered while the collector is away (each export carries the current totals). A failing
push is logged once per state change (the reason of the last failed attempt).

At shutdown the final export gets `shutdown_timeout` (default 2 s), its retries included: a
periodic export waiting to retry is cut short and the final one, with the latest state,
is sent; it retries while the receiver asks it to and the budget lasts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector

from exporter.config import ConfigError, Settings
from exporter.config.otlp import OtlpSettings, resolve_otlp
from exporter.core import metrics
from exporter.core.state import EngineSnapshot
from exporter.render.prometheus import one_sample

if TYPE_CHECKING:
    from exporter.otlp.request import MetricsBuilder
    from exporter.otlp.transport import Transport

log = logging.getLogger("zmq_exporter.otlp")

# Seconds stop() waits past the budget for the export thread before leaving it.
STOP_GRACE = 0.5

EXTRA_HINT = (
    "OTLP push needs the otlp extra (grpcio, urllib3, opentelemetry-proto): "
    "pip install 'zmq-exporter[otlp]'"
)


def _modules() -> tuple[type[MetricsBuilder], Callable[[OtlpSettings], Transport]]:
    """The builder and transport factory; a clear message when the extra is missing."""
    try:
        from exporter.otlp.request import MetricsBuilder
        from exporter.otlp.transport import make_transport
    except ImportError as err:
        raise RuntimeError(f"{EXTRA_HINT} ({err})") from None
    return MetricsBuilder, make_transport


class ExportStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = 0
        self.failure = 0
        self.last_success_time = 0.0
        self.last_duration = 0.0
        self.failing: bool | None = None  # None: no export yet
        self.last_requests = 0  # requests the last export sent (a large export: several)
        self.rejected_points = 0  # partial successes: data points receivers rejected

    def reject(self, points: int, message: str, endpoint: str) -> None:
        """A partial success: counted, and logged (each one: the receiver dropped data)."""
        with self._lock:
            self.rejected_points += points
            total = self.rejected_points
        log.warning(
            "OTLP receiver rejected part of an export",
            extra={
                "endpoint": endpoint,
                "rejected_points": points,
                "rejected_points_total": total,
                "err": message,
            },
        )

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


def check_otlp(settings: Settings, env: Mapping[str, str] | None = None) -> OtlpSettings | None:
    """Resolve the OTLP settings (the `otlp:` section and the OTEL_* environment) once at
    startup and for --config.check, log what is ignored, and try making the transport (the
    extra installed, the certificate files readable); every problem becomes a one-line
    `ConfigError`. None when OTLP is off. The daemon is handed the result."""
    warnings: list[str] = []
    otlp = resolve_otlp(settings.otlp, os.environ if env is None else env, warnings, settings.file)
    for message in warnings:
        log.warning(message)
    if otlp is None:
        return None
    try:
        _, make_transport = _modules()
        transport = make_transport(otlp)
    except Exception as err:  # e.g. an unreadable OTEL_EXPORTER_OTLP_CERTIFICATE
        raise ConfigError("OTLP exporter", None, (), f"cannot be created: {err}") from None
    transport.close()
    return otlp


class OtlpOutput:
    """The OTLP side of the daemon: start after the engine, stop before it. One thread
    exports every `interval`, each export bounded by `export_deadline`; `stop` makes a
    final export, bounded by `shutdown_timeout`."""

    def __init__(
        self,
        settings: OtlpSettings,
        snapshot: Callable[[], EngineSnapshot],
        build: Mapping[str, str],
        extra: Sequence[Collector] = (),
    ) -> None:
        builder_class, self._make_transport = _modules()
        self.settings = settings
        self.stats = ExportStats()
        self.builder = builder_class(
            settings.resource, build, extra, max_request_bytes=settings.max_request_bytes
        )
        self._snapshot = snapshot
        self._transport: Transport | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._final_deadline: float | None = None  # monotonic; set by stop()
        self.last_reason = ""  # why the last failed export failed

    def start(self) -> None:
        s = self.settings
        self._transport = self._make_transport(s)
        self._thread = threading.Thread(target=self._run, name="zmq-exporter-otlp", daemon=True)
        self._thread.start()
        log.info(
            "OTLP push started",
            extra={
                "protocol": s.protocol,
                "endpoint": s.endpoint,
                "interval": s.interval,
                "timeout": s.export_deadline,
                "shutdown_timeout": s.shutdown_timeout,
                "max_request_bytes": s.max_request_bytes,
                "headers": sorted(s.headers),  # names only: values are often credentials
            },
        )

    def _run(self) -> None:
        while not self._stopping.wait(self.settings.interval):
            self.export_once(interrupt=self._stopping)
        self.export_once(final=True)  # bounded by stop()'s budget

    def export_once(self, interrupt: threading.Event | None = None, final: bool = False) -> bool:
        """One export of the current state; counted and logged, never raises. A periodic
        export ends at a wait for a retry when `interrupt` is set; the `final` one has the
        shutdown budget instead of the export deadline."""
        from exporter.otlp.transport import send

        transport = self._transport
        if transport is None:
            return False
        started = time.monotonic()
        own = started + self.settings.export_deadline

        def deadline() -> float:
            final_deadline = self._final_deadline
            if final_deadline is None:
                return own
            return final_deadline if final else min(own, final_deadline)

        reason = ""
        sent = failed = 0
        try:
            requests = self.builder.encode_requests(self._snapshot())
            for number, payload in enumerate(requests, 1):
                if deadline() <= time.monotonic():
                    failed += len(requests) - sent
                    reason = f"deadline passed before request {number} of {len(requests)}"
                    break
                sent += 1
                # A request that fails does not stop the others: each carries current
                # cumulative totals of its own series, useful without the rest.
                result = send(transport, payload, deadline, None if final else interrupt)
                if result.rejected or result.message:
                    # The receiver's number, bounded by what it could have rejected: a
                    # counter never goes down, and each point took bytes of the request.
                    rejected = min(max(result.rejected, 0), len(payload))
                    self.stats.reject(rejected, result.message, self.settings.endpoint)
                if not result.ok:
                    failed += 1
                    reason = result.reason
                    log.debug("OTLP request failed", extra={"err": reason})
            ok = failed == 0
        except Exception as err:  # the thread must go on whatever one export does
            ok = False
            reason = repr(err)
        if not ok:
            self.last_reason = reason
        self.stats.record(ok, time.monotonic() - started, reason, self.settings.endpoint, sent)
        return ok

    def stop(self, timeout: float | None = None) -> None:
        """Final export, then close; bounded by `timeout` (default: the settings'
        `shutdown_timeout`) even if the collector hangs: past it (and a short grace) the
        connection is closed, which ends a gRPC call in flight; an HTTP request stuck in a
        read is left to its (daemon) thread."""
        thread, transport = self._thread, self._transport
        if thread is None or transport is None:
            return
        budget = self.settings.shutdown_timeout if timeout is None else timeout
        self._thread = None
        self._final_deadline = time.monotonic() + budget
        self._stopping.set()
        thread.join(budget + STOP_GRACE)
        alive = thread.is_alive()
        self._transport = None  # an export not yet begun is not begun any more
        try:
            transport.close()
        except Exception as err:
            log.debug("OTLP transport close error", extra={"err": repr(err)})
        if alive:
            thread.join(0.2)
            if thread.is_alive():
                log.warning(
                    "OTLP shutdown budget spent; last export abandoned",
                    extra={"shutdown_timeout": budget},
                )
        elif self.stats.failing:
            log.warning(
                "OTLP final export failed",
                extra={"endpoint": self.settings.endpoint, "err": self.last_reason},
            )

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
        yield one_sample(metrics.OTLP_POINTS_REJECTED, stats.rejected_points)
