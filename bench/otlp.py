"""One OTLP export's payload: our `MetricsBuilder` (exporter/otlp/request.py: the
serialized requests, each idle socket's serialized data points kept, cut into requests of
at most the default `max_request_bytes`), the bytes the transport sends as they are,
against `prometheus_client`'s `generate_latest` over the same series held in ordinary
Counters and Gauges, at 10,000 sockets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from bench import scrape
from exporter.config.otlp import default_resource
from exporter.core.events import Event
from exporter.core.state import (
    EngineSnapshot,
    ReaderStats,
    SocketSnapshot,
    apply_event,
    snapshot_socket,
)
from exporter.monitor.sockets import build_labels
from exporter.otlp.request import MetricsBuilder, count_points
from exporter.render.sockettext import SocketText


@dataclass
class OtlpTimes:
    series: int  # socket series (data points of the socket instruments)
    points: int  # every data point of one export (self-metrics included)
    payload_bytes: int  # every request of one export together
    generate_latest: float  # seconds, `_created` series disabled (same series as ours)
    warm: float  # 1% of the sockets changed since the previous export
    all_changed: float  # every socket changed: every point rebuilt
    first: float  # the first export after start: a new builder
    requests: int = 1  # requests of one export (split at the default max_request_bytes)
    largest_request: int = 0  # serialized bytes of its largest request


def _payload(builder: MetricsBuilder, sockets: tuple[SocketSnapshot, ...]) -> list[bytes]:
    # What an export costs before the transport: the serialized requests, which the
    # transport sends as they are (gRPC without a serializer, HTTP as the body).
    return builder.encode_requests(EngineSnapshot(sockets, ReaderStats(), True))


def run(sockets: int, repeat: int) -> OtlpTimes:
    """Times include taking the snapshots of changed sockets (what `Engine.snapshot()`
    does under its lock), building the export's request and serializing it to the bytes
    the exporter sends; the builder is kept between exports, as the daemon keeps it, except
    for `first`."""
    states = scrape.build_states(sockets)
    text = SocketText().render(scrape.snapshots(states)).decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    # As in bench/scrape.py: without `_created` series (prometheus_client reads the switch
    # when it writes, so the baseline is timed inside), the same series as ours.
    scrape._created_series(False)
    try:
        plain = scrape.baseline_registries(text)
        baseline = scrape._best(lambda: scrape._generate(plain), repeat)
    finally:
        scrape._created_series(True)
    resource = default_resource()

    def first_export() -> None:
        _payload(MetricsBuilder(resource, build_labels()), scrape.snapshots(states))

    builder = MetricsBuilder(resource, build_labels())
    snaps = list(scrape.snapshots(states))
    payload = _payload(builder, tuple(snaps))
    assert max(map(len, payload)) <= builder.max_request_bytes
    points = count_points(builder.build(EngineSnapshot(tuple(snaps), ReaderStats(), True)))
    clock = itertools.count(2_000_000_000)

    def export_after_changes(step: int) -> None:
        now = float(next(clock))
        for i in range(0, sockets, step):  # a new event, then a new snapshot
            apply_event(states[i], int(Event.ACCEPTED), 12, f"tcp://127.0.0.1:{20000 + i}", now)
            snaps[i] = snapshot_socket(states[i])
        _payload(builder, tuple(snaps))

    warm = scrape._best(lambda: export_after_changes(100), repeat)
    all_changed = scrape._best(lambda: export_after_changes(1), repeat)
    first = scrape._best(first_export, repeat)
    return OtlpTimes(
        series,
        points,
        sum(map(len, payload)),
        baseline,
        warm,
        all_changed,
        first,
        len(payload),
        max(map(len, payload)),
    )
