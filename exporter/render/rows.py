"""The one definition of which socket series exist: the rows of each socket, in the socket
families of the metrics table (`exporter.core.metrics`), which says which rows exist from start.

Everything that shows socket series reads them from here: `render_sockets` (Prometheus
`Metric` families, also read by the OTLP pusher) and `SocketText` (the pre-rendered
/metrics text). A row exists on one exactly when it exists on the others.

Public names:
- `SocketFamily`: a family of socket series as exposed (name, help, type, unit, sample
  name).
- `SOCKET_FAMILIES`: every socket family, in /metrics order (`metrics.SOCKET_FAMILIES`).
- `Row`: `(family index, endpoint or None, extra labels, value)`.
- `socket_rows(sock)`: the rows of one socket, in /metrics order within each family.
- `row_labels(sock, endpoint, extra)`: a row's full label set, as a dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from exporter.core import metrics
from exporter.core.events import HANDSHAKE_REASONS, Event
from exporter.core.state import SocketSnapshot


@dataclass(frozen=True)
class SocketFamily:
    """A socket family as the exposition declares it (`exporter.core.metrics` has the rest)."""

    name: str  # Metric family name
    help: str
    type: str  # "counter" or "gauge"
    unit: str  # OpenMetrics `# UNIT` ("" for none)
    sample: str  # name of its samples


def _exposed(family: metrics.Family) -> SocketFamily:
    return SocketFamily(
        family.metric_name, family.help, family.type, family.unit or "", family.name
    )


SOCKET_FAMILIES: tuple[SocketFamily, ...] = tuple(map(_exposed, metrics.SOCKET_FAMILIES))

_INDEX = {family: i for i, family in enumerate(metrics.SOCKET_FAMILIES)}
HANDSHAKE = _INDEX[metrics.HANDSHAKE_FAILED]
CONNECTIONS = _INDEX[metrics.CONNECTIONS]
LISTENING = _INDEX[metrics.LISTENING]
READY = _INDEX[metrics.CONNECTION_READY]
RECONNECT = _INDEX[metrics.RECONNECT_INTERVAL]
LAST_EVENT = _INDEX[metrics.LAST_EVENT]
UNKNOWN = _INDEX[metrics.UNKNOWN_EVENTS]
INFO = _INDEX[metrics.SOCKET_INFO]
_COUNTER_INDEX: dict[Event, int] = {
    event: _INDEX[family] for event, family in metrics.EVENT_COUNTERS.items()
}
# Events counted without extra labels (errno events carry `errno`, handshake failures have
# their own family).
_PLAIN_COUNTER_INDEX: dict[Event, int] = {
    event: _INDEX[family] for event, family in metrics.EVENT_COUNTERS.items() if not family.labels
}

Labels = tuple[tuple[str, str], ...]
# The names of the extra labels rows carry (configured labels may not use them).
EXTRA_LABELS = metrics.EXTRA_LABELS
# (index into SOCKET_FAMILIES, endpoint label or None for a socket-level row, labels beyond
# socket/endpoint/configured ones, value)
Row = tuple[int, str | None, Labels, float]

_HANDSHAKE_ZERO: tuple[tuple[str, Labels], ...] = tuple(
    (reason, (("reason", reason), ("error", "none"))) for reason in HANDSHAKE_REASONS
)


def socket_rows(sock: SocketSnapshot) -> Iterator[Row]:
    """Every series of one socket. Within one family, rows come in /metrics order."""
    yield INFO, None, (("type", sock.socket_type),), 1
    for event_id, count in sock.unknown_events.items():
        yield UNKNOWN, None, (("event", str(event_id)),), count
    plain = _PLAIN_COUNTER_INDEX
    for ep in sock.endpoints:
        endpoint = ep.endpoint
        for event, count in ep.counts.items():
            index = plain.get(event)
            if index is not None:  # errno events: with their errno label below
                yield index, endpoint, (), count
        for (event, errno_label), count in ep.errno_counts.items():
            yield _COUNTER_INDEX[event], endpoint, (("errno", errno_label),), count
        failures = ep.handshake_failures
        if failures:
            for reason, error in sorted(failures):
                yield (
                    HANDSHAKE,
                    endpoint,
                    (("reason", reason), ("error", error)),
                    failures[(reason, error)],
                )
        if ep.role is not None:
            # Each reason at 0 until it happens, so rate() sees the first failure.
            if failures:
                seen = {reason for reason, _ in failures}
                for reason, labels in _HANDSHAKE_ZERO:
                    if reason not in seen:
                        yield HANDSHAKE, endpoint, labels, 0
            else:
                for _, labels in _HANDSHAKE_ZERO:
                    yield HANDSHAKE, endpoint, labels, 0
        elif ep.connections == 0:
            continue  # socket-wide and unmapped rows carry counters only
        yield CONNECTIONS, endpoint, (), ep.connections
        yield LAST_EVENT, endpoint, (), ep.last_event_time
        if ep.role == "bind":
            yield LISTENING, endpoint, (), 1 if ep.listening else 0
        elif ep.role == "connect":
            yield READY, endpoint, (), 1 if ep.ready else 0
            yield RECONNECT, endpoint, (), ep.reconnect_interval_ms / 1000


def row_labels(sock: SocketSnapshot, endpoint: str | None, extra: Labels) -> dict[str, str]:
    """The labels of a row: socket, endpoint (endpoint rows), configured labels, extras.
    (Configured labels cannot shadow the others: `RESERVED_LABELS` in the config.)"""
    if endpoint is None:
        labels = {"socket": sock.name}
    else:
        labels = {"socket": sock.name, "endpoint": endpoint}
    labels.update(sock.labels)
    labels.update(extra)
    return labels
