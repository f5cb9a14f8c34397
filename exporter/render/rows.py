"""The one definition of which socket series exist: families and per-socket rows.

Everything that shows socket series reads them from here: `render_sockets` (Prometheus
`Metric` families, also read by the OTLP pusher) and `SocketText` (the pre-rendered
/metrics text). A row exists on one exactly when it exists on the others.

Public names:
- `SocketFamily`: a family of socket series (name, help, type, sample name).
- `SOCKET_FAMILIES`: every socket family, in /metrics order.
- `Row`: `(family index, endpoint or None, extra labels, value)`.
- `socket_rows(sock)`: the rows of one socket, in /metrics order within each family.
- `row_labels(sock, endpoint, extra)`: a row's full label set, as a dict.
- `for_text_format(families)`: the families as the text format (0.0.4) declares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from exporter import metrics
from exporter.events import HANDSHAKE_REASONS, Event
from exporter.state import SocketSnapshot

LISTENING_COUNTER = "zmq_listening_total"


def for_text_format(families: list[Metric]) -> list[Metric]:
    """The families as the text format (0.0.4) should declare them: there the counter
    `zmq_listening_total` and the gauge `zmq_listening` do not clash."""
    out = []
    for family in families:
        if family.name == LISTENING_COUNTER and family.type == "unknown":
            counter = Metric(family.name.removesuffix("_total"), family.documentation, "counter")
            counter.samples = family.samples
            family = counter
        out.append(family)
    return out


@dataclass(frozen=True)
class SocketFamily:
    name: str  # Metric family name
    help: str
    type: str  # "counter", "gauge" or "unknown"
    sample: str  # name of its samples


def _counter_family(counter: metrics.EventCounter) -> SocketFamily:
    if counter.event is Event.LISTENING:
        # `zmq_listening_total` (counter) and `zmq_listening` (gauge) are both part of the
        # contract; OpenMetrics cannot hold a counter family and a gauge family both named
        # `zmq_listening`, so the counter's family is named by its sample, type unknown,
        # and `for_text_format` declares it a counter where the format allows (text 0.0.4).
        return SocketFamily(LISTENING_COUNTER, counter.help, "unknown", LISTENING_COUNTER)
    return SocketFamily(counter.name, counter.help, "counter", counter.name + "_total")


SOCKET_FAMILIES: tuple[SocketFamily, ...] = (
    *(_counter_family(c) for c in metrics.EVENT_COUNTERS),
    SocketFamily(
        metrics.HANDSHAKE_FAILED,
        metrics.HANDSHAKE_FAILED_HELP,
        "counter",
        metrics.HANDSHAKE_FAILED + "_total",
    ),
    SocketFamily(metrics.CONNECTIONS, metrics.CONNECTIONS_HELP, "gauge", metrics.CONNECTIONS),
    SocketFamily(metrics.LISTENING, metrics.LISTENING_HELP, "gauge", metrics.LISTENING),
    SocketFamily(
        metrics.RECONNECT_INTERVAL,
        metrics.RECONNECT_INTERVAL_HELP,
        "gauge",
        metrics.RECONNECT_INTERVAL,
    ),
    SocketFamily(metrics.LAST_EVENT, metrics.LAST_EVENT_HELP, "gauge", metrics.LAST_EVENT),
    SocketFamily(
        metrics.UNKNOWN_EVENTS,
        metrics.UNKNOWN_EVENTS_HELP,
        "counter",
        metrics.UNKNOWN_EVENTS + "_total",
    ),
    SocketFamily(
        "zmq_socket_info",
        "Configured sockets (value 1) and their type.",
        "gauge",
        "zmq_socket_info",
    ),
)

_COUNTER_INDEX: dict[Event, int] = {c.event: i for i, c in enumerate(metrics.EVENT_COUNTERS)}
_ERRNO_EVENTS = frozenset(c.event for c in metrics.EVENT_COUNTERS if c.errno_label)
# Events counted without extra labels (errno events carry `errno`, handshake failures have
# their own family).
_PLAIN_COUNTER_INDEX: dict[Event, int] = {
    event: index for event, index in _COUNTER_INDEX.items() if event not in _ERRNO_EVENTS
}
_N = len(metrics.EVENT_COUNTERS)
HANDSHAKE, CONNECTIONS, LISTENING, RECONNECT, LAST_EVENT, UNKNOWN, INFO = range(_N, _N + 7)
assert len(SOCKET_FAMILIES) == INFO + 1

Labels = tuple[tuple[str, str], ...]
# The names of the extra labels rows carry (configured labels may not use them).
EXTRA_LABELS = frozenset({"type", "event", "errno", "reason", "error"})
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
