"""Renders the engine's state as Prometheus metric families, at scrape time.

`StateCollector.collect()` takes one snapshot (a short copy under the engine's lock) and
builds families outside the lock, so a slow scrape never holds up event processing.
/metrics uses `StateCollector.prerender()` instead: the socket families as text from
`SocketText` (exporter/render/sockettext.py), identical bytes at a fraction of the cost.

Public names: `StateCollector` (`collect()`, `prerender(openmetrics)`), `Prerendered`,
`render_sockets(sockets)` (socket families, rows from `exporter.render.rows.socket_rows`),
`render_self(snapshot)`, `for_text_format(families)`, `LISTENING_COUNTER`.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zmq
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.render.rows import (
    LISTENING_COUNTER,
    SOCKET_FAMILIES,
    for_text_format,
    row_labels,
    socket_rows,
)
from exporter.render.sockettext import SocketText
from exporter.state import EngineSnapshot, SocketSnapshot

__all__ = [
    "LISTENING_COUNTER",
    "Prerendered",
    "StateCollector",
    "for_text_format",
    "render_self",
    "render_sockets",
]


def _family(name: str, help_text: str, kind: str) -> Metric:
    return Metric(name, help_text, kind)


@dataclass(frozen=True)
class Prerendered:
    """One scrape's socket families as text, and the self-metrics of the same snapshot."""

    text: bytes  # the socket families, without `# EOF`
    series: int  # samples in `text`
    families: list[Metric]  # render_self(), for the encoder


class StateCollector(Collector):
    """Socket metrics (`zmq_*`) and the reader's self-metrics (`zmq_exporter_*`).

    `collect()` yields them all as `Metric` families; `prerender()` is what /metrics uses:
    the socket families as pre-rendered text (`SocketText`), self-metrics as families."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot
        self.text = SocketText()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from render_sockets(snap.sockets)
        yield from render_self(snap)

    def prerender(self, openmetrics: bool) -> Prerendered:
        """Byte for byte what an encoder writes for `render_sockets`, then `render_self`."""
        snap = self._snapshot()
        text, series = self.text.render_counted(snap.sockets, openmetrics)
        return Prerendered(text, series, list(render_self(snap)))


def render_sockets(sockets: tuple[SocketSnapshot, ...]) -> Iterator[Metric]:
    """The socket families (`SOCKET_FAMILIES`), from `socket_rows`; /metrics renders the
    same rows as text with `SocketText`."""
    families = [Metric(f.name, f.help, f.type) for f in SOCKET_FAMILIES]
    for sock in sockets:
        for index, endpoint, extra, value in socket_rows(sock):
            family = families[index]
            family.add_sample(
                SOCKET_FAMILIES[index].sample, row_labels(sock, endpoint, extra), value
            )
    yield from families


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
        (
            "zmq_exporter_engine_errors",
            "counter",
            "Unexpected errors caught while serving a socket; the engine went on.",
            stats.engine_errors,
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
