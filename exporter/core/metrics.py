"""The metrics table: every family the exporter serves on /metrics or pushes over OTLP,
defined once. /metrics (`exporter.render`, `exporter.web.app`, `exporter.daemon`), the OTLP
instruments, the config's series estimate (`exporter.config.cardinality`), the reserved
label names and the docs' tables (`python -m exporter.core.metrics --markdown`) all read
it; tests/core/test_metrics_table.py compares it with the docs and with a real scrape.

Plain data: it imports only `exporter.core.events`, so the config and tools can read it
without zmq, prometheus_client or the engine.

Public names:
- `Family`: one family: Prometheus name, type, unit, help, labels, OTel instrument, and
  for socket families the event that feeds it and when its series first exist.
- One constant per family (`CONNECTED`, ..., `RELAY_STATE_AGE`), and the groups
  `SOCKET_FAMILIES` (in /metrics order), `CONNECTION_FAMILIES` (per endpoint, from the
  connection sampler; `CONNECTION_FAMILIES_ALWAYS`: those served without a tcp
  connection), `ENGINE_FAMILIES`, `RELOAD_FAMILIES`, `LOG_FAMILIES`, `WEB_FAMILIES`,
  `SAMPLER_FAMILIES`, `OTLP_FAMILIES`, `PROBE_FAMILIES`, `RELAY_FAMILIES`.
- `FAMILIES`: the table, every family of every group, in the docs' order, checked by
  `check_table` at import. `DAEMON_FAMILIES`: those on every daemon's /metrics (not the
  groups of `OWN_TABLE_GROUPS`).
- `PUSHED`: the families pushed over OTLP, in instrument order (`otel_name`, `otel_unit`).
- `EVENT_COUNTERS`: counted event -> its socket family.
- `SOCKET_LABELS`, `EXTRA_LABELS`, `PEER_LABEL`, `RESERVED_LABELS`: label names.
- `INITIAL_RULES`, `initial_counters(role)`, `initial_series(role)`: the series that
  exist before any event.
- `markdown(table)`: the docs' tables (`TABLES`: metrics, otel, probe, relay);
  `python -m exporter.core.metrics --markdown [TABLE]` prints one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from exporter.core.endpoints import Role
from exporter.core.events import ERRNO_EVENTS, HANDSHAKE_REASONS, Event

Type = Literal["counter", "gauge", "histogram"]
# socket: one set of series per configured socket; the others are the exporter's own.
# connection: per configured endpoint, from the connection sampler
# (exporter/connections/sampler.py);
# sampler: the sampler's own.
Group = Literal[
    "socket",
    "connection",
    "build",
    "engine",
    "reload",
    "log",
    "web",
    "otlp",
    "sampler",
    "probe",
    "relay",
    "message",
]
# When a socket family's series first exist. Before their first event they are at 0, so
# that rate() and increase() see that event (client_golang #296).
Initial = Literal["bind", "connect", "endpoint", "socket", "event"]
INITIAL_RULES: dict[Initial, str] = {
    "bind": "start, every bind endpoint",
    "connect": "start, every connect endpoint",
    "endpoint": "start, every endpoint",
    "socket": "start, every socket",
    "event": "first event",
}


@dataclass(frozen=True)
class Family:
    name: str  # as queried: a counter ends in `_total`, a histogram is its base name
    type: Type
    help: str  # HELP on /metrics; description of the OTel instrument
    group: Group
    # Label names. Socket and connection families: those beyond `socket`, `endpoint`
    # (`SOCKET_LABELS`) and the configured labels.
    labels: tuple[str, ...] = ()
    # Labels a mode of the config adds (connection families: `peer` with per_peer).
    optional_labels: tuple[str, ...] = ()
    series_from: str = ""  # docs/metrics.md's "series from" column, where no `initial` rule fits
    unit: str | None = None  # base unit, the name's suffix (`seconds`); None: a count
    otel_name: str | None = None  # the OTel instrument pushed over OTLP; None: not pushed
    otel_unit: str = ""  # UCUM; annotations in braces add no suffix in translation
    note: str = ""  # what docs/metrics.md's meaning column adds to `help`
    # Socket families only:
    event: Event | None = None  # a counter of one event: the event counted
    source: str = ""  # docs/metrics.md's "libzmq event" column: what feeds it
    initial: Initial = "event"
    initial_rows: int = 1  # label sets each endpoint (or socket) has from start
    per_endpoint: bool = True  # carries `endpoint` (False: one row set per socket)
    # Self-metrics only:
    values: tuple[str, ...] = ()  # the closed set of values of its one label, all from start
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds (+Inf added)

    @property
    def pushed(self) -> bool:
        return self.otel_name is not None

    @property
    def metric_name(self) -> str:
        """The family's name as prometheus_client's `Metric` takes it (no `_total`)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name

    @property
    def label_names(self) -> tuple[str, ...]:
        """Every label name, configured labels aside."""
        if self.group not in ("socket", "connection"):
            return self.labels
        own = SOCKET_LABELS if self.per_endpoint else SOCKET_LABELS[:1]
        return (*own, *self.labels, *self.optional_labels)

    @property
    def series(self) -> int:
        """Series of a self-metric family (socket families: `initial_series`)."""
        if self.type == "histogram":
            return len(self.buckets) + 3  # +Inf, _sum, _count
        return max(1, len(self.values))

    def initial_roles(self) -> tuple[Role | None, ...]:
        """The endpoint roles (None: the socket itself) that have this family's series
        from start."""
        return _INITIAL_ROLES[self.initial]


_INITIAL_ROLES: dict[Initial, tuple[Role | None, ...]] = {
    "bind": ("bind",),
    "connect": ("connect",),
    "endpoint": ("bind", "connect"),
    "socket": (None,),
    "event": (),
}


def _event(
    event: Event,
    name: str,
    otel: str,
    otel_unit: str,
    initial: Initial,
    help_text: str,
    note: str = "",
) -> Family:
    """The counter of one monitor event; errno events carry `errno` (`ERRNO_EVENTS`)."""
    errno = event in ERRNO_EVENTS
    return Family(
        name,
        "counter",
        help_text,
        "socket",
        labels=("errno",) if errno else (),
        otel_name=otel,
        otel_unit=otel_unit,
        note=note,
        event=event,
        source=event.name,
        initial=initial,
    )


def _self(
    name: str,
    kind: Type,
    group: Group,
    help_text: str,
    otel: tuple[str, str] | None = None,
    *,
    labels: tuple[str, ...] = (),
    unit: str | None = None,
    note: str = "",
    values: tuple[str, ...] = (),
    buckets: tuple[float, ...] = (),
) -> Family:
    """One of the exporter's own families; `otel`: (instrument name, unit) if pushed."""
    otel_name, otel_unit = otel if otel is not None else (None, "")
    return Family(
        name,
        kind,
        help_text,
        group,
        labels=labels,
        unit=unit,
        otel_name=otel_name,
        otel_unit=otel_unit,
        note=note,
        values=values,
        buckets=buckets,
    )


# -- socket families, in /metrics order --------------------------------------------------

CONNECTED = _event(
    Event.CONNECTED,
    "zmq_connected_total",
    "zmq.connected",
    "{connection}",
    "connect",
    "Connections established by connect().",
)
CONNECT_DELAYED = _event(
    Event.CONNECT_DELAYED,
    "zmq_connect_delayed_total",
    "zmq.connect_delayed",
    "{attempt}",
    "connect",
    "Asynchronous connects in progress (EINPROGRESS).",
)
CONNECT_RETRIED = _event(
    Event.CONNECT_RETRIED,
    "zmq_connect_retried_total",
    "zmq.connect_retried",
    "{attempt}",
    "connect",
    "Reconnect attempts scheduled after a failed or lost connection.",
)
# Named for the outcome of bind(), like `zmq_bind_failed_total` beside it and the
# `zmq_handshake_{succeeded,failed}_total` pair. It was `zmq_listening_total` (CHANGELOG.md,
# 0.1.0): its OpenMetrics family `zmq_listening` collided with the gauge's.
BIND_SUCCEEDED = _event(
    Event.LISTENING,
    "zmq_bind_succeeded_total",
    "zmq.bind_succeeded",
    "{bind}",
    "bind",
    "Successful binds (a listener was opened).",
)
BIND_FAILED = _event(
    Event.BIND_FAILED,
    "zmq_bind_failed_total",
    "zmq.bind_failed",
    "{attempt}",
    "event",
    "Failed bind() attempts.",
    "`errno`: `EADDRINUSE`, `EACCES`, ...",
)
ACCEPTED = _event(
    Event.ACCEPTED,
    "zmq_accepted_total",
    "zmq.accepted",
    "{connection}",
    "bind",
    "Connections accepted on a bound endpoint.",
)
ACCEPT_FAILED = _event(
    Event.ACCEPT_FAILED,
    "zmq_accept_failed_total",
    "zmq.accept_failed",
    "{attempt}",
    "event",
    "Failed accept() calls.",
)
CLOSED = _event(
    Event.CLOSED,
    "zmq_closed_total",
    "zmq.closed",
    "{fd}",
    "endpoint",
    "Closed fds of listeners and of failed connect attempts (a connection that ends is "
    "counted in zmq_disconnected_total, not here).",
    "libzmq emits CLOSED only from listeners and connecters, never for an established "
    "connection. A failed bind() emits CLOSED with an empty endpoint, then BIND_FAILED: "
    "that CLOSED is counted under the endpoint of the BIND_FAILED.",
)
CLOSE_FAILED = _event(
    Event.CLOSE_FAILED,
    "zmq_close_failed_total",
    "zmq.close_failed",
    "{attempt}",
    "event",
    "Failed close() calls.",
)
DISCONNECTED = _event(
    Event.DISCONNECTED,
    "zmq_disconnected_total",
    "zmq.disconnected",
    "{connection}",
    "endpoint",
    "Connections that ended (one TCP/IPC connection, not the whole socket).",
)
MONITOR_STOPPED = _event(
    Event.MONITOR_STOPPED,
    "zmq_monitor_stopped_total",
    "zmq.monitor_stopped",
    "{monitor}",
    "event",
    "Monitors stopped (the socket was closed by its owner).",
    'Endpoint `""` (the whole socket).',
)
HANDSHAKE_SUCCEEDED = _event(
    Event.HANDSHAKE_SUCCEEDED,
    "zmq_handshake_succeeded_total",
    "zmq.handshake_succeeded",
    "{handshake}",
    "endpoint",
    "ZMTP handshakes completed (security mechanism included).",
)
HANDSHAKE_FAILED = Family(
    "zmq_handshake_failed_total",
    "counter",
    "ZMTP handshakes that failed, by reason (no_detail: errno, protocol: ZMTP error, "
    "auth: ZAP status) and decoded error.",
    "socket",
    labels=("reason", "error"),
    otel_name="zmq.handshake_failed",
    otel_unit="{handshake}",
    note="`error` is the errno name (`EPIPE`), the ZMTP error (`zmtp_cryptographic`, "
    '`zmtp_mechanism_mismatch`, ...) or the ZAP status (`400`); `error="none"` rows '
    "hold 0 until a reason first happens.",
    source="HANDSHAKE_FAILED_NO_DETAIL / _PROTOCOL / _AUTH",
    initial="endpoint",
    initial_rows=len(HANDSHAKE_REASONS),  # one `error="none"` row per reason
)
CONNECTIONS = Family(
    "zmq_connections",
    "gauge",
    "Live connections (fds) of the endpoint, as the kernel sees them.",
    "socket",
    otel_name="zmq.connections",
    otel_unit="{connection}",
    source="CONNECTED, ACCEPTED, DISCONNECTED",
    initial="endpoint",
)
CONNECTION_READY = Family(
    "zmq_connection_ready",
    "gauge",
    "1 while the connect endpoint's current connection has completed its ZMTP handshake "
    "and has not ended, else 0.",
    "socket",
    otel_name="zmq.connection_ready",
    otel_unit="{connection}",
    note="A connect endpoint has at most one connection at a time (libzmq 4.3.5: one "
    "engine per session), so the events of that one connection decide it. Not served for "
    "bind endpoints (see Liveness).",
    source="CONNECTED (0), HANDSHAKE_SUCCEEDED (1), DISCONNECTED / HANDSHAKE_FAILED_* / "
    "MONITOR_STOPPED (0)",
    initial="connect",
)
LISTENING = Family(
    "zmq_listening",
    "gauge",
    "1 while the bound endpoint has an open listener, else 0.",
    "socket",
    otel_name="zmq.listening",
    otel_unit="{listener}",
    source="LISTENING / CLOSED of the listener fd / BIND_FAILED",
    initial="bind",
)
RECONNECT_INTERVAL = Family(
    "zmq_reconnect_interval_seconds",
    "gauge",
    "Interval libzmq chose for the last reconnect attempt.",
    "socket",
    unit="seconds",
    otel_name="zmq.reconnect_interval",
    otel_unit="s",
    source="CONNECT_RETRIED",
    initial="connect",
)
LAST_EVENT = Family(
    "zmq_last_event_timestamp_seconds",
    "gauge",
    "Unix time of the last monitor event of the endpoint (0: none yet).",
    "socket",
    unit="seconds",
    otel_name="zmq.last_event_timestamp",
    otel_unit="s",
    source="any",
    initial="endpoint",
)
UNKNOWN_EVENTS = Family(
    "zmq_unknown_events_total",
    "counter",
    "Monitor events with an id this exporter does not know.",
    "socket",
    labels=("event",),
    otel_name="zmq.unknown_events",
    otel_unit="{event}",
    note="Counted, never fatal.",
    source="ids this build does not know",
    per_endpoint=False,
)
SOCKET_INFO = Family(
    "zmq_socket_info",
    "gauge",
    "Configured sockets (value 1) and their type.",
    "socket",
    labels=("type",),
    otel_name="zmq.socket_info",
    initial="socket",
    per_endpoint=False,
)

SOCKET_FAMILIES: tuple[Family, ...] = (
    CONNECTED,
    CONNECT_DELAYED,
    CONNECT_RETRIED,
    BIND_SUCCEEDED,
    BIND_FAILED,
    ACCEPTED,
    ACCEPT_FAILED,
    CLOSED,
    CLOSE_FAILED,
    DISCONNECTED,
    MONITOR_STOPPED,
    HANDSHAKE_SUCCEEDED,
    HANDSHAKE_FAILED,
    CONNECTIONS,
    CONNECTION_READY,
    LISTENING,
    RECONNECT_INTERVAL,
    LAST_EVENT,
    UNKNOWN_EVENTS,
    SOCKET_INFO,
)

# -- connection families: per endpoint, from the kernel -----------------------------------
# Read by the connection sampler (exporter/connections/sampler.py) every
# `connections.sample_interval`
# through the connection table's pinned reads (docs/connections.md), never at scrape time.
# Served while `connections.metrics` is true, for every configured tcp and ipc endpoint.

PEER_LABEL = "peer"  # the connection families' label in per-peer mode
_TCP_ONLY = "a tcp connection of the endpoint, first sample"
_EVERY_ENDPOINT = "first sample, every tcp/ipc endpoint"
_PER_PEER = "With `connections.per_peer`: per `peer` too."


def _connection(
    name: str,
    help_text: str,
    otel: str,
    otel_unit: str,
    source: str,
    series_from: str,
    unit: str | None = None,
    note: str = "",
) -> Family:
    return Family(
        name,
        "gauge",
        help_text,
        "connection",
        optional_labels=(PEER_LABEL,),
        unit=unit,
        otel_name=otel,
        otel_unit=otel_unit,
        note=f"{note} {_PER_PEER}".strip(),
        source=source,
        series_from=series_from,
    )


CONNECTION_RTT_MAX = _connection(
    "zmq_connection_rtt_max_seconds",
    "Largest smoothed RTT among the endpoint's live tcp connections (TCP_INFO), as of the "
    "last sample.",
    "zmq.connection.rtt.max",
    "s",
    "kernel: TCP_INFO",
    _TCP_ONLY,
    unit="seconds",
    note="No sample while the endpoint has no tcp connection (0 would read as a perfect "
    "network); never for ipc.",
)
CONNECTION_RTT_AVG = _connection(
    "zmq_connection_rtt_avg_seconds",
    "Mean smoothed RTT of the endpoint's live tcp connections (TCP_INFO), as of the last sample.",
    "zmq.connection.rtt.avg",
    "s",
    "kernel: TCP_INFO",
    _TCP_ONLY,
    unit="seconds",
    note="No sample while the endpoint has no tcp connection; never for ipc.",
)
CONNECTIONS_RETRANSMITTING = _connection(
    "zmq_connections_retransmitting",
    "Live connections retransmitting as of the last sample: an RTO retransmission "
    "outstanding, or in congestion state Recovery or Loss.",
    "zmq.connections.retransmitting",
    "{connection}",
    "kernel: TCP_INFO",
    _EVERY_ENDPOINT,
    note="Always 0 for ipc.",
)
CONNECTION_SEND_QUEUE = _connection(
    "zmq_connection_send_queue_bytes",
    "Bytes in the kernel send queues of the endpoint's live connections, summed (SIOCOUTQ), "
    "as of the last sample.",
    "zmq.connection.send_queue",
    "By",
    "kernel: SIOCOUTQ",
    _EVERY_ENDPOINT,
    unit="bytes",
    note="tcp: unacknowledged plus unsent bytes (ss's Send-Q); ipc: kernel memory charged "
    "(more than the payload).",
)
CONNECTION_RECV_QUEUE = _connection(
    "zmq_connection_recv_queue_bytes",
    "Bytes in the kernel receive queues of the endpoint's live connections, summed "
    "(SIOCINQ), as of the last sample.",
    "zmq.connection.recv_queue",
    "By",
    "kernel: SIOCINQ",
    _EVERY_ENDPOINT,
    unit="bytes",
)
CONNECTION_SEND_QUEUE_MAX = _connection(
    "zmq_connection_send_queue_max_bytes",
    "Largest kernel send queue among the endpoint's live connections (SIOCOUTQ), as of the "
    "last sample.",
    "zmq.connection.send_queue.max",
    "By",
    "kernel: SIOCOUTQ",
    _EVERY_ENDPOINT,
    unit="bytes",
)
# In the order of exporter.connections.kernel.EndpointConnections' fields after `connections`.
CONNECTION_FAMILIES: tuple[Family, ...] = (
    CONNECTION_RTT_MAX,
    CONNECTION_RTT_AVG,
    CONNECTIONS_RETRANSMITTING,
    CONNECTION_SEND_QUEUE,
    CONNECTION_RECV_QUEUE,
    CONNECTION_SEND_QUEUE_MAX,
)
# Without a tcp connection an endpoint has only these (the RTT families have no sample).
CONNECTION_FAMILIES_ALWAYS: tuple[Family, ...] = CONNECTION_FAMILIES[2:]

# -- the exporter's own ------------------------------------------------------------------

BUILD_INFO = _self(
    "zmq_exporter_build_info",
    "gauge",
    "build",
    "Build of the exporter (value 1).",
    ("zmq_exporter.build_info", ""),
    labels=("version", "pyzmq_version", "libzmq_version", "python_version"),
)
EVENTS_PROCESSED = _self(
    "zmq_exporter_events_processed_total",
    "counter",
    "engine",
    "Monitor events read and reduced.",
    ("zmq_exporter.events_processed", "{event}"),
)
READER_BACKLOG = _self(
    "zmq_exporter_reader_backlog_events",
    "gauge",
    "engine",
    "Events the reader found queued in the current or last burst.",
    ("zmq_exporter.reader_backlog_events", "{event}"),
)
READER_BACKLOG_MAX = _self(
    "zmq_exporter_reader_backlog_max_events",
    "gauge",
    "engine",
    "Largest backlog the reader has found since start.",
    ("zmq_exporter.reader_backlog_max_events", "{event}"),
)
READER_WAKEUPS = _self(
    "zmq_exporter_reader_wakeups_total",
    "counter",
    "engine",
    "Reader passes over ready monitors.",
    ("zmq_exporter.reader_wakeups", "{wakeup}"),
)
MESSAGES_DROPPED = _self(
    "zmq_exporter_inbound_messages_dropped_total",
    "counter",
    "engine",
    "Application messages that arrived on exporter sockets and were dropped.",
    ("zmq_exporter.inbound_messages_dropped", "{message}"),
)
ATTACH_FAILURES = _self(
    "zmq_exporter_attach_failures_total",
    "counter",
    "engine",
    "bind()/connect() calls that raised and were scheduled for retry.",
    ("zmq_exporter.attach_failures", "{attempt}"),
    note="Retried with backoff.",
)
ENGINE_ERRORS = _self(
    "zmq_exporter_engine_errors_total",
    "counter",
    "engine",
    "Unexpected errors caught while serving a socket; the engine went on.",
    ("zmq_exporter.engine_errors", "{error}"),
    note="Logged once per socket.",
)
LISTENER_SHEDS = _self(
    "zmq_exporter_listener_sheds_total",
    "counter",
    "engine",
    "Times a listener was unbound because an accept failed for want of file descriptors "
    "or memory; it is bound again once descriptors are free.",
    ("zmq_exporter.listener_sheds", "{shed}"),
    note="Library mode cannot shed (the sockets are the application's).",
)
MEMORY_TRIMS = _self(
    "zmq_exporter_memory_trims_total",
    "counter",
    "engine",
    "Times the reader gave freed memory back to the kernel (malloc_trim) after a large "
    "burst of monitor events.",
    ("zmq_exporter.memory_trims", "{trim}"),
    note="At most one every 10 s; glibc only.",
)
SOCKETS = _self(
    "zmq_exporter_sockets",
    "gauge",
    "engine",
    "Sockets configured and monitored.",
    ("zmq_exporter.sockets", "{socket}"),
)
RELOAD_SUCCESSFUL = _self(
    "zmq_exporter_config_last_reload_successful",
    "gauge",
    "reload",
    "Whether the last configuration reload attempt was successful.",
    ("zmq_exporter.config_last_reload_successful", ""),
)
RELOAD_SUCCESS_TIME = _self(
    "zmq_exporter_config_last_reload_success_timestamp_seconds",
    "gauge",
    "reload",
    "Timestamp of the last successful configuration reload.",
    ("zmq_exporter.config_last_reload_success_timestamp", "s"),
    unit="seconds",
)
# The log writer's own (exporter/logs.py): lines go through a bounded queue to one writer
# thread, so a stderr nobody drains never stalls the engine.
LOG_MESSAGES_DROPPED = _self(
    "zmq_exporter_log_messages_dropped_total",
    "counter",
    "log",
    "Log lines dropped instead of waiting for stderr: the log queue was full, or stderr "
    "refused them.",
    note="Logging never blocks the engine; a stderr nobody reads shows here.",
)
SCRAPES = _self(
    "zmq_exporter_scrapes_total",
    "counter",
    "web",
    "Scrapes of the metrics endpoint served (answered 200).",
)
SCRAPE_DURATION = _self(
    "zmq_exporter_scrape_duration_seconds",
    "histogram",
    "web",
    "Time to collect and encode one scrape.",
    unit="seconds",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SERIES = _self(
    "zmq_exporter_series",
    "gauge",
    "web",
    "Samples (series) in the last scrape served, all included.",
)
HTTP_REJECTED = _self(
    "zmq_exporter_http_requests_rejected_total",
    "counter",
    "web",
    "HTTP requests refused before being served, by reason.",
    labels=("reason",),
    values=(
        "unauthorized",  # 401: no, wrong or unknown credentials
        "rate_limit",  # 429: the web config's rate_limit
        "auth_rate",  # 429: this address has no password check left (webauth.AddressThrottle)
        "auth_busy",  # 503: no bcrypt slot in time, or the password-check lane is full
        "too_many_scrapes",
        "too_many_connections",
        "too_large",
    ),
)
OTLP_EXPORTS = _self(
    "zmq_exporter_otlp_exports_total",
    "counter",
    "otlp",
    "OTLP export calls by result (one per interval; SDK retries are inside one call).",
    labels=("result",),
    values=("success", "failure"),
)
OTLP_LAST_SUCCESS = _self(
    "zmq_exporter_otlp_last_success_timestamp_seconds",
    "gauge",
    "otlp",
    "Unix time of the last successful OTLP export (0: none yet).",
    unit="seconds",
)
OTLP_LAST_DURATION = _self(
    "zmq_exporter_otlp_last_export_duration_seconds",
    "gauge",
    "otlp",
    "Duration of the last OTLP export call, retries included.",
    unit="seconds",
)
OTLP_POINTS_REJECTED = _self(
    "zmq_exporter_otlp_points_rejected_total",
    "counter",
    "otlp",
    "Data points the OTLP receiver rejected from requests it otherwise accepted (the "
    "rejected_data_points of its partial-success responses).",
    note="The export still counts as a success; each partial success is logged with the "
    "receiver's message.",
)

# The connection sampler's own (exporter/connections/sampler.py); the reads refused are the
# connection table's, API and status page reads included.
SAMPLE_DURATION = _self(
    "zmq_exporter_connection_sample_duration_seconds",
    "gauge",
    "sampler",
    "Time the last connection sample took (reading every live connection from the kernel).",
    unit="seconds",
    note="Served while `connections.metrics` is true. The next sample starts at least 20 "
    "times this later.",
)
SAMPLE_AGE = _self(
    "zmq_exporter_connection_sample_age_seconds",
    "gauge",
    "sampler",
    "Time since the last connection sample finished, at scrape time (since the sampler "
    "started, before its first).",
    unit="seconds",
    note="Served while `connections.metrics` is true; a sampler that froze shows here.",
)
SAMPLE_ERRORS = _self(
    "zmq_exporter_connection_sample_errors_total",
    "counter",
    "sampler",
    "Connection samples that failed with an unexpected error; the sampler went on.",
    note="Served while `connections.metrics` is true; logged once per kind of error.",
)
PEERS_SUPPRESSED = _self(
    "zmq_exporter_connection_peers_suppressed",
    "gauge",
    "sampler",
    'Peers aggregated under peer="other" in the last sample (more than '
    "connections.max_peers_per_endpoint on an endpoint), summed over endpoints.",
    note="Served while `connections.metrics` is true; 0 unless `connections.per_peer`.",
)
READS_GONE = _self(
    "zmq_exporter_connection_reads_gone_total",
    "counter",
    "sampler",
    "Connection reads refused because the fd was no longer the connection its event named, "
    "by reason (sampler, /api/v1/connections and status page reads).",
    labels=("reason",),
    values=(
        "closed",
        "not_socket",
        "wrong_kind",
        "not_connected",
        "address_mismatch",
        "reused",
        "error",
    ),
)
SAMPLER_FAMILIES: tuple[Family, ...] = (
    SAMPLE_DURATION,
    SAMPLE_AGE,
    SAMPLE_ERRORS,
    PEERS_SUPPRESSED,
    READS_GONE,
)

ENGINE_FAMILIES: tuple[Family, ...] = (
    EVENTS_PROCESSED,
    READER_BACKLOG,
    READER_BACKLOG_MAX,
    READER_WAKEUPS,
    MESSAGES_DROPPED,
    ATTACH_FAILURES,
    ENGINE_ERRORS,
    LISTENER_SHEDS,
    MEMORY_TRIMS,
    SOCKETS,
)
RELOAD_FAMILIES: tuple[Family, ...] = (RELOAD_SUCCESSFUL, RELOAD_SUCCESS_TIME)
LOG_FAMILIES: tuple[Family, ...] = (LOG_MESSAGES_DROPPED,)
WEB_FAMILIES: tuple[Family, ...] = (SCRAPES, SCRAPE_DURATION, SERIES, HTTP_REJECTED)
OTLP_FAMILIES: tuple[Family, ...] = (
    OTLP_EXPORTS,
    OTLP_LAST_SUCCESS,
    OTLP_LAST_DURATION,
    OTLP_POINTS_REJECTED,
)

EVENT_COUNTERS: dict[Event, Family] = {f.event: f for f in SOCKET_FAMILIES if f.event}

# Label names: every socket series has `socket`, endpoint series `endpoint`, and the rows
# add the extra ones; Prometheus adds `instance` and `job` to every scraped series.
SOCKET_LABELS = ("socket", "endpoint")
EXTRA_LABELS = frozenset(label for f in SOCKET_FAMILIES for label in f.labels)
TARGET_LABELS = ("instance", "job")
# Configured labels may not use these (they would shadow the exporter's own).
RESERVED_LABELS = frozenset({*SOCKET_LABELS, *EXTRA_LABELS, *TARGET_LABELS, PEER_LABEL})


def initial_counters(role: Role) -> tuple[Event, ...]:
    """The events counted at 0 for every configured endpoint of `role`, from start."""
    return tuple(
        f.event for f in SOCKET_FAMILIES if f.event is not None and role in f.initial_roles()
    )


def initial_series(role: Role | None) -> int:
    """Series every configured endpoint of `role` (None: every socket) has from start."""
    return sum(f.initial_rows for f in SOCKET_FAMILIES if role in f.initial_roles())


# -- /probe ------------------------------------------------------------------------------
# Rendered per probe request by exporter/prober/render.py, never on /metrics (not in
# DAEMON_FAMILIES). docs/probe.md's table is `python -m exporter.core.metrics --markdown
# probe` (tests/probe/test_probe_docs.py).

PROBE_SUCCESS = _self("probe_success", "gauge", "probe", "1 if the probe succeeded, else 0.")
PROBE_DURATION = _self(
    "probe_duration_seconds",
    "gauge",
    "probe",
    "Time the whole probe took.",
    unit="seconds",
)
PROBE_DNS_LOOKUP = _self(
    "probe_dns_lookup_time_seconds",
    "gauge",
    "probe",
    "Time the DNS lookup of the target's host took.",
    unit="seconds",
    note="tcp:// targets only.",
)
PROBE_CONNECT = _self(
    "probe_zmtp_connect_duration_seconds",
    "gauge",
    "probe",
    "Time the raw TCP (or IPC) connect took.",
    unit="seconds",
)
PROBE_HANDSHAKE = _self(
    "probe_zmtp_handshake_duration_seconds",
    "gauge",
    "probe",
    "Time the ZMTP handshake (security included) took: NULL and PLAIN, from the connection "
    "being established to the peer's READY (its greeting included); CURVE, a libzmq "
    "connect and handshake.",
    unit="seconds",
)
PROBE_ZMTP_INFO = _self(
    "probe_zmtp_info",
    "gauge",
    "probe",
    "The peer's ZMTP greeting (value 1).",
    labels=("version", "mechanism", "as_server"),
    note="Present once a greeting was read.",
)
PROBE_FAILURE_INFO = _self(
    "probe_zmtp_failure_info",
    "gauge",
    "probe",
    "Why the probe failed (value 1); absent when it succeeded.",
    labels=("reason",),
    values=(
        "dns",
        "connect_refused",
        "connect_timeout",
        "not_zmtp",
        "greeting_timeout",
        "mechanism_mismatch",
        "auth",
        "protocol",
        "handshake_timeout",
    ),
)
PROBE_FAMILIES: tuple[Family, ...] = (
    PROBE_SUCCESS,
    PROBE_DURATION,
    PROBE_DNS_LOOKUP,
    PROBE_CONNECT,
    PROBE_HANDSHAKE,
    PROBE_ZMTP_INFO,
    PROBE_FAILURE_INFO,
)

# -- relay -------------------------------------------------------------------------------
# Served by a daemon with a `relay:` section (exporter/relay/server.py), so not in
# DAEMON_FAMILIES (docs/metrics.md's table and tests/core/test_metrics_table.py cover a daemon
# without one). docs/relay.md's table is `python -m exporter.core.metrics --markdown relay`.

RELAY_PROCESSES = _self(
    "zmq_exporter_relay_processes",
    "gauge",
    "relay",
    "Relay sender processes connected (their state is live).",
)
RELAY_SOCKETS = _self(
    "zmq_exporter_relay_sockets",
    "gauge",
    "relay",
    "Relayed sockets held, of connected processes and of those not yet expired.",
)
RELAY_MESSAGES_RECEIVED = _self(
    "zmq_exporter_relay_messages_received_total",
    "counter",
    "relay",
    "Relay messages received and accepted.",
)
RELAY_MESSAGES_REJECTED = _self(
    "zmq_exporter_relay_messages_rejected_total",
    "counter",
    "relay",
    "Relay messages (or connections) dropped, by reason.",
    labels=("reason",),
    values=(
        "malformed",
        "version",
        "too_large",
        "invalid",
        "max_processes",
        "max_sockets",
        "handshake",
        "identity",
        "backwards",
        "max_series",
        "unauthorized",
    ),
)
# The relay's series budget (`RelayLimits.max_series`) is not a config value: limits.max_series
# less the config's own estimate, recomputed at each reload; both sides are served so
# that the headroom can be watched (and alerted on) before states are refused.
RELAY_SERIES = _self(
    "zmq_exporter_relay_series",
    "gauge",
    "relay",
    "Relayed series held (of connected processes and of those not yet expired), as counted "
    "against the relay's series budget.",
    note="A state that would take it past `zmq_exporter_relay_series_limit` is refused "
    '(`reason="max_series"`).',
)
RELAY_SERIES_LIMIT = _self(
    "zmq_exporter_relay_series_limit",
    "gauge",
    "relay",
    "The relay's series budget: limits.max_series less the config's own estimate and the "
    "relay's self-metrics.",
    note="Each process also has `relay.max_series_per_process`.",
)
RELAY_STATE_AGE = _self(
    "zmq_exporter_relay_state_age_seconds",
    "gauge",
    "relay",
    "Time since the least recently heard connected sender's last message.",
    unit="seconds",
)
RELAY_FAMILIES: tuple[Family, ...] = (
    RELAY_PROCESSES,
    RELAY_SOCKETS,
    RELAY_MESSAGES_RECEIVED,
    RELAY_MESSAGES_REJECTED,
    RELAY_SERIES,
    RELAY_SERIES_LIMIT,
    RELAY_STATE_AGE,
)


# -- message counts (library mode) -----------------------------------------------------------
# Counted inside an application by `exporter.instrument(sock, name, messages=True)`
# (exporter/messages/) and served on its registry, its meter provider and, relayed, by
# the sidecar; the daemon cannot see messages, so not in DAEMON_FAMILIES. One series per socket
# (`socket` and the configured labels, no `endpoint`), each from the instrument() call.
# docs/messages.md is `python -m exporter.core.metrics --markdown messages`.


def _message(
    name: str, help_text: str, otel: str, otel_unit: str, unit: str | None = None, note: str = ""
) -> Family:
    return Family(
        name,
        "counter",
        help_text,
        "message",
        unit=unit,
        otel_name=otel,
        otel_unit=otel_unit,
        note=note,
        series_from="instrument(..., messages=True)",
        per_endpoint=False,
    )


MESSAGES_SENT = _message(
    "zmq_messages_sent_total",
    "Whole messages the application sent on the socket (a multipart message is one).",
    "zmq.messages_sent",
    "{message}",
)
MESSAGES_RECEIVED = _message(
    "zmq_messages_received_total",
    "Whole messages the application received from the socket (a multipart message is one).",
    "zmq.messages_received",
    "{message}",
)
MESSAGE_BYTES_SENT = _message(
    "zmq_message_bytes_sent_total",
    "Payload bytes of every frame the application sent on the socket.",
    "zmq.message_bytes_sent",
    "{byte}",  # UCUM `By` would add a `_bytes` suffix in translation
    note="ZMTP framing and security overhead are not included.",
)
MESSAGE_BYTES_RECEIVED = _message(
    "zmq_message_bytes_received_total",
    "Payload bytes of every frame the application received from the socket.",
    "zmq.message_bytes_received",
    "{byte}",  # UCUM `By` would add a `_bytes` suffix in translation
    note="recv_into: the frame's size, also when the buffer truncated it.",
)
SEND_WOULD_BLOCK = _message(
    "zmq_send_would_block_total",
    "Sends that raised zmq.Again: NOBLOCK with the send queue full (HWM) or no peer, or "
    "SNDTIMEO expired.",
    "zmq.send_would_block",
    "{send}",
)
SEND_BLOCKED = _message(
    "zmq_send_blocked_seconds_total",
    "Time the application spent inside sends that could not complete at once (backpressure).",
    "zmq.send_blocked",
    "s",
    unit="seconds",
    note="zmq.asyncio: from the send call until its future completed.",
)
MESSAGE_FAMILIES: tuple[Family, ...] = (
    MESSAGES_SENT,
    MESSAGES_RECEIVED,
    MESSAGE_BYTES_SENT,
    MESSAGE_BYTES_RECEIVED,
    SEND_WOULD_BLOCK,
    SEND_BLOCKED,
)


# -- the table ---------------------------------------------------------------------------
# Every family, in the docs' order. A new group: its families and their tuple in a section
# above, the tuple here, its group in OWN_TABLE_GROUPS if not every daemon serves it, and
# its docs table in TABLES.

FAMILIES: tuple[Family, ...] = (
    *SOCKET_FAMILIES,
    *CONNECTION_FAMILIES,
    BUILD_INFO,
    *ENGINE_FAMILIES,
    *RELOAD_FAMILIES,
    *LOG_FAMILIES,
    *WEB_FAMILIES,
    *SAMPLER_FAMILIES,
    *OTLP_FAMILIES,
    *PROBE_FAMILIES,
    *RELAY_FAMILIES,
    *MESSAGE_FAMILIES,
)
# Groups not on every daemon's /metrics, each with a docs table of its own.
OWN_TABLE_GROUPS: frozenset[Group] = frozenset({"probe", "relay", "message"})
DAEMON_FAMILIES: tuple[Family, ...] = tuple(f for f in FAMILIES if f.group not in OWN_TABLE_GROUPS)
# Pushed over OTLP: what describes the sockets and the engine. The web server's and the
# OTLP push's own metrics describe the endpoints themselves and stay on /metrics.
PUSHED: tuple[Family, ...] = tuple(f for f in DAEMON_FAMILIES if f.pushed)
# An OTel instrument's slot is its family's index in PUSHED: by prometheus_client name
# (`metric_name`), and for each socket family (all are pushed), in SOCKET_FAMILIES order
# (the order of the socket rows). Library mode's instruments use them.
PUSHED_SLOT: dict[str, int] = {f.metric_name: n for n, f in enumerate(PUSHED)}
SOCKET_SLOTS: tuple[int, ...] = tuple(PUSHED.index(f) for f in SOCKET_FAMILIES)
# The daemon's OTLP instruments, in the order of an export's metrics: PUSHED (so the same
# slots), then the message families, which a daemon has from its relay's senders.
DAEMON_INSTRUMENTS: tuple[Family, ...] = (*PUSHED, *MESSAGE_FAMILIES)
DAEMON_INSTRUMENT_SLOT: dict[str, int] = {
    f.metric_name: n for n, f in enumerate(DAEMON_INSTRUMENTS)
}


class TableError(ValueError):
    """A family breaks a rule of the table."""


def check_table(families: Sequence[Family]) -> None:
    """Raises TableError unless every family keeps the table's rules: unique names (under
    both exposition formats) and OTel names, `_total` on counters only, the unit as the
    name's suffix, and no series at 0 before the first event for errno counters."""
    names = [f.name for f in families]
    _unique(names, "family name")
    _unique([f.otel_name for f in families if f.otel_name is not None], "OTel name")
    # No two families may share a name under either format: OpenMetrics names a counter's
    # family without `_total`, and the text format 0.0.4 a histogram's samples with
    # `_bucket`, `_sum`, `_count` (and prometheus_client adds `_created`).
    _unique([f.metric_name for f in families], "OpenMetrics family name")
    samples = {f.name: f for f in families}
    for f in families:
        for suffix in ("_total", "_created", "_bucket", "_sum", "_count", "_info"):
            other = samples.get(f.metric_name + suffix)
            if other is not None and other is not f:
                raise TableError(f"{f.name}: its samples would clash with {other.name}")
        if (f.type == "counter") != f.name.endswith("_total"):
            raise TableError(f"{f.name}: counters, and only counters, end in _total")
        if f.unit is not None and not f.metric_name.endswith("_" + f.unit):
            raise TableError(f"{f.name}: the name does not end in its unit {f.unit}")
        # A counter of an errno event has a series per errno seen: none before the first.
        if f.event in ERRNO_EVENTS and f.initial != "event":
            raise TableError(f"{f.name}: an errno counter has no series before its event")


def _unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise TableError(f"duplicate {what}: {value}")
        seen.add(value)


check_table(FAMILIES)

# -- the docs' tables --------------------------------------------------------------------


def _code(names: tuple[str, ...] | str) -> str:
    return ", ".join(f"`{n}`" for n in ((names,) if isinstance(names, str) else names))


def _meaning(f: Family) -> str:
    meaning = f"{f.help} {f.note}".strip()
    if f.values:
        meaning += f" {_code(f.labels)}: {_code(f.values)}."
    return meaning


def _series_from(f: Family) -> str:
    return f.series_from or (INITIAL_RULES[f.initial] if f.group == "socket" else "start")


def _kind(f: Family) -> str:
    return "counter (ObservableCounter)" if f.type == "counter" else "gauge (ObservableGauge)"


Cell = Callable[[Family], str]
_NAME: Cell = lambda f: _code(f.name)  # noqa: E731
_TYPE: Cell = lambda f: f.type  # noqa: E731
_LABELS: Cell = lambda f: _code(f.labels)  # noqa: E731


def _short(title: str) -> tuple[tuple[str, Cell], ...]:
    """The columns of a group's own table."""
    return ((title, _NAME), ("type", _TYPE), ("labels", _LABELS), ("meaning", _meaning))


# Table name -> (its rows, its columns: header and cell).
TABLES: dict[str, tuple[tuple[Family, ...], tuple[tuple[str, Cell], ...]]] = {
    # The OTLP push's own are in docs/otlp.md's text.
    "metrics": (
        tuple(f for f in DAEMON_FAMILIES if f.group != "otlp"),
        (
            ("metric", _NAME),
            ("type", _TYPE),
            ("extra labels", _LABELS),
            ("libzmq event", lambda f: f.source),
            ("series from", _series_from),
            ("meaning", _meaning),
        ),
    ),
    # The OTel instruments and the Prometheus names they translate to.
    "otel": (
        PUSHED,
        (
            ("OTel instrument", lambda f: f"`{f.otel_name}`"),
            ("kind", _kind),
            ("unit", lambda f: f"`{f.otel_unit}`" if f.otel_unit else ""),
            ("Prometheus name", _NAME),
        ),
    ),
    "probe": (PROBE_FAMILIES, _short("probe metric")),
    "relay": (RELAY_FAMILIES, _short("relay metric")),
    "messages": (
        MESSAGE_FAMILIES,
        (
            ("metric", _NAME),
            ("type", _TYPE),
            ("OTel instrument", lambda f: f"`{f.otel_name}`"),
            ("unit", lambda f: f"`{f.otel_unit}`"),
            ("meaning", _meaning),
        ),
    ),
}


def markdown(table: str = "metrics") -> str:
    """The docs' table `table` (a key of TABLES), in Markdown."""
    families, columns = TABLES[table]
    lines = [
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for f in families:
        lines.append("| " + " | ".join(cell(f) for _, cell in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] != ["--markdown"] or len(argv) > 2 or argv[1:2] not in ([], *[[t] for t in TABLES]):
        tables = "|".join(TABLES)
        print(f"usage: python -m exporter.core.metrics --markdown [{tables}]", file=sys.stderr)
        return 2
    print(markdown(*argv[1:]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
