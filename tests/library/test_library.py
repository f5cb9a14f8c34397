"""Library mode (exporter.instrument): an application's own sockets, watched in its process.

Real sockets, real storms from a separate load process, the kernel's connection table as
the independent witness. Each misuse case runs in a child process with a deadline: a hang
fails the test instead of hanging the suite, and each child has a process-wide reader of
its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Generator

import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from test_storm import STORM, STORM_CONNECT, PingPong

import exporter
from exporter import library
from exporter.core import metrics

from helpers import ROOT, Samples, http_get, parse_metrics, value
from testkit import LoadGen, established, free_port, wait_until

Ctx = zmq.Context[zmq.Socket[bytes]]


def scrape(registry: CollectorRegistry) -> Samples:
    return parse_metrics(generate_latest(registry).decode())


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == library.READER_THREAD]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def run_child(code: str, prelude: str = "", timeout: float = 30) -> str:
    """Run `prelude` then `code` in a fresh interpreter within `timeout` seconds (the
    test's deadline); it must print OK last."""
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), out
    return out


# -- cost of importing ----------------------------------------------------------------------


def test_import_is_cheap_and_starts_nothing() -> None:
    out = run_child("""\
        import sys, threading, time
        t = time.perf_counter()
        import exporter
        took = time.perf_counter() - t
        assert threading.active_count() == 1, threading.enumerate()
        loaded = [m for m in ("zmq", "prometheus_client", "exporter.library", "pydantic")
                  if m in sys.modules]
        assert not loaded, loaded
        assert callable(exporter.instrument)  # loaded on first use
        assert "exporter.library" in sys.modules and threading.active_count() == 1
        print(f"import exporter: {took * 1e3:.2f} ms")
        print("OK")
        """)
    # Cheap means none of the heavy modules is loaded (asserted in the child: importing
    # zmq, prometheus_client and pydantic takes 100-150 ms); the time bound only catches
    # a gross regression and holds on a loaded machine.
    ms = float(out.split("import exporter: ")[1].split(" ms")[0])
    assert ms < 250, out
    print(out.strip())


# -- exactness ------------------------------------------------------------------------------


def test_router_counts_equal_the_kernel_and_labels_are_the_endpoints_given(
    ctx: Ctx, registry: CollectorRegistry
) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(router, "backend", labels={"team": "payments"}, registry=registry)
    try:
        handle.bind("tcp://127.0.0.1:*")  # labelled as given, as the daemon does
        port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        plain = free_port()
        router.bind(f"tcp://127.0.0.1:{plain}")  # not through the handle: learned
        k = 30
        dealers = []
        for i in range(k):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{port if i % 3 else plain}")
            dealers.append(dealer)
        given, learned = "tcp://127.0.0.1:*", f"tcp://127.0.0.1:{plain}"
        n_given = sum(1 for i in range(k) if i % 3)

        def counted(on_given: int, on_learned: int) -> bool:
            m = scrape(registry)
            return (
                value(m, "zmq_connections", socket="backend", endpoint=given) == on_given
                and value(m, "zmq_connections", socket="backend", endpoint=learned) == on_learned
                and established(port) == on_given
                and established(plain) == on_learned
            )

        wait_until(lambda: counted(n_given, k - n_given), what="all connections counted")
        m = scrape(registry)
        assert value(m, "zmq_accepted_total", endpoint=given, team="payments") == n_given
        assert value(m, "zmq_handshake_succeeded_total", endpoint=learned) == k - n_given
        assert value(m, "zmq_listening", endpoint=given) == 1
        assert value(m, "zmq_socket_info", socket="backend", type="ROUTER") == 1
        for dealer in dealers[:12]:
            dealer.close()
        closed_given = sum(1 for i in range(12) if i % 3)
        wait_until(
            lambda: counted(n_given - closed_given, k - n_given - (12 - closed_given)),
            what="closed connections uncounted",
        )
        for dealer in dealers[12:]:
            dealer.close()
        wait_until(lambda: counted(0, 0), what="all gone")
        m = scrape(registry)
        assert value(m, "zmq_disconnected_total", endpoint=given) == n_given
        assert value(m, "zmq_events_total") is None  # the daemon's families only
        assert value(m, "zmq_exporter_events_processed_total") is not None
    finally:
        handle.close()
        router.close()
    assert value(scrape(registry), "zmq_socket_info", socket="backend") is None


def test_storm_never_stalls_the_application_and_counts_exactly(
    ctx: Ctx, registry: CollectorRegistry
) -> None:
    """20,000 connects against an instrumented ROUTER while the application's own
    ping-pong in the same context never misses its deadline (test_storm.PingPong); counts equal
    the load's tally."""
    port = free_port()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.BACKLOG, 4096)  # as a busy server has (see test_storm.py)
    handle = exporter.instrument(router, "storm", registry=registry)
    handle.bind(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def serve() -> None:  # the application reads its ROUTER (a raw TCP peer sends nothing)
        for _ in range(10_000_000):
            if stop.is_set():
                return
            if router.poll(50):
                router.recv_multipart()

    server = threading.Thread(target=serve)
    ping = PingPong(ctx)
    pinger = threading.Thread(target=ping.run)
    server.start()
    pinger.start()
    try:
        wait_until(lambda: len(ping.rtts) >= 5, what="ping-pong running")
        tally = LoadGen(port, STORM, deadline=120, connect_timeout=STORM_CONNECT).tally()
        ping.stop.set()
        pinger.join(10)
        endpoint = f"tcp://127.0.0.1:{port}"

        def accepted() -> float | None:
            return value(scrape(registry), "zmq_accepted_total", endpoint=endpoint)

        wait_until(lambda: accepted() == tally.completed, timeout=60, what="accepted == tally")
        m = scrape(registry)
        assert tally.completed == STORM, tally
        assert value(m, "zmq_disconnected_total", endpoint=endpoint) == STORM
        wait_until(lambda: established(port) == 0, what="kernel: all closed")
        assert value(m, "zmq_connections", endpoint=endpoint) == 0
        assert ping.misses == 0, (ping.misses, ping.deadline, max(ping.rtts))
        assert len(ping.rtts) >= 20
        print(
            f"storm {tally}, pings {len(ping.rtts)}, max rtt {max(ping.rtts) * 1e3:.1f} ms, "
            f"backlog max {value(m, 'zmq_exporter_reader_backlog_max_events')}"
        )
    finally:
        ping.stop.set()
        stop.set()
        pinger.join(10)
        server.join(10)
        handle.close()
        router.close()


# -- contexts: one reader for all -----------------------------------------------------------


def _echo_pair(ctx: Ctx, registry: CollectorRegistry, name: str) -> Generator[int]:
    """An instrumented ROUTER and 3 DEALERs in `ctx`; yields the ROUTER's port while they
    are connected, then closes them in the safe order."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(router, name, registry=registry)
    port = free_port()
    handle.bind(f"tcp://127.0.0.1:{port}")
    dealers = [ctx.socket(zmq.DEALER) for _ in range(3)]
    for dealer in dealers:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield port
    finally:
        for dealer in dealers:
            dealer.close()
        handle.close()
        router.close()


def test_several_contexts_and_the_global_instance_share_one_reader(
    registry: CollectorRegistry,
) -> None:
    contexts: list[Ctx] = [zmq.Context.instance(), zmq.Context(), zmq.Context()]
    pairs = [_echo_pair(c, registry, f"ctx{i}") for i, c in enumerate(contexts)]
    try:
        ports = [next(p) for p in pairs]

        def all_counted() -> bool:
            m = scrape(registry)
            return all(
                value(m, "zmq_connections", socket=f"ctx{i}") == 3 == established(port)
                for i, port in enumerate(ports)
            )

        wait_until(all_counted, what="3 connections per context")
        assert len(reader_threads()) == 1
    finally:
        for p in pairs:
            p.close()
        for c in contexts[1:]:
            c.term()
    assert len(reader_threads()) == 1


def test_asyncio_sockets(registry: CollectorRegistry) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        handle = exporter.instrument(router, "aio", registry=registry)
        port = free_port()
        handle.bind(f"tcp://127.0.0.1:{port}")
        dealers = [ctx.socket(zmq.DEALER) for _ in range(4)]
        try:
            for dealer in dealers:
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(f"tcp://127.0.0.1:{port}")
            for i, dealer in enumerate(dealers):  # round trips through the event loop
                await dealer.send(b"%d" % i)
                ident, body = await asyncio.wait_for(router.recv_multipart(), 5)
                await router.send_multipart([ident, body])
                assert await asyncio.wait_for(dealer.recv(), 5) == b"%d" % i
            for _ in range(250):
                if value(scrape(registry), "zmq_connections", socket="aio") == 4:
                    break
                await asyncio.sleep(0.02)
            assert value(scrape(registry), "zmq_connections", socket="aio") == 4
            assert established(port) == 4
        finally:
            for dealer in dealers:
                dealer.close()
            handle.close()
            router.close()
            ctx.term()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert len(reader_threads()) == 1


def test_meter_provider_observes_the_daemons_otlp_names(
    ctx: Ctx, registry: CollectorRegistry
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

    otel = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[otel])
    with _socket_and_handle(ctx, registry, provider) as port:
        wait_until(lambda: value(scrape(registry), "zmq_connections", socket="otel") == 2)
        data = otel.get_metrics_data()
        assert data is not None
        got = {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }
        pushed = {f.otel_name for f in metrics.PUSHED}
        # The SDK leaves out an instrument without points (no failure happened yet).
        assert set(got) <= pushed, set(got) - pushed
        assert {metrics.ACCEPTED.otel_name, metrics.SOCKET_INFO.otel_name} <= set(got)
        conn = metrics.CONNECTIONS.otel_name
        assert conn is not None
        points = [
            (p.value, dict(p.attributes or {}))
            for p in got[conn].data.data_points
            if isinstance(p, NumberDataPoint) and (p.attributes or {}).get("socket") == "otel"
        ]
        assert [v for v, _ in points] == [2] == [established(port)]
        assert points[0][1]["endpoint"] == f"tcp://127.0.0.1:{port}"
        assert points[0][1]["team"] == "x"
    provider.shutdown()


class _socket_and_handle:
    def __init__(self, ctx: Ctx, registry: CollectorRegistry, provider: object) -> None:
        self.ctx, self.registry, self.provider = ctx, registry, provider

    def __enter__(self) -> int:
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.handle = exporter.instrument(
            self.router,
            "otel",
            labels={"team": "x"},
            registry=self.registry,
            meter_provider=self.provider,  # type: ignore[arg-type]
        )
        port = free_port()
        self.handle.bind(f"tcp://127.0.0.1:{port}")
        self.dealers = [self.ctx.socket(zmq.DEALER) for _ in range(2)]
        for dealer in self.dealers:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{port}")
        return port

    def __exit__(self, *exc: object) -> None:
        for dealer in self.dealers:
            dealer.close()
        self.handle.close()
        self.router.close()


# -- misuse: each works or raises a clear exception, and nothing hangs -----------------------

PRELUDE = """\
import os, sys, threading, time
import zmq, zmq.asyncio
import exporter
from exporter import library
from prometheus_client import CollectorRegistry, generate_latest
sys.path[:0] = ["tests", "."]
from helpers import parse_metrics, value
from testkit import established, wait_until
reg = CollectorRegistry()
def scrape():
    return parse_metrics(generate_latest(reg).decode())
def router(ctx, name):
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    h = exporter.instrument(s, name, registry=reg)
    h.bind("tcp://127.0.0.1:*")
    return s, h, int(s.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
def dealer(ctx, port):
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://127.0.0.1:{port}")
    return d
def status(name):
    return library.reader().watching(name).result(5)
def child_exit_code(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    raise AssertionError("child did not finish")
"""


def test_socket_closed_without_close_then_term_returns() -> None:
    run_child(
        """\
        ctx = zmq.Context()
        s, h, port = router(ctx, "a")
        d = dealer(ctx, port)
        wait_until(lambda: value(scrape(), "zmq_connections", socket="a") == 1)
        s.close()  # no h.close(): the monitor stops, the reader closes its PAIR
        wait_until(lambda: status("a") == "stopped", what="PAIR closed by the reader")
        m = scrape()
        assert value(m, "zmq_connections", socket="a") == 0
        assert value(m, "zmq_accepted_total", socket="a") == 1  # counters stay
        d.close()
        t = time.monotonic(); ctx.term(); took = time.monotonic() - t
        assert took < 1, took
        h.close(); h.close()  # after the fact, and twice: fine
        assert value(scrape(), "zmq_socket_info", socket="a") is None
        # The name is free again once its socket is closed, even without close().
        ctx2 = zmq.Context()
        s2, h2, _ = router(ctx2, "b")
        s2.close()
        wait_until(lambda: status("b") == "stopped")
        s3, h3, _ = router(ctx2, "b")  # takes over the name
        assert h2.closed and not h3.closed
        h3.close(); s3.close(); ctx2.term()
        print("OK")
        """,
        PRELUDE,
    )


@pytest.mark.parametrize("how", ["term", "destroy", "asyncio"])
def test_context_terminated_with_instrumented_sockets_open(how: str) -> None:
    run_child(
        f"""\
        how = {how!r}
        ctx = zmq.asyncio.Context() if how == "asyncio" else zmq.Context()
        sync = zmq.Context.shadow(ctx.underlying) if how == "asyncio" else ctx
        s, h, port = router(ctx, "t")
        d = dealer(sync, port)
        wait_until(lambda: value(scrape(), "zmq_connections", socket="t") == 1)
        ended = []
        def worker():  # the application's thread, blocked in recv on its sockets
            try:
                d.recv()
            except zmq.ContextTerminated:
                ended.append("eterm")
            d.close()
            s.close()  # the app closes its sockets after ETERM; never calls h.close()
        if how != "destroy":
            app = threading.Thread(target=worker, daemon=True)
            app.start()
            # Blocked in recv: the thread waits in the kernel's poll (libzmq's mailbox).
            wchan = f"/proc/self/task/{{app.native_id}}/wchan"
            wait_until(lambda: "poll" in open(wchan).read(), what="the app blocked in recv")
        t = time.monotonic()
        if how == "destroy":
            ctx.destroy(linger=0)  # closes the app's sockets, then term()
        else:
            ctx.term()
        took = time.monotonic() - t
        assert took < 10, took  # returns (a term held up by the monitors never does)
        assert status("t") in ("stopped", "terminated"), status("t")
        h.close()
        print(how, f"term took {{took * 1e3:.1f}} ms", ended)
        print("OK")
        """,
        PRELUDE,
    )


def test_fork_after_instrumenting() -> None:
    run_child(
        """\
        ctx = zmq.Context()
        s, h, port = router(ctx, "parent")
        d = dealer(ctx, port)
        wait_until(lambda: value(scrape(), "zmq_connections", socket="parent") == 1)
        pid = os.fork()
        if pid == 0:  # the child: new context, new sockets, instrumented again
            code = 1
            try:
                t = time.monotonic()
                h.close()  # inherited: does nothing, touches nothing
                # returns at once (bounded loosely for a loaded machine): no join of
                # the parent's threads, which do not exist in the child
                assert time.monotonic() - t < 2 and library.reader() is None
                assert value(scrape(), "zmq_socket_info", socket="parent") is None
                c2 = zmq.Context()
                s2, h2, port2 = router(c2, "child")
                d2 = dealer(c2, port2)
                wait_until(lambda: value(scrape(), "zmq_connections", socket="child") == 1)
                assert established(port2) == 1
                d2.close(); h2.close(); s2.close(); c2.term()
                code = 0
            finally:
                os._exit(code)
        assert child_exit_code(pid) == 0
        d3 = dealer(ctx, port)  # the parent goes on counting
        wait_until(lambda: value(scrape(), "zmq_connections", socket="parent") == 2)
        assert established(port) == 2
        d.close(); d3.close(); h.close(); s.close(); ctx.term()
        print("OK")
        """,
        PRELUDE,
    )


def test_same_socket_twice_closed_socket_and_name_in_use_raise() -> None:
    run_child(
        """\
        from exporter import InstrumentError
        ctx = zmq.Context()
        s, h, port = router(ctx, "one")
        def raises(fn, text):
            try:
                fn()
            except InstrumentError as err:
                assert text in str(err), err
                return
            raise AssertionError(f"no InstrumentError ({text})")
        raises(lambda: exporter.instrument(s, "two", registry=reg), "instrumented already")
        other = ctx.socket(zmq.DEALER)
        raises(lambda: exporter.instrument(other, "one", registry=reg), "in use")
        raises(lambda: exporter.instrument(other, "x", labels={"socket": "y"}), "reserved")
        raises(lambda: exporter.instrument(other, "x", events=["nope"]), "unknown event")
        # Untouched by the above:
        wait_until(lambda: value(scrape(), "zmq_listening", socket="one") == 1)
        h.close()
        h2 = exporter.instrument(s, "two", registry=reg)  # after close(): fine
        h2.close()
        s.close()
        raises(lambda: exporter.instrument(s, "three", registry=reg), "closed")
        other.close()
        ctx.term()
        raises(lambda: exporter.instrument(other, "four", registry=reg), "closed")
        print("OK")
        """,
        PRELUDE,
    )


# -- examples -------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["router_service.py", "asyncio_service.py"])
def test_examples_serve_their_metrics(script: str, ctx: Ctx) -> None:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline()
        dealers = [ctx.socket(zmq.DEALER) for _ in range(3)]
        for dealer in dealers:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.RCVTIMEO, 5000)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"hello")
            assert dealer.recv() == b"hello"
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def connections() -> float | None:
            return value(parse_metrics(http_get(url)), "zmq_connections")

        wait_until(lambda: connections() == 3 == established(port), what="3 connections")
        m = parse_metrics(http_get(url))
        assert value(m, "zmq_accepted_total", endpoint=f"tcp://127.0.0.1:{port}") == 3
        for dealer in dealers:
            dealer.close()
        wait_until(lambda: connections() == 0, what="connections closed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# -- learning endpoints (pure) --------------------------------------------------------------


def test_learned_endpoints_are_bounded_and_mapped_back() -> None:
    from exporter.core.endpoints import UNMAPPED, LearningEndpointMap
    from exporter.core.events import Event
    from exporter.core.state import SocketState, apply_event, record_endpoint

    sock = SocketState("s", "ROUTER", {}, LearningEndpointMap((), (), limit=3))
    apply_event(sock, Event.CONNECT_DELAYED, 115, "tcp://localhost:6000", 0)
    apply_event(sock, Event.CONNECTED, 9, "tcp://localhost:6000", 0)
    apply_event(sock, Event.DISCONNECTED, 9, "tcp://127.0.0.1:6000", 0)  # drift
    apply_event(sock, Event.LISTENING, 5, "tcp://127.0.0.1:6000", 0)  # a bind, same port
    apply_event(sock, Event.CLOSED, 0, "", 0)
    apply_event(sock, Event.BIND_FAILED, 98, "127.0.0.1:7000", 0)  # no scheme
    # The cap: a fourth endpoint counts as unmapped, and so does a handle.bind() beyond it.
    apply_event(sock, Event.LISTENING, 6, "ipc:///tmp/x", 0)
    assert not record_endpoint(sock, "tcp://*:8000", "bind", "tcp://0.0.0.0:8000")
    eps = {label: state for label, state in sock.endpoints.items()}
    assert list(eps) == [
        "tcp://localhost:6000",
        "tcp://127.0.0.1:6000",
        "tcp://127.0.0.1:7000",
        UNMAPPED,
    ]
    connect = eps["tcp://localhost:6000"]
    assert connect.role == "connect" and connect.counts[Event.DISCONNECTED] == 1
    assert not connect.live_fds
    assert eps["tcp://127.0.0.1:6000"].role == "bind"
    failed = eps["tcp://127.0.0.1:7000"]
    assert failed.role == "bind" and failed.counts[Event.CLOSED] == 1
    assert eps[UNMAPPED].counts[Event.LISTENING] == 1

    # handle.bind(): the string given, with a configured endpoint's series from start.
    sock = SocketState("t", "ROUTER", {}, LearningEndpointMap((), ()))
    assert record_endpoint(sock, "tcp://*:8000", "bind", "tcp://0.0.0.0:8000")
    assert sock.endpoints["tcp://*:8000"].counts[Event.ACCEPTED] == 0  # exists at 0
    apply_event(sock, Event.LISTENING, 5, "tcp://0.0.0.0:8000", 0)
    apply_event(sock, Event.ACCEPTED, 7, "tcp://0.0.0.0:8000", 0)
    assert list(sock.endpoints) == ["tcp://*:8000"]
    assert sock.endpoints["tcp://*:8000"].live_fds == {7}


def test_events_restricts_what_is_counted(ctx: Ctx, registry: CollectorRegistry) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    with exporter.instrument(router, "only-accepted", events=["accepted"], registry=registry) as h:
        port = free_port()
        h.bind(f"tcp://127.0.0.1:{port}")
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        wait_until(lambda: value(scrape(registry), "zmq_accepted_total", socket="only-accepted"))
        m = scrape(registry)
        assert value(m, "zmq_accepted_total", socket="only-accepted") == 1
        assert value(m, "zmq_handshake_succeeded_total", socket="only-accepted") == 0
        dealer.close()
    router.close()
