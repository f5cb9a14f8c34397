"""Renders the engine's state as Prometheus metric families, at scrape time.

`StateCollector.collect()` takes one snapshot (a short copy under the engine's lock) and
builds families outside the lock, so a slow scrape never holds up event processing.
/metrics uses `StateCollector.prerender()` instead: the socket families as text from
`SocketText` (exporter/render/sockettext.py), identical bytes at a fraction of the cost.

The connection families are not read here: the connection sampler
(exporter/connections/sampler.py) renders them once per sample, and `StateCollector` appends the
latest sample (`ConnectionText`) after the socket families.

Public names: `StateCollector` (`collect()`, `prerender(openmetrics)`), `Prerendered`,
`ConnectionText`,
`render_sockets(sockets)` (socket families, rows from `exporter.render.rows.socket_rows`),
`render_self(snapshot, build)`, `one_sample(family, value, labels)` (a family of
`exporter.core.metrics` with one sample).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter.core import metrics
from exporter.core.state import EngineSnapshot, SocketSnapshot
from exporter.render.alloc import Trimmer
from exporter.render.rows import SOCKET_FAMILIES, row_labels, socket_rows
from exporter.render.sockettext import SocketText

__all__ = [
    "ConnectionText",
    "Prerendered",
    "StateCollector",
    "one_sample",
    "render_self",
    "render_sockets",
]


def one_sample(
    family: metrics.Family, value: float, labels: dict[str, str] | None = None
) -> Metric:
    """A family of the metrics table with one sample."""
    out = Metric(family.metric_name, family.help, family.type, family.unit or "")
    out.add_sample(family.name, labels or {}, value)
    return out


@dataclass(frozen=True)
class Prerendered:
    """One scrape's socket families as text, and the self-metrics of the same snapshot."""

    text: bytes  # the socket families, without `# EOF`
    series: int  # samples in `text`
    families: list[Metric]  # render_self(), for the encoder


class ConnectionText(Protocol):
    """The latest connection sample (exporter/connections/sampler.py `ConnectionSample`): its
    families, and the text each format's encoder writes for them."""

    @property
    def families(self) -> tuple[Metric, ...]: ...

    @property
    def text(self) -> bytes: ...

    @property
    def openmetrics(self) -> bytes: ...

    @property
    def series(self) -> int: ...


class StateCollector(Collector):
    """Socket metrics (`zmq_*`), the connection families of the latest connection sample
    (when `connections` gives one) and the reader's self-metrics (`zmq_exporter_*`).

    `collect()` yields them all as `Metric` families; `prerender()` is what /metrics uses:
    the socket families as pre-rendered text (`SocketText`), the connection sample's text
    as its sampler rendered it, self-metrics as families."""

    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot],
        build: Mapping[str, str],
        connections: Callable[[], ConnectionText | None] = lambda: None,
    ) -> None:
        self._snapshot = snapshot
        self._build = dict(build)
        self._connections = connections
        self.text = SocketText()
        # What renders that rebuilt many sockets freed goes back to the system
        # (exporter/render/alloc.py): a relay sidecar's RSS after churn.
        self.trimmer = Trimmer()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        sample = self._connections()
        yield from render_sockets(snap.sockets)
        if sample is not None:
            yield from sample.families
        yield from render_self(snap, self._build)

    def prerender(self, openmetrics: bool) -> Prerendered:
        """Byte for byte what an encoder writes for `render_sockets`, the connection
        families, then `render_self`."""
        snap = self._snapshot()
        sample = self._connections()
        text, series = self.text.render_counted(snap.sockets, openmetrics)
        self.trimmer.note(self.text.built)
        if sample is not None and sample.series:
            text += sample.openmetrics if openmetrics else sample.text
            series += sample.series
        return Prerendered(text, series, list(render_self(snap, self._build)))


def render_sockets(sockets: tuple[SocketSnapshot, ...]) -> Iterator[Metric]:
    """The socket families (`SOCKET_FAMILIES`), from `socket_rows`; /metrics renders the
    same rows as text with `SocketText`."""
    families = [Metric(f.name, f.help, f.type, f.unit) for f in SOCKET_FAMILIES]
    for sock in sockets:
        for index, endpoint, extra, value in socket_rows(sock):
            family = families[index]
            family.add_sample(
                SOCKET_FAMILIES[index].sample, row_labels(sock, endpoint, extra), value
            )
    yield from families


def render_self(snap: EngineSnapshot, build: Mapping[str, str]) -> Iterator[Metric]:
    """The engine's self-metrics (`metrics.ENGINE_FAMILIES`), then `metrics.BUILD_INFO`
    with `build` as labels (`exporter.monitor.sockets.build_labels()`)."""
    stats = snap.stats
    pairs: tuple[tuple[metrics.Family, float], ...] = (
        (metrics.EVENTS_PROCESSED, stats.events),
        (metrics.READER_BACKLOG, stats.backlog),
        (metrics.READER_BACKLOG_MAX, stats.backlog_max),
        (metrics.READER_WAKEUPS, stats.wakeups),
        (metrics.MESSAGES_DROPPED, stats.messages_dropped),
        (metrics.ATTACH_FAILURES, stats.attach_failures),
        (metrics.ENGINE_ERRORS, stats.engine_errors),
        (metrics.LISTENER_SHEDS, stats.listener_sheds),
        (metrics.MEMORY_TRIMS, stats.memory_trims),
        (metrics.SOCKETS, len(snap.sockets)),
    )
    for family, value in pairs:
        yield one_sample(family, value)
    yield one_sample(metrics.BUILD_INFO, 1, dict(build))
