"""Per-event ingest cost: our engine against a raw drain and a do-it-yourself exporter, at
10 and 4,000 monitored sockets, and event accounting under overload.

Every reader runs in its own thread and is charged that thread's CPU time only (libzmq's
I/O thread produces the events at about the same cost in every case), divided by the
events it read from one storm of raw TCP connect+close driven by `bench/loadgen.py`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from prometheus_client import CollectorRegistry, Counter
from zmq.utils.monitor import recv_monitor_message

from bench.common import BACKLOG, BenchEngine, thread_cpu
from exporter.monitor.sockets import attach_monitor

from testkit import LoadGen, free_port, poll_until

EVENTS_PER_CONNECTION = 3  # ACCEPTED, HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED
STORM_DEADLINE = 60.0


@dataclass
class Run:
    events: int
    cpu: float  # reader-thread CPU seconds

    @property
    def us_per_event(self) -> float:
        return self.cpu / self.events * 1e6 if self.events else float("inf")


class _Reader:
    """A bare ROUTER on loopback with a monitor read by `loop` in a thread of its own."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.port = free_port()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.BACKLOG, BACKLOG)
        self.events = 0
        self.stop = threading.Event()

    def start(self, loop: Callable[[], None]) -> None:
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        self.cpu = thread_cpu(self.thread)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def _drain(pair: zmq.Socket[bytes]) -> int:
    """`recv_multipart` until EAGAIN; the number of messages read."""
    n = 0
    while True:
        try:
            pair.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1


class RawReader(_Reader):
    """The floor: wait until readable, then `recv_multipart` until EAGAIN; nothing else.
    With `coalesce` it then sleeps that long, as our engine does, so the two compare
    like for like (the pure cost of reducing and locking)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], coalesce: float = 0.0) -> None:
        super().__init__(ctx)
        self.coalesce = coalesce
        self.pair = attach_monitor(ctx, self.sock, zmq.EVENT_ALL)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.start(self._loop)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.pair.poll(100):
                continue
            self.events += _drain(self.pair)
            if self.coalesce:
                time.sleep(self.coalesce)

    def close(self) -> None:
        super().close()
        self.sock.disable_monitor()
        self.pair.close()
        self.sock.close()


class DiyReader(_Reader):
    """What one writes from pyzmq's monitoring example: `get_monitor_socket()`, a thread
    doing `while monitor.poll(): recv_monitor_message(...)`, and a prometheus_client
    counter incremented per event."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        super().__init__(ctx)
        self.registry = CollectorRegistry()
        self.counter = Counter(
            "zmq_events", "Monitor events.", ["socket", "endpoint", "event"], registry=self.registry
        )
        self.monitor = self.sock.get_monitor_socket()
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.names = {int(e): e.name for e in zmq.Event}
        self.start(self._loop)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.monitor.poll(100):
                continue
            evt = recv_monitor_message(self.monitor)
            name = self.names.get(int(evt["event"]), "UNKNOWN")
            self.counter.labels("diy", evt["endpoint"].decode(), name).inc()
            self.events += 1

    def close(self) -> None:
        super().close()
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()


def _storm(port: int, connections: int, events: Callable[[], int], cpu: Callable[[], float]) -> Run:
    """Churn `connections` against `port`; wait until the reader has read all events."""
    poll_until(lambda: events() > 0, 5)  # LISTENING, before the storm
    events0, cpu0 = events(), cpu()
    tally = LoadGen(port, connections, STORM_DEADLINE).tally()
    want = events0 + EVENTS_PER_CONNECTION * tally.completed
    if not poll_until(lambda: events() >= want, 60):
        raise RuntimeError(f"reader stopped at {events()} of {want} events")
    return Run(events() - events0, cpu() - cpu0)


def _with_reader(
    make: Callable[[zmq.Context[zmq.Socket[bytes]]], _Reader], connections: int
) -> Run:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, ctx.get(zmq.SOCKET_LIMIT))  # 3 zmq sockets per monitored one
    reader = make(ctx)
    try:
        return _storm(reader.port, connections, lambda: reader.events, reader.cpu)
    finally:
        reader.close()
        ctx.term()


def run_raw(connections: int, coalesce: float = 0.0) -> Run:
    return _with_reader(lambda ctx: RawReader(ctx, coalesce), connections)


def run_diy(connections: int) -> Run:
    return _with_reader(DiyReader, connections)


def run_ours(connections: int, bench: BenchEngine) -> Run:
    return _storm(bench.port, connections, bench.events, bench.cpu)


class PollerReader(_Reader):
    """A raw drain over `sockets` monitored sockets with a plain `zmq.Poller` (the
    approach the engine's epoll set replaces): the storm hits one of them."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], sockets: int, ipc_dir: str) -> None:
        super().__init__(ctx)
        self.others: list[zmq.Socket[bytes]] = []
        self.pairs = [attach_monitor(ctx, self.sock, zmq.EVENT_ALL)]
        for i in range(sockets - 1):
            other = ctx.socket(zmq.PULL)
            other.setsockopt(zmq.LINGER, 0)
            self.pairs.append(attach_monitor(ctx, other, zmq.EVENT_ALL))
            other.bind(f"ipc://{ipc_dir}/{i}")
            self.others.append(other)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.start(self._loop)

    def _loop(self) -> None:
        poller = zmq.Poller()
        for pair in self.pairs:
            poller.register(pair, zmq.POLLIN)
        while not self.stop.is_set():
            for pair, _ in poller.poll(100):
                self.events += _drain(pair)

    def close(self) -> None:
        super().close()
        for sock in (self.sock, *self.others):
            sock.disable_monitor()
        for sock in (*self.pairs, self.sock, *self.others):
            sock.close()


def run_poller(connections: int, sockets: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="zmqx-bench-") as ipc_dir:
        return _with_reader(lambda ctx: PollerReader(ctx, sockets, ipc_dir), connections)


def poller_idle_share(sockets: int, seconds: float) -> float:
    """CPU share of a core the `PollerReader` thread burns with `sockets` idle monitors."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, ctx.get(zmq.SOCKET_LIMIT))
    with tempfile.TemporaryDirectory(prefix="zmqx-bench-") as ipc_dir:
        reader = PollerReader(ctx, sockets, ipc_dir)
        try:
            poll_until(lambda: reader.events >= sockets, 60)  # every LISTENING read
            cpu0, t0 = reader.cpu(), time.monotonic()
            time.sleep(seconds)
            return (reader.cpu() - cpu0) / (time.monotonic() - t0)
        finally:
            reader.close()
            ctx.term()


@dataclass
class Overload:
    generated: int  # 3 events per completed connection, by the load generator's tally
    counted: int  # events the engine reduced for the socket
    stalled_seconds: float
    catch_up_seconds: float
    backlog_max: int

    @property
    def lost(self) -> int:
        # The engine has no drop path (unbounded monitor pipes); anything missing is lost.
        return self.generated - self.counted


def run_overload(connections: int, bench: BenchEngine) -> Overload:
    """A burst while the reader is stalled: the engine's state lock is held for the whole
    burst, so its reader reads at most one batch and then blocks - a reader infinitely
    slower than the storm (well past 10x overload). Then every event must be counted."""
    poll_until(lambda: bench.socket_events() > 0, 5)
    before = bench.socket_events()
    started = time.monotonic()
    with bench.engine.hold():  # a reader that cannot keep up
        tally = LoadGen(bench.port, connections, STORM_DEADLINE).tally()
        stalled = time.monotonic() - started
    released = time.monotonic()
    generated = EVENTS_PER_CONNECTION * tally.completed
    poll_until(lambda: bench.socket_events() - before >= generated, 60)
    catch_up = time.monotonic() - released
    counted = bench.socket_events() - before
    return Overload(
        generated, counted, stalled, catch_up, bench.engine.snapshot().stats.backlog_max
    )
