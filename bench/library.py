"""What library mode costs the application that instruments its own sockets.

Like bench/app.py, two copies of one application live in this process, each in its own
ZeroMQ context: a REQ/REP pair doing round trips over TCP loopback, and a ROUTER that the
application reads on a thread of its own while a load process churns raw TCP connections
against it at a fixed rate. In copy "instrumented" all three sockets are instrumented with
`exporter.instrument` (the process-wide reader reads their monitors); in copy "plain"
nothing is. The load and the round trips take turns between the copies in short windows
on a shared clock (ABBA), this process pinned to one core and the load process to the
other (bench/app.py says why); the measure is median instrumented / median plain round
trips per window.

Beside it, the reader's CPU per event over the instrumented windows, and the daemon's
engine's (an in-process `Engine` monitoring a ROUTER under the same churn) measured the
same way right after: the same reader code, so they should be alike.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import dataclass

import zmq
from prometheus_client import CollectorRegistry

import exporter
from bench.app import MARGIN, PingPong
from bench.common import BACKLOG, BenchEngine
from exporter import library

from testkit import LoadGen, free_port


@dataclass
class LibraryResult:
    ratios: list[float]  # instrumented / plain round trips, per window pair
    round_trips_per_second: dict[str, float]  # medians
    churn_ratio: float  # connections completed, instrumented / plain
    reader_us_per_event: float  # the library's reader thread, over the instrumented windows
    reader_events: int
    daemon_us_per_event: float  # the daemon's engine thread, same churn, right after
    daemon_events: int

    @property
    def ratio(self) -> float:
        plain = self.round_trips_per_second["plain"]  # 0 when the machine stalled: report
        return self.round_trips_per_second["instrumented"] / plain if plain else 0.0


class App:
    """One copy of the application: ping-pong plus a churned ROUTER that it reads."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], instrumented: bool) -> None:
        self._handles: list[exporter.Instrumentation] = []
        registry = CollectorRegistry()  # scraped by nobody: the cost is the reading
        self.port = free_port()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.BACKLOG, BACKLOG)
        if instrumented:
            self._handles.append(exporter.instrument(self.router, "churned", registry=registry))
        self.router.bind(f"tcp://127.0.0.1:{self.port}")
        self.ping = (
            InstrumentedPingPong(ctx, registry, self._handles) if instrumented else PingPong(ctx)
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self.router.poll(100):
                with contextlib.suppress(zmq.Again):
                    while True:
                        self.router.recv(zmq.NOBLOCK)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for handle in self._handles:  # the threads that used the sockets are done
            handle.close()
        self.ping.close()
        self.router.close()


class InstrumentedPingPong(PingPong):
    """bench/app.py's ping-pong with both sockets instrumented before they bind/connect."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        registry: CollectorRegistry,
        handles: list[exporter.Instrumentation],
    ) -> None:
        port = free_port()
        self.rep = ctx.socket(zmq.REP)
        self.req = ctx.socket(zmq.REQ)
        for sock, name in ((self.rep, "ping-rep"), (self.req, "ping-req")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 2000)
            handles.append(exporter.instrument(sock, name, registry=registry))
        self.rep.bind(f"tcp://127.0.0.1:{port}")
        self.req.connect(f"tcp://127.0.0.1:{port}")
        self.run_until(time.monotonic() + 0.05)  # connected and warm


def run(window_pairs: int, window: float, rate: float) -> LibraryResult:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return _run(window_pairs, window, rate, None)
    try:
        os.sched_setaffinity(0, {cores[0]})  # threads started from here on inherit it
        return _run(window_pairs, window, rate, {cores[1]})
    finally:
        os.sched_setaffinity(0, set(cores))


def _run(
    window_pairs: int, window: float, rate: float, load_cpus: set[int] | None
) -> LibraryResult:
    contexts: list[zmq.Context[zmq.Socket[bytes]]] = [zmq.Context(), zmq.Context()]
    apps = [App(contexts[0], instrumented=True), App(contexts[1], instrumented=False)]
    reader = library.reader()
    assert reader is not None
    windows = 2 * window_pairs
    order = (0, 1, 1, 0)  # ABBA: whichever copy goes first in a pair has no edge
    start = time.monotonic() + 0.5  # the load process is up by then
    load = LoadGen(
        [apps[i].port for i in order],
        int(rate * window * windows) + 1,
        window * windows,
        rate,
        window,
        start,
        load_cpus,
    )
    cpu0, events0 = reader.cpu_seconds(), reader.snapshot().stats.events
    try:
        rates: list[list[float]] = [[], []]
        for k in range(windows):
            begin = start + k * window
            time.sleep(max(0.0, begin + MARGIN * window - time.monotonic()))
            copy = order[k % len(order)]
            rates[copy].append(apps[copy].ping.run_until(begin + (1 - MARGIN) * window))
        tally = load.tally()
        time.sleep(0.2)  # the last coalesced batch
        reader_cpu = reader.cpu_seconds() - cpu0
        reader_events = reader.snapshot().stats.events - events0
    finally:
        load.kill()
        for a in apps:
            a.close()
        for c in contexts:
            c.term()
    daemon_cpu, daemon_events = _daemon_engine(window * window_pairs, rate, load_cpus)
    done = tally.completed_by_port
    return LibraryResult(
        ratios=[m / p if p else 0.0 for m, p in zip(rates[0], rates[1], strict=True)],
        round_trips_per_second={
            "instrumented": statistics.median(rates[0]),
            "plain": statistics.median(rates[1]),
        },
        churn_ratio=done[apps[0].port] / done[apps[1].port] if done[apps[1].port] else 0.0,
        reader_us_per_event=reader_cpu / max(1, reader_events) * 1e6,
        reader_events=reader_events,
        daemon_us_per_event=daemon_cpu / max(1, daemon_events) * 1e6,
        daemon_events=daemon_events,
    )


def _daemon_engine(seconds: float, rate: float, load_cpus: set[int] | None) -> tuple[float, int]:
    """The daemon's engine thread under the same churn for `seconds`: (CPU s, events)."""
    with BenchEngine() as bench:
        start = time.monotonic() + 0.5
        load = LoadGen(
            bench.port, int(rate * seconds) + 1, seconds, rate, seconds, start, load_cpus
        )
        cpu0, events0 = bench.cpu(), bench.events()
        try:
            load.tally()
            time.sleep(0.2)
            return bench.cpu() - cpu0, bench.events() - events0
        finally:
            load.kill()
