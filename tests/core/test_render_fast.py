"""Pre-rendered /metrics (`SocketText`, `WebApp` with a `StateCollector`): byte for byte
what prometheus_client's encoders write for the same families, in both formats; lines kept
per socket snapshot; engine snapshots reused while a socket is idle (seen through public
behaviour: object identity, the renderer's `built` count, what stays alive); a real scrape
that both prometheus_client parsers and `promtool check metrics` accept."""

from __future__ import annotations

import gc
import gzip
import math
import platform
import socket
import subprocess
import textwrap
import weakref
from collections.abc import Callable, Iterable, Iterator

import pytest
import zmq
from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from test_deploy_tools import tool

from exporter.config import parse_config
from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import (
    EndpointSnapshot,
    EngineSnapshot,
    ReaderStats,
    SocketSnapshot,
    SocketState,
    apply_event,
)
from exporter.core.state import snapshot_socket as snap_of
from exporter.monitor.engine import Engine
from exporter.monitor.sockets import build_labels
from exporter.render.alloc import Trimmer
from exporter.render.prometheus import StateCollector, render_sockets
from exporter.render.rows import SOCKET_FAMILIES, socket_rows
from exporter.render.sockettext import SocketText, fast_format, format_value
from exporter.web.app import WebApp

from helpers import Daemon, http_get
from testkit import free_port, wait_until

BIND = "tcp://127.0.0.1:5555"
CONNECT = "tcp://127.0.0.1:5556"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# What Prometheus 3 sends by default.
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,"
    "*/*;q=0.1"
)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


def reference(sockets: tuple[SocketSnapshot, ...], openmetrics: bool) -> bytes:
    """What the encoder path writes for the socket families."""
    families = list(render_sockets(sockets))
    if openmetrics:
        text: bytes = generate_openmetrics(_Families(families))
        return text.removesuffix(b"# EOF\n")
    return generate_latest(_Families(families))


def assert_identical(renderer: SocketText, sockets: tuple[SocketSnapshot, ...]) -> None:
    for openmetrics in (False, True):
        want = reference(sockets, openmetrics)
        got, series = renderer.render_counted(sockets, openmetrics)
        assert got.decode() == want.decode(), f"openmetrics={openmetrics}"
        assert got == want
        assert series == sum(len(f.samples) for f in render_sockets(sockets))


def every_event_socket(name: str, labels: dict[str, str]) -> SocketState:
    sock = SocketState(name, "ROUTER", labels, EndpointMap((BIND,), (CONNECT,)))
    values = {
        Event.CONNECT_RETRIED: 1500,
        Event.BIND_FAILED: 98,  # EADDRINUSE
        Event.ACCEPT_FAILED: 24,  # EMFILE
        Event.CLOSE_FAILED: 123456,  # unknown errno: `other`
        Event.HANDSHAKE_FAILED_NO_DETAIL: 104,
        Event.HANDSHAKE_FAILED_PROTOCOL: 0x10000003,
        Event.HANDSHAKE_FAILED_AUTH: 400,
    }
    for t, event in enumerate(Event):
        seen = "" if event is Event.MONITOR_STOPPED else BIND
        if event in (Event.CONNECTED, Event.CONNECT_DELAYED, Event.CONNECT_RETRIED):
            seen = CONNECT
        apply_event(sock, int(event), values.get(event, 7 + t), seen, 1_700_000_000.125 + t)
    apply_event(sock, Event.ACCEPTED, 41, BIND, 1_700_000_100.0)  # a live connection again
    apply_event(sock, Event.ACCEPTED, 42, "tcp://10.0.0.1:1", 5.5)  # unmapped endpoint
    apply_event(sock, 0x8000, 0, BIND, 99)  # unknown event ids
    apply_event(sock, 0x8000, 0, BIND, 99)
    apply_event(sock, 0x9001, 0, BIND, 99)
    apply_event(sock, Event.CLOSED, 3, "", 100)  # held until a BIND_FAILED
    return sock


def test_every_event_errno_handshake_and_unknown_ids_identical() -> None:
    socks = (
        every_event_socket("s", {"team": "x"}),
        SocketState("idle", "DEALER", {}, EndpointMap((), (CONNECT,))),
        SocketState("bare", "PUB", {}, EndpointMap((), ())),
    )
    snaps = tuple(snap_of(s) for s in socks)
    text = reference(snaps, False).decode()
    for needle in (
        'errno="EADDRINUSE"',
        'errno="other"',
        'reason="protocol"',
        'error="zmtp_key_exchange"',
        'event="32768"',
        "zmq_reconnect_interval_seconds",
        'endpoint="unmapped"',
    ):
        assert needle in text, needle
    assert_identical(SocketText(), snaps)


def test_label_values_needing_escaping_identical() -> None:
    socks = tuple(
        every_event_socket(name, labels)
        for name, labels in (
            ('quote"d', {"team": 'a"b'}),
            ("back\\slash", {"team": "c:\\dir\\", "zone": "x\ny"}),
            ("new\nline", {"a": "", "b": "ünïcødé ✓"}),
        )
    )
    snaps = tuple(snap_of(s) for s in socks)
    text = reference(snaps, False)
    assert b'socket="quote\\"d"' in text and b'socket="new\\nline"' in text
    assert_identical(SocketText(), snaps)


def endpoint(name: str, **kw: object) -> EndpointSnapshot:
    fields: dict[str, object] = {
        "endpoint": name,
        "role": "connect",
        "counts": {},
        "errno_counts": {},
        "handshake_failures": {},
        "connections": 0,
        "listening": False,
        "reconnect_interval_ms": 0,
        "last_event": None,
        "last_event_time": 0.0,
    }
    fields.update(kw)
    return EndpointSnapshot(**fields)  # type: ignore[arg-type]


def relayed(process: str, name: str, accepted: int) -> SocketSnapshot:
    """A socket as the relay hands it to the renderers: `process` among its labels."""
    ep = endpoint(BIND, role="bind", counts={Event.ACCEPTED: accepted}, listening=True)
    return SocketSnapshot(name, "ROUTER", {"process": process}, (ep,), {}, 0)


def test_same_named_sockets_of_many_processes_stay_cached() -> None:
    """Relayed sockets share names across processes (every process has its `s0`): the
    cache holds each (process, socket) on its own, so a scrape where nothing changed
    renders nothing again, and a changed socket renders only itself. Keyed by name, each
    socket evicted its namesakes: every scrape rendered every socket again."""
    processes, names = 50, 20
    sockets = [relayed(f"proc-{p}", f"s{n}", p + n) for p in range(processes) for n in range(names)]
    # A daemon-owned socket of the same name as relayed ones.
    sockets.append(SocketSnapshot("s0", "ROUTER", {}, (endpoint(BIND, role="bind"),), {}, 0))
    renderer = SocketText()
    text = renderer.render(sockets)
    assert renderer.built == len(sockets)
    for _ in range(3):
        assert renderer.render(sockets) == text
    assert renderer.built == len(sockets), "unchanged same-named sockets were rendered again"

    # One relayed socket's new state: it alone is rendered; the bytes match the encoders'.
    sockets[7] = relayed("proc-0", "s7", 1000)
    assert_identical(renderer, tuple(sockets))
    assert renderer.built == len(sockets) + 1
    # A process gone: its sockets leave the cache; the rest stay cached.
    rest = tuple(s for s in sockets if s.labels.get("process") != "proc-3")
    assert_identical(renderer, rest)
    assert renderer.built == len(sockets) + 1


def test_values_formatted_like_prometheus_client() -> None:
    values: list[float] = [0, 1, 7, 999_999, 1_000_000, 1_234_567, 10**15, 10**16, 2**53 + 1]
    values += [-1, -(10**15) + 1, -(10**15), 0.0, -0.0, 0.1, 1e-7, 1.5, 123456.789]
    values += [1e6, 1.7e9 + 0.125, 1e22, math.inf, -math.inf, math.nan, True, False]
    for v in values:
        assert format_value(v) == floatToGoString(v), v
    # The same values through whole sockets: counts, gauges, intervals, timestamps.
    snaps = tuple(
        SocketSnapshot(
            name=f"v{i}",
            socket_type="DEALER",
            labels={},
            endpoints=(
                endpoint(
                    CONNECT,
                    counts={Event.CONNECTED: int(v) if math.isfinite(v) else 0},
                    connections=i,
                    reconnect_interval_ms=abs(int(v)) if math.isfinite(v) else 0,
                    last_event_time=v,
                ),
            ),
            unknown_events={},
            events=i,
        )
        for i, v in enumerate(values)
    )
    assert_identical(SocketText(), snaps)


def test_sockets_added_removed_and_unchanged_lines_reused() -> None:
    a = every_event_socket("a", {"team": "x"})
    b = every_event_socket("b", {})
    c = SocketState("c", "SUB", {"team": "y"}, EndpointMap((), (CONNECT,)))
    renderer = SocketText()
    first = (snap_of(a), snap_of(b))
    assert_identical(renderer, first)
    assert renderer.built == 2

    # b unchanged (same snapshot object), a changed, c added.
    apply_event(a, Event.DISCONNECTED, 41, BIND, 200)
    second = (snap_of(a), first[1], snap_of(c))
    assert_identical(renderer, second)
    assert renderer.built == 4  # a and c; b's lines reused

    # Nothing changed: nothing is rendered again; rendering twice gives the same bytes.
    before = renderer.render(second)
    assert renderer.render(second) == before
    assert renderer.built == 4

    # a removed: the renderer lets go of it (nothing of a is kept alive); b and c stay
    # cached; order follows the snapshot.
    gone = weakref.ref(second[0])
    third = (second[2], second[1])
    assert_identical(renderer, third)
    assert renderer.built == 4
    del first, second, a
    gc.collect()
    assert gone() is None, "the renderer keeps a removed socket's snapshot alive"
    assert renderer.render(third) == renderer.render(third) and renderer.built == 4

    # A new snapshot object of an unchanged socket renders again, identically.
    fourth = (snap_of(c), third[1])
    assert_identical(renderer, fourth)
    assert renderer.built == 5

    # Labels changed under the same name (a recreated socket): new label strings.
    c2 = SocketState("c", "PUB", {"team": "z"}, EndpointMap((BIND,), ()))
    assert_identical(renderer, (snap_of(c2), third[1]))
    assert_identical(renderer, ())


def test_rows_are_the_families() -> None:
    """The families and the text come from the same rows."""
    snaps = (snap_of(every_event_socket("s", {"team": "x"})),)
    families = list(render_sockets(snaps))
    assert [f.name for f in families] == [f.name for f in SOCKET_FAMILIES]
    assert sum(len(f.samples) for f in families) == sum(1 for _ in socket_rows(snaps[0]))


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", False),
        ("text/plain; version=0.0.4", False),
        (OPENMETRICS, True),
        ("application/openmetrics-text", True),
        (PROMETHEUS_3, True),
        ("text/plain;version=1.0.0;escaping=allow-utf-8", False),
        ("text/plain;version=1.0.0;escaping=underscores", False),
        ("application/openmetrics-text;version=1.0.0;escaping=dots", None),
        ("application/openmetrics-text;version=1.0.0;escaping=values", None),
        ("application/openmetrics-text;version=2.0.0", None),
    ],
)
def test_fast_format(accept: str, expected: bool | None) -> None:
    assert fast_format(choose_encoder(accept)[0]) is expected


class _Static(Collector):
    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("zmq_exporter_other", "Some other collector.", labels=["k"])
        gauge.add_metric(['v"\\'], 2.5)
        yield gauge


def web_app(snapshot: Callable[[], EngineSnapshot]) -> tuple[WebApp, StateCollector]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static())
    state = StateCollector(snapshot, build_labels())
    app = WebApp(registry, "/metrics", lambda: True, lambda: "", lambda: (True, ""), state=state)
    return app, state


@pytest.mark.parametrize(
    "accept",
    [
        "",
        OPENMETRICS,
        PROMETHEUS_3,
        "text/plain;version=1.0.0;escaping=allow-utf-8",
        "application/openmetrics-text;version=1.0.0;escaping=dots",  # encoder path
    ],
)
def test_web_metrics_identical_to_encoder_path(accept: str) -> None:
    socks = [every_event_socket(f"s{i}", {"team": 'q"x'}) for i in range(3)]
    taken: dict[str, SocketSnapshot] = {}

    def snapshot() -> EngineSnapshot:  # reuses idle sockets' snapshots, as the engine does
        for s in socks:
            if s.name not in taken or taken[s.name].events != s.events:
                taken[s.name] = snap_of(s)
        return EngineSnapshot(tuple(taken.values()), ReaderStats(events=9), True)

    app, state = web_app(snapshot)
    encoder, content_type = choose_encoder(accept)
    for round_ in range(3):
        if round_ == 2:
            apply_event(socks[1], Event.ACCEPTED, 77, BIND, 300.5)
        # The path /metrics took before pre-rendering: one registry, one encoder. Collected
        # before the scrape, so the web self-metrics hold the same numbers.
        families = [*state.collect(), *app.registry.collect()]
        want = encoder(_Families(families))
        status, headers, body = app.metrics(accept, None)
        assert status == 200 and headers["Content-Type"] == content_type
        assert body.decode() == want.decode()
        assert app.stats.series == sum(len(f.samples) for f in families)
        assert app.stats.scrapes == round_ + 1
    if fast_format(encoder) is not None:
        assert state.text.built == 3 + 1  # the third round rendered s1 only
    status, headers, zipped = app.metrics(accept, "gzip, deflate")
    assert headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(zipped).decode()
    if content_type.startswith("application/openmetrics-text"):
        assert text.count("# EOF") == 1 and text.endswith("# EOF\n")
        parsed = {f.name: f for f in parse_openmetrics(text)}
        if fast_format(encoder) is None:  # escaping=dots: every name escaped
            assert "zmq__accepted" in parsed
            return
        # A family with a unit declares it (OpenMetrics only).
        assert "# UNIT zmq_reconnect_interval_seconds seconds\n" in text
        assert parsed["zmq_exporter_scrape_duration_seconds"].unit == "seconds"
    else:
        assert "# EOF" not in text
        parsed = {f.name: f for f in parse_text(text)}
    # Every family once, with its type, in both formats (zmq_bind_succeeded_total was
    # zmq_listening_total, whose OpenMetrics family clashed with the gauge zmq_listening).
    assert parsed["zmq_bind_succeeded"].type == "counter"
    assert parsed["zmq_listening"].type == "gauge"
    assert parsed["zmq_accepted"].type == "counter"
    assert parsed["zmq_exporter_scrape_duration_seconds"].type == "histogram"
    assert parsed["zmq_exporter_other"].samples[0].labels == {"k": 'v"\\'}


def test_engine_reuses_snapshots_of_idle_sockets() -> None:
    ports = [free_port() for _ in range(3)]
    config = "sockets:\n" + "".join(
        f"  - {{name: s{i}, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
        for i, port in enumerate(ports)
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    engine = Engine(ctx)
    engine.start()
    try:
        engine.apply(parse_config(config, "inline.yml")).result(10)

        def listening() -> bool:
            return all(s.endpoints[0].listening for s in engine.snapshot().sockets)

        wait_until(listening, what="every socket listening")
        first = engine.snapshot().sockets
        assert all(a is b for a, b in zip(first, engine.snapshot().sockets, strict=True))
        renderer = SocketText()
        text = renderer.render(first)
        assert renderer.render(engine.snapshot().sockets) == text and renderer.built == 3

        peer = socket.create_connection(("127.0.0.1", ports[1]))
        wait_until(
            lambda: engine.snapshot().sockets[1].endpoints[0].counts[Event.ACCEPTED] == 1,
            what="accepted",
        )
        second = engine.snapshot().sockets
        assert second[0] is first[0] and second[2] is first[2]
        assert second[1] is not first[1] and second[1].events > first[1].events
        # Only the socket that had events is rendered again; the idle ones' lines are kept.
        assert renderer.render(second) != text and renderer.built == 4
        peer.close()

        # A removed socket leaves the cache (the engine keeps nothing of it alive); a
        # recreated one gets a snapshot of its own.
        gone = weakref.ref(first[2])
        two_sockets = "\n".join(config.splitlines()[:3])
        engine.apply(parse_config(two_sockets, "inline.yml")).result(10)
        assert [s.name for s in engine.snapshot().sockets] == ["s0", "s1"]
        del first, second, renderer
        gc.collect()
        assert gone() is None, "the engine keeps a removed socket's snapshot alive"
        config = config.replace("name: s2, type: ROUTER", "name: s2, type: DEALER")
        engine.apply(parse_config(config, "inline.yml")).result(10)
        third = engine.snapshot().sockets
        assert third[2].socket_type == "DEALER" and third[2].endpoints[0].role == "bind"
    finally:
        engine.stop()
        ctx.term()


def test_daemon_scrape_passes_promtool_and_both_parsers() -> None:
    ports = [free_port() for _ in range(4)]
    config = textwrap.dedent(f"""\
        global:
          labels: {{site: "a\\\\b \\"c\\""}}
        sockets:
          - name: frontend
            type: ROUTER
            bind: [tcp://127.0.0.1:{ports[0]}, tcp://127.0.0.1:{ports[1]}]
            labels: {{tier: edge}}
          - name: backend
            type: DEALER
            bind: [tcp://127.0.0.1:{ports[2]}]
            connect: [tcp://127.0.0.1:{ports[3]}]
          - name: pub
            type: PUB
            connect: [tcp://127.0.0.1:{ports[0]}]
        """)
    promtool = tool("promtool")
    with Daemon(config) as daemon:
        peer = socket.create_connection(("127.0.0.1", ports[0]))
        try:
            wait_until(
                lambda: (
                    'zmq_accepted_total{endpoint="tcp://127.0.0.1:'
                    in http_get(daemon.url + "/metrics")
                ),
                what="accepted",
            )
            text = http_get(daemon.url + "/metrics")
            om = http_get(daemon.url + "/metrics", {"Accept": PROMETHEUS_3})
        finally:
            peer.close()
    for body, content_type in ((text, "text"), (om, "openmetrics")):
        families = {
            f.name: f
            for f in (parse_text(body) if content_type == "text" else parse_openmetrics(body))
        }
        info = families["zmq_socket_info"].samples
        assert {s.labels["socket"] for s in info} == {"frontend", "backend", "pub"}
        assert all(s.labels["site"] == 'a\\b "c"' for s in info)
        assert "zmq_exporter_scrape_duration_seconds" in families
        assert "zmq_exporter_build_info" in families
        assert "process_cpu_seconds" in families or "process_cpu_seconds_total" in families
    # promtool lints the text format only (it has no OpenMetrics parser).
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert om.count("# EOF") == 1 and om.endswith("# EOF\n")


def test_trimmer_trims_once_after_many_rebuilt_sockets() -> None:
    """A render that rebuilt `threshold` sockets arms a trim, which the next render does
    (its garbage is only freed once its response is sent); idle renders never trim."""
    trimmer = Trimmer(threshold=10, min_interval=0)
    assert not trimmer.note(5)  # 5 rebuilt: not armed
    assert not trimmer.note(12)  # armed by this render
    assert trimmer.note(12) is trim_available()  # trimmed (where libc can), disarmed
    assert not trimmer.note(12) and not trimmer.note(21)  # 9 more: not armed
    assert not trimmer.note(22) and trimmer.note(22) is trim_available()
    # At most once per min_interval: armed again at once, but not due.
    slow = Trimmer(threshold=1, min_interval=3600)
    assert not slow.note(1) and slow.note(2) is trim_available()
    assert not slow.note(3) and not slow.note(4) and slow.trims == int(trim_available())


def trim_available() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_scrapes_after_churn_trim_once() -> None:
    """/metrics' renderer (`StateCollector.prerender`): the scrape after one that rebuilt
    over a thousand relayed sockets trims; warm scrapes do not."""
    sockets = [relayed(f"proc-{p}", f"s{n}", 1) for p in range(60) for n in range(20)]
    snap = EngineSnapshot(tuple(sockets), ReaderStats(), True)
    state = StateCollector(lambda: snap, build_labels())
    state.prerender(False)  # 1,200 rebuilt: armed
    assert state.trimmer.trims == 0
    state.prerender(False)
    state.prerender(True)
    assert state.trimmer.trims == int(trim_available())
