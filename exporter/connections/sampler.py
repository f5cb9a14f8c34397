"""The connection sampler: the per-endpoint connection families
(`metrics.CONNECTION_FAMILIES`) read from the kernel on a thread of their own, never at
scrape time.

Reading one live connection costs 7.5-16 µs (docs/connections.md, "Measured cost"), so
4,000 connections cost 30-65 ms against a /metrics of ~4 ms: read per scrape, they would
make the scrape 10x dearer. Instead a daemon thread reads every live connection of the
engine's sockets through the connection table (`ConnectionTable.read_batched`: the same
pinned, verified reads as GET /api/v1/connections, at most `SAMPLE_BATCH` per hold of the
table's lock) every `connections.sample_interval`, and at least 20 times the last sample's
duration apart (start to start), so the reads never take more than 5% of a core. Each
sample is summarized per endpoint (`exporter.connections.kernel.summarize`) and published as one
immutable `ConnectionSample`: the families as prometheus_client `Metric`s (for the OTLP push
and the encoders' slow path) and as the text both /metrics formats write for them, rendered
once by the encoders themselves. A scrape renders the latest sample: a reference read and a
`bytes` join.

What a sample holds, per configured tcp or ipc endpoint of the engine's sockets (relayed
sockets have no fds here):
- the four queue and retransmission families, 0 while the endpoint has no connection (a
  series that comes and goes with the connections would break rate() and alerts);
- the two RTT families only while it has a tcp connection (0 would read as a perfect
  network).
With `per_peer`, the same per peer address (`peer`: a tcp peer's IP without the port, an
ipc peer's `pid:<n>` from SO_PEERCRED or `unknown`), at most `max_peers_per_endpoint` peers
per endpoint (those with most connections, then by address); the rest aggregate under
`peer="other"` and are counted in `zmq_exporter_connection_peers_suppressed`. An endpoint
without connections has no per-peer series.

The sampler can neither stop nor stall the engine: it takes the engine's snapshot (a short
copy under the engine's lock) and otherwise only reads the kernel. An unexpected error ends
one sample, not the thread: it is counted (`zmq_exporter_connection_sample_errors_total`),
logged once per kind, and the previous sample stays served; its age
(`zmq_exporter_connection_sample_age_seconds`, computed at scrape) shows a sampler that
fails or froze.

Public names: `ConnectionSampler` (`start`, `stop`, `configure`, `latest`, `sample_once`,
`self_metrics`), `ConnectionSample`, `build_sample` (= `summarize_sample`, then
`render_sample` unless nothing changed), `reads_gone_family`, `peer_of`, `OTHER_PEER`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector

from exporter.config.model import ConnectionsConfig
from exporter.connections.kernel import (
    EMPTY,
    ConnectionInfo,
    EndpointConnections,
    summarize,
)
from exporter.connections.table import SAMPLE_BATCH, ConnectionTable, Row
from exporter.core import metrics, native
from exporter.core.state import EngineSnapshot
from exporter.render.collected import Collected
from exporter.render.prometheus import one_sample

__all__ = [
    "OTHER_PEER",
    "ConnectionSample",
    "ConnectionSampler",
    "build_sample",
    "peer_of",
    "reads_gone_family",
    "render_sample",
    "summarize_sample",
]

log = logging.getLogger("zmq_exporter.connections")

OTHER_PEER = "other"  # peers beyond max_peers_per_endpoint, aggregated
# Period (start to start) at least this many times the last sample's duration: <= 5% busy.
DUTY_FACTOR = 20
STOP_TIMEOUT = 2.0
THREAD_NAME = "zmq-exporter-connection-sampler"  # the daemon's; library mode names its own
_TRANSPORTS = ("tcp", "ipc")  # the transports whose connections have an fd to read
# EndpointConnections field per family, in `metrics.CONNECTION_FAMILIES` order
# (tests/core/test_metrics_table.py checks both lists, and the reasons of READS_GONE).
_FIELDS = (
    "rtt_max_seconds",
    "rtt_avg_seconds",
    "retransmitting",
    "send_queue_bytes",
    "recv_queue_bytes",
    "send_queue_max_bytes",
)

# Untyped in prometheus_client:
_om_generate_latest: Callable[[Collector], bytes] = om_exposition.generate_latest


# One series group of a sample: its labels (socket, endpoint, configured, peer) and values.
Summary = tuple[tuple[tuple[str, str], ...], EndpointConnections]


@dataclass(frozen=True)
class ConnectionSample:
    """One sample of every live connection, summarized per endpoint (per peer). Never
    changed once published; the scrape and the OTLP push read it as is."""

    families: tuple[Metric, ...]  # the connection families with samples, in table order
    text: bytes  # `families` as the text format 0.0.4 encoder writes them
    openmetrics: bytes  # as the OpenMetrics 1.0 encoder writes them, without `# EOF`
    series: int  # samples in `families`
    connections: int  # live connections read (those refused as gone not included)
    peers_suppressed: int  # peers aggregated under `other`
    duration: float  # seconds the sample took (reads and summaries)
    finished: float  # time.monotonic() when it was published
    summaries: tuple[Summary, ...] = ()  # what was rendered (the next sample compares)


def peer_of(info: ConnectionInfo) -> str:
    """The `peer` label of a connection: a tcp peer's IP without the port (an ephemeral port
    would make each connection a series of its own), an ipc peer's `pid:<n>` (SO_PEERCRED)
    or `unknown`."""
    if info.transport == "tcp":
        host = info.peer_address.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host
    return f"pid:{info.peer_pid}" if info.peer_pid else "unknown"


def _by_peer(
    infos: list[ConnectionInfo], max_peers: int
) -> tuple[list[tuple[str, list[ConnectionInfo]]], int]:
    """The endpoint's connections per peer: at most `max_peers` peers (most connections
    first, then by address), the rest under `OTHER_PEER`; and how many peers that hid."""
    groups: dict[str, list[ConnectionInfo]] = {}
    for info in infos:
        groups.setdefault(peer_of(info), []).append(info)
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    kept = sorted(ranked[:max_peers])
    rest = ranked[max_peers:]
    if rest:
        kept.append((OTHER_PEER, [info for _, group in rest for info in group]))
    return kept, len(rest)


def summarize_sample(
    snap: EngineSnapshot, rows: Sequence[Row], settings: ConnectionsConfig
) -> tuple[tuple[Summary, ...], int]:
    """`rows` (read from `snap`'s live fds) summarized per configured tcp and ipc endpoint
    of `snap` (per peer), in the snapshot's socket and endpoint order; and the peers
    aggregated under `other`."""
    by_endpoint: dict[tuple[str, str], list[ConnectionInfo]] = {}
    for row in rows:
        by_endpoint.setdefault((row.socket, row.endpoint), []).append(row.info)
    out: list[Summary] = []
    suppressed = 0
    for sock in snap.sockets:
        configured = tuple(sock.labels.items())
        for ep in sock.endpoints:
            if ep.role is None or ep.endpoint.partition("://")[0] not in _TRANSPORTS:
                continue  # socket-wide and unmapped rows, inproc and the like
            labels = (("socket", sock.name), ("endpoint", ep.endpoint), *configured)
            infos = by_endpoint.get((sock.name, ep.endpoint))
            if not settings.per_peer:
                out.append((labels, summarize(infos) if infos else EMPTY))
                continue
            if not infos:
                continue  # no per-peer series without a connection
            groups, hidden = _by_peer(infos, settings.max_peers_per_endpoint)
            suppressed += hidden
            for peer, group in groups:
                out.append(((*labels, (metrics.PEER_LABEL, peer)), summarize(group)))
    return tuple(out), suppressed


def render_sample(summaries: tuple[Summary, ...]) -> tuple[tuple[Metric, ...], bytes, bytes]:
    """The families of `summaries` (those with samples) and the text each encoder writes
    for them (OpenMetrics without `# EOF`)."""
    families = [
        Metric(f.metric_name, f.help, f.type, f.unit or "") for f in metrics.CONNECTION_FAMILIES
    ]
    names = [f.name for f in metrics.CONNECTION_FAMILIES]
    for labels, summary in summaries:
        label_dict = dict(labels)
        for family, name, field in zip(families, names, _FIELDS, strict=True):
            value = getattr(summary, field)
            if value is not None:  # RTT without a tcp connection: no sample
                family.add_sample(name, label_dict, value)
    present = tuple(f for f in families if f.samples)
    if not present:
        return (), b"", b""
    text = exposition.generate_latest(Collected(present))
    om = _om_generate_latest(Collected(present)).removesuffix(b"# EOF\n")
    return present, text, om


def build_sample(
    snap: EngineSnapshot,
    rows: Sequence[Row],
    settings: ConnectionsConfig,
    previous: ConnectionSample | None = None,
) -> ConnectionSample:
    """One sample of `rows` read from `snap`. The families are rendered again only if a
    value or a series changed since `previous` (idle endpoints keep theirs: at 4,000
    endpoints rendering costs ~160 ms, comparing ~1 ms)."""
    summaries, suppressed = summarize_sample(snap, rows, settings)
    if previous is not None and previous.summaries == summaries:
        families, text, om = previous.families, previous.text, previous.openmetrics
    else:
        families, text, om = render_sample(summaries)
    return ConnectionSample(
        families=families,
        text=text,
        openmetrics=om,
        series=sum(len(f.samples) for f in families),
        connections=len(rows),
        peers_suppressed=suppressed,
        duration=0.0,
        finished=time.monotonic(),
        summaries=summaries,
    )


class ConnectionSampler:
    """Owns the sampling thread. `latest` is the last published sample (None before the
    first); `configure` applies a reloaded `connections:` section (takes effect with the
    next sample, which it starts at once)."""

    def __init__(
        self,
        table: ConnectionTable,
        snapshot: Callable[[], EngineSnapshot],
        settings: ConnectionsConfig,
        batch: int = SAMPLE_BATCH,
        thread_name: str = THREAD_NAME,
    ) -> None:
        self._table = table
        self._thread_name = thread_name
        self._snapshot = snapshot
        self._settings = settings
        self._batch = batch
        self._wake = native.Event()
        # One sample at a time, snapshot to publication: a sample the reload thread takes
        # (`refresh`) and one of the sampler thread never publish out of order.
        self._sample_lock = native.Lock()
        self._stopping = False
        self._thread: native.ThreadLike | None = None
        self._logged: set[str] = set()  # kinds of error logged already
        self.latest: ConnectionSample | None = None
        self.errors = 0
        self.samples = 0
        self.started = time.monotonic()

    @property
    def settings(self) -> ConnectionsConfig:
        return self._settings

    def configure(self, settings: ConnectionsConfig) -> None:
        if settings != self._settings:
            self._settings = settings
            self._wake.set()

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = native.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sample_once(self) -> ConnectionSample:
        """Read every live connection and publish the sample (the thread's one step)."""
        with self._sample_lock:
            settings = self._settings
            begin = time.perf_counter()
            snap = self._snapshot()
            rows = self._table.read_batched(snap, self._batch)
            sample = build_sample(snap, rows, settings, self.latest)
            sample = dataclasses.replace(
                sample, duration=time.perf_counter() - begin, finished=time.monotonic()
            )
            self.latest = sample  # one reference assignment: readers see old or new, whole
            self.samples += 1
            return sample

    def refresh(self) -> None:
        """A sample now, on the caller's thread: after a reload changed the sockets, so that
        /metrics never serves a removed socket's families (nor lacks an added one's) for up
        to an interval. A failure is counted and logged as the thread's are."""
        self._sample_logged()

    def _sample_logged(self) -> None:
        try:
            self.sample_once()
        except Exception as err:  # one sample lost, never the thread (nor the reload)
            self.errors += 1
            kind = type(err).__name__
            if kind not in self._logged:
                self._logged.add(kind)
                log.exception(
                    "connection sample failed; the last sample stays served",
                    extra={"err": f"{kind}: {err}"},
                )

    def _run(self) -> None:
        while not self._stopping:
            begin = time.monotonic()
            self._sample_logged()
            took = time.monotonic() - begin
            period = max(self._settings.sample_interval, DUTY_FACTOR * took)
            self._wake.wait(max(0.0, period - took))
            self._wake.clear()

    # -- self-metrics ------------------------------------------------------------------

    def self_metrics(self) -> Iterator[Metric]:
        """duration, age (now, at scrape), errors and suppressed peers of the sampler."""
        latest = self.latest
        now = time.monotonic()
        yield one_sample(metrics.SAMPLE_DURATION, latest.duration if latest else 0.0)
        yield one_sample(metrics.SAMPLE_AGE, now - (latest.finished if latest else self.started))
        yield one_sample(metrics.SAMPLE_ERRORS, self.errors)
        yield one_sample(metrics.PEERS_SUPPRESSED, latest.peers_suppressed if latest else 0)


def reads_gone_family(table: ConnectionTable) -> Metric:
    """`zmq_exporter_connection_reads_gone_total{reason}`: every reason, 0 until it occurs."""
    family = metrics.READS_GONE
    counts = table.gone_counts()
    out = Metric(family.metric_name, family.help, family.type)
    for reason in family.values:
        out.add_sample(family.name, {"reason": reason}, counts.get(reason, 0))
    return out
