"""Rendering /metrics: our pre-rendered socket text against `prometheus_client`'s
`generate_latest` over the same series held in ordinary Counters and Gauges (what an
exporter built the usual way would do), at 10,000 sockets."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import SocketSnapshot, SocketState, apply_event, snapshot_socket
from exporter.render.sockettext import SocketText

# A ROUTER's life: listening, two peers accepted, one gone, handshakes, one auth failure.
_EVENTS = (
    (Event.LISTENING, 9),
    (Event.ACCEPTED, 10),
    (Event.HANDSHAKE_SUCCEEDED, 0),
    (Event.ACCEPTED, 11),
    (Event.HANDSHAKE_FAILED_AUTH, 400),
    (Event.DISCONNECTED, 11),
)


def build_states(sockets: int) -> list[SocketState]:
    states = []
    for i in range(sockets):
        endpoint = f"tcp://127.0.0.1:{20000 + i}"
        state = SocketState(
            f"router-{i}", "ROUTER", {"team": "bench"}, EndpointMap((endpoint,), ())
        )
        for t, (event, value) in enumerate(_EVENTS):
            apply_event(state, int(event), value, endpoint, 1_700_000_000.0 + t)
        states.append(state)
    return states


def snapshots(states: list[SocketState]) -> tuple[SocketSnapshot, ...]:
    return tuple(snapshot_socket(s) for s in states)


def baseline_registries(text: str) -> list[CollectorRegistry]:
    """The series of `text` as prometheus_client Counters and Gauges. (A second registry
    held the counter `zmq_listening_total`, which one registry refused beside the gauge
    `zmq_listening`; renamed `zmq_bind_succeeded_total`, it no longer clashes, and the
    second registry stays empty.)"""
    main, second = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
    for family in text_string_to_metric_families(text):
        if not family.samples:
            continue
        registry = second if family.name == "zmq_listening" and family.type == "counter" else main
        names = list(family.samples[0].labels)
        metric: Counter | Gauge
        if family.type == "counter":
            metric = Counter(family.name, family.documentation, names, registry=registry)
            for s in family.samples:
                metric.labels(**s.labels).inc(s.value)
        else:
            gauge = Gauge(family.name, family.documentation, names, registry=registry)
            for s in family.samples:
                gauge.labels(**s.labels).set(s.value)
    return [main, second]


def _generate(registries: list[CollectorRegistry]) -> None:
    for registry in registries:
        generate_latest(registry)


def _created_series(enabled: bool) -> None:
    """prometheus_client's switch for `_created` series (read when a metric is created)."""
    toggle: Callable[[], None] = (
        prometheus_client.enable_created_metrics
        if enabled
        else prometheus_client.disable_created_metrics
    )
    toggle()


def _best(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of `repeat` runs, in seconds (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@dataclass
class ScrapeTimes:
    series: int
    generate_latest: float  # seconds, `_created` series disabled (same series as ours)
    generate_latest_created: float  # seconds, prometheus_client's default
    ours_warm: float  # 1% of the sockets changed since the previous scrape
    ours_all_changed: float  # every socket changed: every snapshot and line rebuilt
    ours_first: float  # the first scrape after start: label strings built too


def run(sockets: int, repeat: int) -> ScrapeTimes:
    """Times include taking the snapshots of changed sockets (what `Engine.snapshot()`
    does under its lock) and rendering; the renderer is kept between scrapes, as the
    daemon keeps it, except for `ours_first`."""
    states = build_states(sockets)
    text = SocketText().render(snapshots(states)).decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    _created_series(False)
    try:
        plain = baseline_registries(text)
        generate_plain = _best(lambda: _generate(plain), repeat)
    finally:
        _created_series(True)
    created = baseline_registries(text)
    generate_created = _best(lambda: _generate(created), repeat)

    first = _best(lambda: SocketText().render(snapshots(states)), repeat)

    renderer = SocketText()
    snaps = list(snapshots(states))
    renderer.render(tuple(snaps))
    clock = itertools.count(2_000_000_000)

    def scrape_after_changes(step: int) -> None:
        now = float(next(clock))
        for i in range(0, sockets, step):  # a new event, then a new snapshot
            apply_event(states[i], int(Event.ACCEPTED), 12, f"tcp://127.0.0.1:{20000 + i}", now)
            snaps[i] = snapshot_socket(states[i])
        renderer.render(tuple(snaps))

    warm = _best(lambda: scrape_after_changes(100), repeat)
    all_changed = _best(lambda: scrape_after_changes(1), repeat)
    return ScrapeTimes(series, generate_plain, generate_created, warm, all_changed, first)
