"""Message counting in library mode (`instrument(sock, name, messages=True)`): every send
and receive path of pyzmq counts exactly what an uncounted peer tallies (messages and
payload bytes, frame by frame), backpressure is counted, and a counted socket behaves and
looks like the application's own (a socket not counted is not touched at all).

Real sockets on loopback; the peer that tallies is a plain, uncounted socket.
"""

from __future__ import annotations

import array
import asyncio
import importlib.util
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

import exporter
from exporter import messages as message_counting
from exporter.core import metrics

from helpers import Samples, missing_tool, parse_metrics, value
from testkit import wait_until

Ctx = zmq.Context[zmq.Socket[bytes]]
Sock = zmq.Socket[Any]
# Messages of each test: singles and multipart, empty frames included.
PAYLOADS: list[list[bytes]] = [
    [b"a" * 100],
    [b""],
    [b"head", b"x" * 3000, b""],
    [b"z" * 70000],
    [b"1", b"22"],
]


def scrape(registry: CollectorRegistry) -> Samples:
    return parse_metrics(generate_latest(registry).decode())


def tally(frames: list[list[bytes]]) -> tuple[int, int]:
    return len(frames), sum(len(f) for msg in frames for f in msg)


@pytest.fixture(autouse=True, params=["compiled", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both wrappers (exporter/messages/_counting.c and the Python functions
    of exporter/messages/__init__.py): they must count alike."""
    name: str = request.param
    if name == "compiled":
        if message_counting.IMPLEMENTATION != "compiled":
            missing_tool(
                "exporter.messages._counting (built at install with gcc and Python's headers)"
            )
    else:
        monkeypatch.setattr(message_counting, "_compiled", None)
    return name


# Prepended to a subprocess's script: the wrapper the test's parameter names ("python": as
# installed without a compiler, the extension absent).
SELECT = {
    "compiled": "",
    "python": "import sys; sys.modules['exporter.messages._counting'] = None\n",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def pair(ctx: Ctx) -> Iterator[tuple[Sock, Sock]]:
    """(counted-to-be PAIR, plain peer PAIR), connected over tcp."""
    mine, peer = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (mine, peer):
        s.linger = 0
        s.rcvtimeo = s.sndtimeo = 10_000  # a lost message fails, never hangs
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    mine.connect(f"tcp://127.0.0.1:{port}")
    yield mine, peer
    mine.close()
    peer.close()


def peer_receive(peer: Sock, n: int) -> list[list[bytes]]:
    return [peer.recv_multipart() for _ in range(n)]


def peer_send(peer: Sock, messages: list[list[bytes]]) -> None:
    for msg in messages:
        peer.send_multipart(msg)


# -- sending paths: the counted socket sends, the peer tallies what arrives ------------------

SEND_PATHS: dict[str, Callable[[Sock], int]] = {}


def send_path(fn: Callable[[Sock], int]) -> Callable[[Sock], int]:
    SEND_PATHS[fn.__name__] = fn
    return fn


@send_path
def send_bytes(s: Sock) -> int:
    for msg in PAYLOADS:
        for frame in msg[:-1]:
            s.send(frame, zmq.SNDMORE)
        s.send(msg[-1])
    return len(PAYLOADS)


@send_path
def send_copy_false_and_frames(s: Sock) -> int:
    for msg in PAYLOADS:
        for frame in msg[:-1]:
            s.send(zmq.Frame(frame), zmq.SNDMORE, copy=False)
        tracker = s.send(msg[-1], copy=False, track=True)
        assert isinstance(tracker, zmq.MessageTracker)
    return len(PAYLOADS)


@send_path
def send_buffers(s: Sock) -> int:
    ints = array.array("i", range(100))  # 400 bytes, itemsize 4
    s.send(memoryview(ints), zmq.SNDMORE)
    s.send(bytearray(b"b" * 33), zmq.SNDMORE)
    s.send(memoryview(b"m" * 10)[2:])
    return 1


@send_path
def send_multipart(s: Sock) -> int:
    for msg in PAYLOADS:
        s.send_multipart(msg)
    s.send_multipart([zmq.Frame(b"f" * 5), memoryview(b"g" * 7)], copy=False)
    return len(PAYLOADS) + 1


@send_path
def send_string_json_pyobj_serialized(s: Sock) -> int:
    s.send_string("héllo")
    s.send_json({"a": [1, 2, 3], "b": "ç"})
    s.send_pyobj({"x": list(range(50))})
    s.send_serialized(["p", "q"], lambda m: [x.encode() * 10 for x in m])
    return 4


@pytest.mark.parametrize("path", sorted(SEND_PATHS))
def test_send_paths_count_what_the_peer_receives(
    pair: tuple[Sock, Sock], registry: CollectorRegistry, path: str
) -> None:
    mine, peer = pair
    handle = exporter.instrument(mine, "sender", registry=registry, messages=True)
    try:
        n = SEND_PATHS[path](mine)
        got = tally(peer_receive(peer, n))
        counts = handle.message_counts
        assert counts is not None
        assert (counts.sent, counts.bytes_sent) == got
        assert (counts.received, counts.bytes_received, counts.would_block) == (0, 0, 0)
        samples = scrape(registry)
        assert value(samples, "zmq_messages_sent_total", socket="sender") == got[0]
        assert value(samples, "zmq_message_bytes_sent_total", socket="sender") == got[1]
    finally:
        handle.close()


# -- receiving paths: the peer sends and tallies, the counted socket receives -----------------

RECV_PATHS: dict[str, Callable[[Sock, int], None]] = {}


def recv_path(fn: Callable[[Sock, int], None]) -> Callable[[Sock, int], None]:
    RECV_PATHS[fn.__name__] = fn
    return fn


@recv_path
def recv_frames(s: Sock, n: int) -> None:
    for _ in range(n):
        s.recv()
        while s.rcvmore:
            s.recv()


@recv_path
def recv_copy_false(s: Sock, n: int) -> None:
    for _ in range(n):
        while True:
            frame = s.recv(copy=False)
            assert isinstance(frame, zmq.Frame)
            if not frame.more:
                break


@recv_path
def recv_multipart(s: Sock, n: int) -> None:
    for i in range(n):
        s.recv_multipart(0, i % 2 == 0)


@recv_path
def recv_into(s: Sock, n: int) -> None:
    buf = bytearray(100)  # smaller than some frames: truncated, counted at full size
    for _ in range(n):
        s.recv_into(buf)
        while s.rcvmore:
            s.recv_into(buf, nbytes=10)


@recv_path
def recv_string_json_pyobj_serialized(s: Sock, n: int) -> None:
    assert n == 4
    assert s.recv_string() == "héllo"
    assert s.recv_json() == {"k": 1}
    assert s.recv_pyobj() == [1, 2]
    assert s.recv_serialized(lambda frames: len(frames)) == 2


@pytest.mark.parametrize("path", sorted(RECV_PATHS))
def test_recv_paths_count_what_the_peer_sent(
    pair: tuple[Sock, Sock], registry: CollectorRegistry, path: str
) -> None:
    mine, peer = pair
    handle = exporter.instrument(mine, "receiver", registry=registry, messages=True)
    try:
        if path == "recv_string_json_pyobj_serialized":
            sent = [
                ["héllo".encode()],
                [zmq.utils.jsonapi.dumps({"k": 1})],
                [pickle.dumps([1, 2], pickle.DEFAULT_PROTOCOL)],
                [b"a", b"bb"],
            ]
        else:
            sent = PAYLOADS * 3
        peer_send(peer, sent)
        RECV_PATHS[path](mine, len(sent))
        counts = handle.message_counts
        assert counts is not None
        assert (counts.received, counts.bytes_received) == tally(sent)
        assert (counts.sent, counts.bytes_sent) == (0, 0)
        samples = scrape(registry)
        assert value(samples, "zmq_messages_received_total", socket="receiver") == len(sent)
        assert (
            value(samples, "zmq_message_bytes_received_total", socket="receiver")
            == (tally(sent)[1])
        )
    finally:
        handle.close()


# -- backpressure ---------------------------------------------------------------------------


def test_would_block_and_blocked_seconds(ctx: Ctx, registry: CollectorRegistry) -> None:
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    handle = exporter.instrument(push, "push", registry=registry, messages=True)
    counts = handle.message_counts
    assert counts is not None
    try:
        for _ in range(3):  # no peer: NOBLOCK fails at once
            with pytest.raises(zmq.Again):
                push.send(b"x", zmq.NOBLOCK)
        assert (counts.would_block, counts.sent, counts.blocked_seconds) == (3, 0, 0.0)
        push.sndtimeo = 100  # a blocking send that times out: blocked, then Again
        started = time.perf_counter()
        with pytest.raises(zmq.Again):
            push.send(b"x")
        took = time.perf_counter() - started
        assert counts.would_block == 4 and 0.05 < counts.blocked_seconds <= took

        # A peer that drains late: the blocking send waits for it, and only that wait is
        # counted (the sends that found room read no clock).
        push.sndtimeo = -1
        push.sndhwm = 1
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        pull.rcvhwm = 1
        # inproc: no kernel buffer behind the pipe, so a full pipe stays full.
        pull.bind("inproc://blocked-seconds")
        push.connect("inproc://blocked-seconds")
        release = threading.Event()
        received: list[bytes] = []

        def drain() -> None:
            release.wait(10)
            pull.rcvtimeo = 10_000
            received.extend(pull.recv() for _ in range(sent))

        sent = 0
        before = counts.blocked_seconds
        while True:  # fill the pipe: until a NOBLOCK send would block (bounded)
            try:
                push.send(b"y" * 10, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
            assert sent < 10_000
        assert counts.blocked_seconds == before and counts.would_block == 5
        sent += 1
        reader = threading.Thread(target=drain)
        reader.start()
        timer = threading.Timer(0.3, release.set)
        timer.start()
        started = time.perf_counter()
        push.send(b"y" * 10)  # blocks until the reader drains
        took = time.perf_counter() - started
        reader.join(20)
        assert len(received) == sent == counts.sent
        assert counts.bytes_sent == 10 * sent
        blocked = counts.blocked_seconds - before
        assert 0.1 < blocked <= took
        samples = scrape(registry)
        assert value(samples, "zmq_send_would_block_total", socket="push") == 5
        assert value(samples, "zmq_send_blocked_seconds_total", socket="push") == (
            counts.blocked_seconds
        )
        pull.close()
    finally:
        handle.close()


# -- the socket stays the application's ---------------------------------------------------------


def test_counted_socket_looks_and_behaves_as_its_own(ctx: Ctx, registry: CollectorRegistry) -> None:
    sub = ctx.socket(zmq.SUB)
    own_class, own_dict = type(sub), dict(vars(sub))
    own_repr = repr(sub)
    with pytest.raises(TypeError) as own_error:
        pickle.dumps(sub)
    with pytest.raises(TypeError) as own_send_error:
        sub.send("text")  # type: ignore[call-overload]
    # Counting off: the object is untouched.
    handle = exporter.instrument(sub, "plain", registry=registry)
    assert type(sub) is own_class and vars(sub) == own_dict and handle.message_counts is None
    assert value(scrape(registry), "zmq_messages_received_total") is None
    handle.close()
    own_dict = dict(vars(sub))  # disable_monitor() keeps `_monitor_socket` (pyzmq's own)

    handle = exporter.instrument(sub, "sub", registry=registry, messages=True)
    try:
        assert isinstance(sub, zmq.Socket) and isinstance(sub, own_class)
        assert type(sub).__name__ == own_class.__name__
        assert type(sub).__module__ == own_class.__module__
        assert repr(sub) == own_repr and vars(sub) == own_dict
        with pytest.raises(TypeError) as error:
            pickle.dumps(sub)
        assert str(error.value) == str(own_error.value)
        sub.rcvhwm = 7  # option attributes
        assert sub.rcvhwm == 7 and sub.getsockopt(zmq.RCVHWM) == 7
        sub.subscribe = b"topic"  # type: ignore[assignment,method-assign]  # pyzmq's setter
        sub.subscribe(b"other")
        assert sub.recv.__doc__ == own_class.recv.__doc__
        with pytest.raises(zmq.Again):  # errors are the socket's own
            sub.recv(zmq.NOBLOCK)
        with pytest.raises(TypeError) as error:
            sub.send("text")  # type: ignore[call-overload]
        assert str(error.value) == str(own_send_error.value)
        # Twice: the same counts, one subclass deep.
        assert message_counting.count(sub) is handle.message_counts
        assert type(sub).__mro__[1] is own_class
    finally:
        handle.close()
    assert type(sub) is own_class and vars(sub) == own_dict
    sub.close()


def test_meter_provider_and_labels(ctx: Ctx, registry: CollectorRegistry) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

    otel = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[otel])
    mine, peer = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    handle = exporter.instrument(
        mine,
        "dealer",
        labels={"team": "t"},
        registry=registry,
        meter_provider=provider,
        messages=True,
    )
    try:
        handle.connect(f"tcp://127.0.0.1:{port}")
        mine.send_multipart([b"a", b"bcd"])
        peer.rcvtimeo = 10_000
        assert peer.recv_multipart()[1:] == [b"a", b"bcd"]
        samples = scrape(registry)
        assert value(samples, "zmq_messages_sent_total", socket="dealer", team="t") == 1
        assert value(samples, "zmq_message_bytes_sent_total", socket="dealer", team="t") == 4
        data = otel.get_metrics_data()
        assert data is not None
        points = {
            m.name: [
                (p.value, dict(p.attributes or {}))
                for p in m.data.data_points
                if isinstance(p, NumberDataPoint)
            ]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        for family, want in zip(metrics.MESSAGE_FAMILIES, (1, 0, 4, 0, 0, 0.0), strict=True):
            assert points[str(family.otel_name)] == [(want, {"socket": "dealer", "team": "t"})]
    finally:
        handle.close()
        provider.shutdown()
        mine.close(linger=0)
        peer.close(linger=0)
    # Closed: its series are gone.
    assert value(scrape(registry), "zmq_messages_sent_total", socket="dealer") is None


def test_environment_turns_counting_on(
    pair: tuple[Sock, Sock], registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, peer = pair
    monkeypatch.setenv(message_counting.ENV_MESSAGES, "1")
    handle = exporter.instrument(mine, "env", registry=registry)
    try:
        assert handle.message_counts is not None
        mine.send(b"abc")
        assert peer.recv() == b"abc"
        assert handle.message_counts.values()[0] == 1
    finally:
        handle.close()
    monkeypatch.setenv(message_counting.ENV_MESSAGES, "1")
    handle = exporter.instrument(mine, "env", registry=registry, messages=False)
    assert handle.message_counts is None and type(mine) is zmq.Socket
    handle.close()


# -- zmq.asyncio and zmq.green ---------------------------------------------------------------


def test_asyncio_paths_count_exactly(registry: CollectorRegistry) -> None:
    async def main() -> None:
        actx = zmq.asyncio.Context()
        mine, peer = actx.socket(zmq.PAIR), actx.socket(zmq.PAIR)
        for s in (mine, peer):
            s.linger = 0
        port = peer.bind_to_random_port("tcp://127.0.0.1")
        mine.connect(f"tcp://127.0.0.1:{port}")
        handle = exporter.instrument(mine, "aio", registry=registry, messages=True)
        counts = handle.message_counts
        assert counts is not None
        try:
            assert isinstance(mine, zmq.asyncio.Socket)
            for msg in PAYLOADS:  # send paths
                await mine.send_multipart(msg)
            await mine.send(b"single")
            await mine.send(b"p1", zmq.SNDMORE)
            await mine.send(b"p2", copy=False)
            await mine.send_string("s")
            await mine.send_json([1])
            await mine.send_pyobj(None)
            got = [await asyncio.wait_for(peer.recv_multipart(), 10) for _ in range(10)]
            assert (counts.sent, counts.bytes_sent) == tally(got)

            sent = PAYLOADS * 2  # receive paths
            for msg in sent:
                await peer.send_multipart(msg)
            for _ in range(len(PAYLOADS)):
                await asyncio.wait_for(mine.recv_multipart(), 10)
            for _ in range(len(PAYLOADS)):
                await asyncio.wait_for(mine.recv(copy=False), 10)
                while mine.rcvmore:
                    await mine.recv()
            await peer.send_string("t")
            assert await asyncio.wait_for(mine.recv_string(), 10) == "t"
            buf = bytearray(10)
            await peer.send(b"0123")
            assert await asyncio.wait_for(mine.recv_into(buf), 10) == 4
            assert (counts.received, counts.bytes_received) == (
                len(sent) + 2,
                tally(sent)[1] + 1 + 4,
            )
            assert counts.would_block == 0

            # Backpressure, on an inproc pipe of HWM 1 + 1 (no kernel buffer behind it):
            # NOBLOCK with the pipe full fails at once; an awaited send waits for the
            # peer and that wait is counted when its future completes.
            slow, full = actx.socket(zmq.PAIR), actx.socket(zmq.PAIR)
            slow.sndhwm = full.rcvhwm = 1
            full.bind("inproc://aio-backpressure")
            slow.connect("inproc://aio-backpressure")
            bp = exporter.instrument(slow, "aio-bp", registry=registry, messages=True)
            bp_counts = bp.message_counts
            assert bp_counts is not None
            filled = 0
            while filled < 10_000:
                try:
                    await slow.send(b"f", zmq.NOBLOCK)
                    filled += 1
                except zmq.Again:
                    break
            assert bp_counts.would_block == 1 and filled == 2
            waiting = cast(asyncio.Future[Any], slow.send(b"last"))
            assert not waiting.done()
            await asyncio.sleep(0.2)
            for _ in range(filled + 1):
                await asyncio.wait_for(full.recv(), 10)
            await asyncio.wait_for(waiting, 10)
            assert bp_counts.blocked_seconds > 0.1
            assert bp_counts.sent == filled + 1
            bp.close()
            slow.close(linger=0)
            full.close(linger=0)
        finally:
            handle.close()
            assert type(mine) is zmq.asyncio.Socket
            shadow: Any = mine._shadow_sock
            assert type(shadow) is zmq.Socket
            mine.close()
            peer.close()
            actx.term()

    asyncio.run(asyncio.wait_for(main(), 60))


GREEN = """\
import gevent, zmq.green as zmq, exporter
from prometheus_client import CollectorRegistry
ctx = zmq.Context()
mine, peer = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
port = peer.bind_to_random_port("tcp://127.0.0.1")
mine.connect(f"tcp://127.0.0.1:{port}")
cls = type(mine)
handle = exporter.instrument(mine, "green", registry=CollectorRegistry(), messages=True)
c = handle.message_counts
assert isinstance(mine, cls)
msgs = [[b"a" * 10], [b"b", b"cc", b""], [b"d" * 5000]]
def send():
    for m in msgs * 100:
        mine.send_multipart(m)
    mine.send_string("x")
got = []
def recv():
    for _ in range(301):
        got.append(peer.recv_multipart())
gevent.joinall([gevent.spawn(recv), gevent.spawn(send)], timeout=20, raise_error=True)
assert len(got) == 301 == c.sent, (len(got), c)
assert c.bytes_sent == sum(len(f) for m in got for f in m), c
def back():
    for m in msgs:
        peer.send_multipart(m)
def take():
    for _ in msgs:
        mine.recv_multipart()
gevent.joinall([gevent.spawn(take), gevent.spawn(back)], timeout=20, raise_error=True)
assert (c.received, c.bytes_received) == (3, 5013), c
handle.close()
assert type(mine) is cls
# Backpressure (inproc, HWM 1 + 1): a greenlet's send waits cooperatively for the peer;
# the wait is counted.
slow, full = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
slow.sndhwm = full.rcvhwm = 1
full.bind("inproc://green-backpressure")
slow.connect("inproc://green-backpressure")
bp = exporter.instrument(slow, "green-bp", registry=CollectorRegistry(), messages=True)
c = bp.message_counts
n = 0
while n < 10000:
    try:
        slow.send(b"f", zmq.NOBLOCK)
        n += 1
    except zmq.Again:
        break
assert c.would_block == 1 and n == 2, (n, c)
def late():
    gevent.sleep(0.2)
    for _ in range(n + 1):
        full.recv()
gevent.joinall([gevent.spawn(late), gevent.spawn(slow.send, b"g")], timeout=20, raise_error=True)
assert c.blocked_seconds > 0.1 and c.sent == n + 1, c
bp.close()
slow.close(linger=0); full.close(linger=0)
mine.close(linger=0); peer.close(linger=0); ctx.term()
print("OK")
"""


# Appended to a subprocess's script: it ran the wrapper its parameter names.
CHECK = "from exporter import messages; assert messages.IMPLEMENTATION == {!r}\n"


def test_green_sockets_count_exactly(implementation: str) -> None:
    if importlib.util.find_spec("gevent") is None:
        missing_tool("gevent (the test extra)")
    import subprocess
    import sys

    from helpers import ROOT

    # Its own interpreter: zmq.green's hub and the suite's threads stay apart.
    proc = subprocess.run(
        [sys.executable, "-c", SELECT[implementation] + GREEN + CHECK.format(implementation)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_counts_are_read_while_the_application_sends(
    pair: tuple[Sock, Sock], registry: CollectorRegistry
) -> None:
    """Scrapes from another thread during a send loop see monotonic counts, ending at the
    exact total."""
    mine, peer = pair
    handle = exporter.instrument(mine, "live", registry=registry, messages=True)
    seen: list[float] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set() and len(seen) < 10_000:
            v = value(scrape(registry), "zmq_messages_sent_total", socket="live")
            seen.append(v or 0)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for i in range(5000):
            mine.send(b"%d" % i)
            peer.recv()
    finally:
        stop.set()
        thread.join(30)
    wait_until(lambda: value(scrape(registry), "zmq_messages_sent_total", socket="live") == 5000)
    assert seen == sorted(seen)
    handle.close()


def test_docs_messages_table_is_generated() -> None:
    from helpers import ROOT

    assert metrics.markdown("messages") in (ROOT / "docs" / "messages.md").read_text()


def test_a_class_that_cannot_be_swapped_is_left_alone(
    pair: tuple[Sock, Sock], registry: CollectorRegistry
) -> None:
    """A socket whose class refuses to be subclassed (a "final" class) is instrumented
    without message counts, untouched, with a warning; never an error."""

    class Final(zmq.Socket[bytes]):
        def __init_subclass__(cls, **kwargs: Any) -> None:
            raise TypeError(f"{cls.__name__}: Final may not be subclassed")

    mine, _ = pair
    odd = Final(mine.context, zmq.PAIR)
    try:
        with pytest.raises(TypeError):
            message_counting.count(odd)
        assert type(odd) is Final
        handle = exporter.instrument(odd, "odd", registry=registry, messages=True)
        assert handle.message_counts is None and type(odd) is Final
        handle.close()
    finally:
        odd.close(linger=0)


# -- the wrappers themselves -----------------------------------------------------------------


def test_the_wrapper_in_use_is_the_parameter(implementation: str, pair: tuple[Sock, Sock]) -> None:
    mine, _ = pair
    message_counting.count(mine)
    try:
        made = type(mine).__dict__
        kinds = {type(made[name]).__name__ for name in ("send", "recv", "recv_into")}
        assert kinds == ({"Sender", "Receiver"} if implementation == "compiled" else {"function"})
    finally:
        message_counting.uncount(mine)


def test_every_calling_form_counts_and_fails_as_pyzmq(pair: tuple[Sock, Sock]) -> None:
    """Keywords, positional flags, IntFlag flags, trackers, and the errors of calls pyzmq
    refuses: the same results and messages as the uncounted socket's, and counts only for
    what went through."""
    import inspect

    mine, peer = pair
    own = {name: inspect.signature(getattr(mine, name)) for name in ("send", "recv", "recv_into")}
    refused: list[str] = []

    def calls(s: Any) -> None:
        s.send(data=b"k1")
        s.send(b"k2", flags=zmq.SNDMORE)
        s.send(b"k3", zmq.Flag(0), copy=False)
        tracker = s.send(b"k4" * 100, 0, False, True)
        assert isinstance(tracker, zmq.MessageTracker)
        s.send(memoryview(b"k5"), flags=0, copy=True, track=False)
        bad_calls: list[Callable[[], object]] = [
            lambda: s.send(b"x", nope=1),
            lambda: s.send(b"x", 0, True, False, None, None, None),
            lambda: s.send(),
            lambda: s.send(b"x", "flags"),
            lambda: s.send(b"x", 0, data=b"y"),
            lambda: s.recv(0, True, False, 1),
        ]
        for bad in bad_calls:
            with pytest.raises(Exception) as error:
                bad()
            refused.append(f"{type(error.value).__name__}: {error.value}")

    calls(mine)
    own_refused, refused = refused, []
    assert [peer.recv_multipart() for _ in range(4)] == [
        [b"k1"],
        [b"k2", b"k3"],
        [b"k4" * 100],
        [b"k5"],
    ]
    counts = message_counting.count(mine)
    try:
        assert {n: inspect.signature(getattr(mine, n)) for n in own} == own
        calls(mine)
        assert refused == own_refused
        assert [peer.recv_multipart() for _ in range(4)] == [
            [b"k1"],
            [b"k2", b"k3"],
            [b"k4" * 100],
            [b"k5"],
        ]
        assert (counts.sent, counts.bytes_sent) == (4, 2 + 2 + 2 + 200 + 2)
        peer.send(b"r1", zmq.SNDMORE)
        peer.send(b"r22")
        assert mine.recv(flags=0) == b"r1"
        frame = mine.recv(copy=False)
        assert isinstance(frame, zmq.Frame) and frame.bytes == b"r22"
        with pytest.raises(zmq.Again):
            mine.recv(flags=zmq.NOBLOCK)
        peer.send(b"into-me")
        buf = bytearray(4)
        assert mine.recv_into(buf, nbytes=4) == 7 and bytes(buf) == b"into"
        assert (counts.received, counts.bytes_received) == (2, 2 + 3 + 7)
    finally:
        message_counting.uncount(mine)


def test_no_reference_is_kept_or_lost(pair: tuple[Sock, Sock]) -> None:
    """The wrapper holds no reference to what it sends or returns, and a socket's made
    class dies with its counting (reference counts as a leak check: the C wrapper manages
    them by hand)."""
    import gc
    import sys
    import weakref

    mine, peer = pair
    payload = b"p" * 50
    frame = zmq.Frame(b"f" * 50)
    message_counting.count(mine)
    made = weakref.ref(type(mine))
    before = (sys.getrefcount(payload), sys.getrefcount(frame))
    for _ in range(1000):
        mine.send(payload)
        mine.send(frame, copy=False)
        peer.recv()
        peer.recv()
    received = []
    for _ in range(1000):
        peer.send(payload)
        received.append(mine.recv())
    # Held by the list and by getrefcount's argument only.
    assert {sys.getrefcount(received[i]) for i in range(10)} == {2}
    message_counting.uncount(mine)
    assert (sys.getrefcount(payload), sys.getrefcount(frame)) == before
    gc.collect()
    assert made() is None


def test_a_shadow_of_another_socket_counts_its_own_frames(
    ctx: Ctx, pair: tuple[Sock, Sock]
) -> None:
    """`type(sock).shadow(address)` of a counted socket's class shares its counts; whether
    more frames follow is read from the socket the call was made on, not the counted one."""
    mine, peer = pair
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.linger = b.linger = 0
        b.rcvtimeo = 10_000
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        counts = message_counting.count(mine)
        other = type(mine).shadow(b.underlying)
        a.send_multipart([b"1", b"22", b"333"])
        peer.send(b"single")
        assert other.recv_multipart() == [b"1", b"22", b"333"]
        assert mine.recv() == b"single"
        assert (counts.received, counts.bytes_received) == (2, 6 + 6)
    finally:
        message_counting.uncount(mine)
        a.close()
        b.close()


# Arguments a send may be given, well-formed or not (pyzmq decides which it refuses).
SEND_VALUES: dict[str, list[Any]] = {
    "data": [
        b"",
        b"abc",
        bytearray(b"xy"),
        memoryview(b"0123456789")[::3],
        array.array("i", [1, 2]),
        zmq.Frame(b"frame"),
        "text",
        None,
        5,
    ],
    "flags": [0, zmq.SNDMORE, zmq.NOBLOCK, zmq.NOBLOCK | zmq.SNDMORE, True, "1", 2**70, -3],
    "copy": [True, False, None, 0],
    "track": [False, True],
}
EXTRA_KEYWORDS: list[dict[str, Any]] = [{}, {"routing_id": None}, {"group": None}, {"nope": 1}]


@st.composite
def send_calls(draw: st.DrawFn) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One send call: a prefix of (data, flags, copy, track) positional, some of the rest
    as keywords, sometimes an extra keyword or one named twice."""
    values = [draw(st.sampled_from(SEND_VALUES[p])) for p in SEND_VALUES]
    given = draw(st.integers(0, 4))
    names = list(SEND_VALUES)
    keywords = {
        n: v for n, v in zip(names[given:], values[given:], strict=True) if draw(st.booleans())
    }
    keywords.update(draw(st.sampled_from(EXTRA_KEYWORDS)))
    if given and draw(st.integers(0, 9)) == 0:
        keywords[names[0]] = values[0]  # data twice
    return tuple(values[:given]), keywords


def outcome(send: Callable[..., object], args: tuple[Any, ...], kw: dict[str, Any]) -> str:
    try:
        return type(send(*args, **kw)).__name__
    except Exception as error:
        return f"{type(error).__name__}: {error}"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=st.lists(send_calls(), min_size=1, max_size=6))
def test_any_send_call_behaves_as_pyzmq_and_counts_what_arrived(
    pair: tuple[Sock, Sock], calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
) -> None:
    """Hypothesis: any send call, well-formed or not, gives the counted socket's caller what
    the uncounted socket gave (result type, or the error and its words), and the counts are
    what the peer received: messages and payload bytes, by the peer's own tally (a closing
    message ends any multipart message left open)."""
    mine, peer = pair
    mine.sndtimeo = 200  # a send with no room fails fast instead of waiting 10 s
    end = b"end-of-example"

    def run() -> tuple[list[str], int, int]:
        outcomes = [outcome(mine.send, args, kw) for args, kw in calls]
        zmq.Socket.send(mine, end)  # pyzmq's own send: never counted
        got: list[list[bytes]] = []
        while not got or got[-1][-1] != end:
            got.append(peer.recv_multipart())
        messages, size = tally(got)
        return outcomes, messages - 1, size - len(end)

    own_outcomes, _, _ = run()
    counts = message_counting.count(mine)
    try:
        outcomes, messages, size = run()
        assert outcomes == own_outcomes
        assert (counts.sent, counts.bytes_sent) == (messages, size)
    finally:
        message_counting.uncount(mine)
