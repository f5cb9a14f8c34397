"""Renders the engine's state as Prometheus metric families, at scrape time.

`StateCollector.collect()` takes one snapshot (a short copy under the engine's lock) and
builds families outside the lock, so a slow scrape never holds up event processing.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

import zmq
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter import __version__, metrics
from exporter.engine import EngineSnapshot
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


def _family(name: str, help_text: str, kind: str) -> Metric:
    return Metric(name, help_text, kind)


class StateCollector(Collector):
    """Socket metrics (`zmq_*`) and the reader's self-metrics (`zmq_exporter_*`)."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from render_sockets(snap.sockets)
        yield from render_self(snap)


def render_sockets(sockets: tuple[SocketSnapshot, ...]) -> Iterator[Metric]:
    counters = {c.event: _family(c.name, c.help, "counter") for c in metrics.EVENT_COUNTERS}
    # `zmq_listening_total` (counter) and `zmq_listening` (gauge) are both part of the
    # contract; OpenMetrics cannot hold a counter family and a gauge family both named
    # `zmq_listening`, so the counter's family is named by its sample, type unknown, and
    # `for_text_format` declares it a counter where the format allows (text 0.0.4).
    counters[Event.LISTENING] = _family(
        LISTENING_COUNTER, counters[Event.LISTENING].documentation, "unknown"
    )
    handshake = _family(metrics.HANDSHAKE_FAILED, metrics.HANDSHAKE_FAILED_HELP, "counter")
    connections = _family(metrics.CONNECTIONS, metrics.CONNECTIONS_HELP, "gauge")
    listening = _family(metrics.LISTENING, metrics.LISTENING_HELP, "gauge")
    reconnect = _family(metrics.RECONNECT_INTERVAL, metrics.RECONNECT_INTERVAL_HELP, "gauge")
    last_event = _family(metrics.LAST_EVENT, metrics.LAST_EVENT_HELP, "gauge")
    unknown = _family(metrics.UNKNOWN_EVENTS, metrics.UNKNOWN_EVENTS_HELP, "counter")
    info = _family("zmq_socket_info", "Configured sockets (value 1) and their type.", "gauge")
    errno_events = {c.event for c in metrics.EVENT_COUNTERS if c.errno_label}

    for sock in sockets:
        info.add_sample(
            "zmq_socket_info", {"socket": sock.name, "type": sock.socket_type, **sock.labels}, 1
        )
        for event_id, count in sock.unknown_events.items():
            unknown.add_sample(
                "zmq_unknown_events_total",
                {"socket": sock.name, "event": str(event_id), **sock.labels},
                count,
            )
        for ep in sock.endpoints:
            labels = {"socket": sock.name, "endpoint": ep.endpoint, **sock.labels}
            for event, count in ep.counts.items():
                family = counters.get(event)
                if family is None or event in errno_events:
                    continue  # rendered with their errno / reason labels below
                family.add_sample(
                    family.name if family.type == "unknown" else family.name + "_total",
                    labels,
                    count,
                )
            for (event, errno_label), count in ep.errno_counts.items():
                family = counters[event]
                family.add_sample(family.name + "_total", {**labels, "errno": errno_label}, count)
            failures = ep.handshake_failures
            for reason, error in sorted(failures):
                handshake.add_sample(
                    metrics.HANDSHAKE_FAILED + "_total",
                    {**labels, "reason": reason, "error": error},
                    failures[(reason, error)],
                )
            if ep.role is not None:
                # Each reason at 0 until it happens, so rate() sees the first failure.
                seen = {reason for reason, _ in failures}
                for reason in HANDSHAKE_REASONS:
                    if reason not in seen:
                        handshake.add_sample(
                            metrics.HANDSHAKE_FAILED + "_total",
                            {**labels, "reason": reason, "error": "none"},
                            0,
                        )
            if ep.role is None and ep.connections == 0:
                continue  # socket-wide and unmapped rows carry counters only
            connections.add_sample(metrics.CONNECTIONS, labels, ep.connections)
            last_event.add_sample(metrics.LAST_EVENT, labels, ep.last_event_time)
            if ep.role == "bind":
                listening.add_sample(metrics.LISTENING, labels, 1 if ep.listening else 0)
            elif ep.role == "connect":
                reconnect.add_sample(
                    metrics.RECONNECT_INTERVAL, labels, ep.reconnect_interval_ms / 1000
                )

    yield from counters.values()
    yield from (handshake, connections, listening, reconnect, last_event, unknown, info)


def render_self(snap: EngineSnapshot) -> Iterator[Metric]:
    stats = snap.stats
    rows: list[tuple[str, str, str, float]] = [
        (
            "zmq_exporter_events_processed",
            "counter",
            "Monitor events read and reduced.",
            stats.events,
        ),
        (
            "zmq_exporter_reader_backlog_events",
            "gauge",
            "Events the reader found queued in the current or last burst.",
            stats.backlog,
        ),
        (
            "zmq_exporter_reader_backlog_max_events",
            "gauge",
            "Largest backlog the reader has found since start.",
            stats.backlog_max,
        ),
        (
            "zmq_exporter_reader_wakeups",
            "counter",
            "Reader passes over ready monitors.",
            stats.wakeups,
        ),
        (
            "zmq_exporter_inbound_messages_dropped",
            "counter",
            "Application messages that arrived on exporter sockets and were dropped.",
            stats.messages_dropped,
        ),
        (
            "zmq_exporter_attach_failures",
            "counter",
            "bind()/connect() calls that raised and were scheduled for retry.",
            stats.attach_failures,
        ),
        ("zmq_exporter_sockets", "gauge", "Sockets configured and monitored.", len(snap.sockets)),
    ]
    for name, kind, help_text, value in rows:
        family = _family(name, help_text, kind)
        family.add_sample(name + "_total" if kind == "counter" else name, {}, value)
        yield family
    info = _family("zmq_exporter_build_info", "Build of the exporter (value 1).", "gauge")
    info.add_sample(
        "zmq_exporter_build_info",
        {
            "version": __version__,
            "pyzmq_version": zmq.pyzmq_version(),
            "libzmq_version": zmq.zmq_version(),
            "python_version": platform.python_version(),
        },
        1,
    )
    yield info
