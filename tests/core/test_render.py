"""The Prometheus renderer on reducer state built without a network."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import CollectorRegistry

from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import (
    EngineSnapshot,
    ReaderStats,
    SocketState,
    apply_event,
    snapshot_socket,
)
from exporter.monitor.sockets import build_labels
from exporter.render.prometheus import StateCollector

from helpers import parse_metrics, value

BIND = "tcp://127.0.0.1:5555"
CONNECT = "tcp://127.0.0.1:5556"


def registry_for(*socks: SocketState) -> CollectorRegistry:
    snap = EngineSnapshot(tuple(snapshot_socket(s) for s in socks), ReaderStats(events=7), True)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(lambda: snap, build_labels()))
    return registry


def test_every_event_renders_in_both_formats() -> None:
    sock = SocketState("s", "ROUTER", {"team": "x"}, EndpointMap((BIND,), (CONNECT,)))
    for t, event in enumerate(Event):
        apply_event(sock, int(event), 98, "" if event is Event.MONITOR_STOPPED else BIND, t)
    apply_event(sock, 0x8000, 0, BIND, 99)
    registry = registry_for(sock)
    text = generate_latest(registry).decode()
    assert generate_openmetrics(registry).decode().endswith("# EOF\n")
    m = parse_metrics(text)
    base = {"socket": "s", "endpoint": BIND, "team": "x"}
    for name in (
        "connected",
        "connect_delayed",
        "connect_retried",
        "bind_succeeded",
        "accepted",
        "closed",
        "disconnected",
        "handshake_succeeded",
    ):
        assert value(m, f"zmq_{name}_total", **base) == 1, name
    for name in ("bind_failed", "accept_failed", "close_failed"):
        assert value(m, f"zmq_{name}_total", errno="EADDRINUSE", **base) == 1, name
    assert value(m, "zmq_monitor_stopped_total", socket="s", endpoint="") == 1
    for reason, error in (("no_detail", "EADDRINUSE"), ("protocol", "other"), ("auth", "other")):
        assert value(m, "zmq_handshake_failed_total", reason=reason, error=error, **base) == 1
    assert value(m, "zmq_unknown_events_total", socket="s", event=str(0x8000)) == 1
    assert value(m, "zmq_exporter_events_processed_total") == 7
    # Connect-only gauge on the connect endpoint, bind-only gauge on the bind endpoint.
    assert value(m, "zmq_reconnect_interval_seconds", endpoint=CONNECT) == 0
    assert value(m, "zmq_reconnect_interval_seconds", endpoint=BIND) is None
    assert value(m, "zmq_listening", endpoint=BIND) == 0  # MONITOR_STOPPED closed it
    assert value(m, "zmq_listening", endpoint=CONNECT) is None


def test_fresh_endpoints_have_zero_series_for_rate() -> None:
    sock = SocketState("s", "DEALER", {}, EndpointMap((), (CONNECT,)))
    m = parse_metrics(generate_latest(registry_for(sock)).decode())
    assert value(m, "zmq_connect_retried_total", endpoint=CONNECT) == 0
    assert value(m, "zmq_connections", endpoint=CONNECT) == 0
    for reason in ("no_detail", "protocol", "auth"):
        assert value(m, "zmq_handshake_failed_total", reason=reason, error="none") == 0
