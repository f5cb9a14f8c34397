"""What monitoring costs the application it watches.

Two copies of one application live in this process, each in its own ZeroMQ context: a
REQ/REP pair doing round trips over TCP loopback, and a ROUTER that a load process churns
raw TCP connections against at a fixed rate. In copy "monitored" our engine owns the
ROUTER and monitors it; in copy "plain" the ROUTER has no monitor. The load process and
the round trips take turns between the copies in short windows on a shared clock, so
both copies see the same machine (the noise of these 2-core machines drifts over
seconds); the measure is median monitored / median plain round trips per window.

This process (so every thread it starts: the application's, libzmq's I/O threads, our
engine's) is pinned to one core and the load process to another. Unpinned, where the
scheduler happened to put each copy's I/O thread biased a whole run: A/A runs (both
copies plain) ranged 0.96-1.09; pinned, 0.995-0.997 (one outlier of 1.07 in 6). It is
also the harder case for us: whatever CPU monitoring takes, it takes from the application.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import dataclass

import zmq

from bench.common import BACKLOG, BenchEngine
from exporter.monitor.engine import COALESCE_SECONDS

from testkit import LoadGen, free_port

MARGIN = 0.1  # of each window, left out at both ends (load process switching over)


@dataclass
class AppResult:
    ratios: list[float]  # monitored / plain round trips, per window pair
    round_trips_per_second: dict[str, float]  # medians
    churn_ratio: float  # connections completed, monitored / plain

    @property
    def ratio(self) -> float:
        # Ratio of medians: steadier than the median of per-pair ratios (an A/A run,
        # both copies plain, gave 1.004-1.008 this way and 0.96-1.05 the other).
        # A window of 0 round trips (a stalled machine) gives 0, never a ZeroDivisionError:
        # the bench reports, the goal shows unmet.
        plain = self.round_trips_per_second["plain"]
        return self.round_trips_per_second["monitored"] / plain if plain else 0.0


class PingPong:
    """REQ -> REP -> REQ round trips over TCP loopback, both ends driven by the calling
    thread (one Python thread fewer competing for the two cores)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        port = free_port()
        self.rep = ctx.socket(zmq.REP)
        self.req = ctx.socket(zmq.REQ)
        for sock in (self.rep, self.req):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 2000)
        self.rep.bind(f"tcp://127.0.0.1:{port}")
        self.req.connect(f"tcp://127.0.0.1:{port}")
        self.run_until(time.monotonic() + 0.05)  # connected and warm

    def run_until(self, end: float) -> float:
        """Round trips per second until `end` (CLOCK_MONOTONIC)."""
        req, rep = self.req, self.rep
        count = 0
        started = time.monotonic()
        while time.monotonic() < end:
            req.send(b"ping")
            rep.send(rep.recv())
            req.recv()
            count += 1
        return count / max(time.monotonic() - started, 1e-9)

    def close(self) -> None:
        self.req.close()
        self.rep.close()


class PlainRouter:
    """The unmonitored copy's ROUTER, read by a thread of its own as any server reads its
    socket (in the monitored copy our engine reads it). Reading matters beyond messages:
    it is when libzmq processes the socket's commands (each accepted and each ended
    connection sends some); a ROUTER nobody reads leaves that work undone."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.port = free_port()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.BACKLOG, BACKLOG)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(100):
                with contextlib.suppress(zmq.Again):
                    while True:
                        self.sock.recv(zmq.NOBLOCK)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def run(
    window_pairs: int, window: float, rate: float, coalesce: float = COALESCE_SECONDS
) -> AppResult:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return _run(window_pairs, window, rate, coalesce, None)
    try:
        os.sched_setaffinity(0, {cores[0]})  # threads started from here on inherit it
        return _run(window_pairs, window, rate, coalesce, {cores[1]})
    finally:
        os.sched_setaffinity(0, set(cores))


def _run(
    window_pairs: int, window: float, rate: float, coalesce: float, load_cpus: set[int] | None
) -> AppResult:
    monitored_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    plain_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    bench = BenchEngine(ctx=monitored_ctx, coalesce=coalesce)
    router = PlainRouter(plain_ctx)
    plain_port = router.port
    apps = [PingPong(monitored_ctx), PingPong(plain_ctx)]
    windows = 2 * window_pairs
    # Turns in ABBA order: whichever copy goes first in a pair has no edge on the other.
    order = (0, 1, 1, 0)
    start = time.monotonic() + 0.5  # the load process is up by then
    load = LoadGen(
        [(bench.port, plain_port)[i] for i in order],
        int(rate * window * windows) + 1,
        window * windows,
        rate,
        window,
        start,
        load_cpus,
    )
    try:
        rates: list[list[float]] = [[], []]
        for k in range(windows):
            begin = start + k * window
            time.sleep(max(0.0, begin + MARGIN * window - time.monotonic()))
            copy = order[k % len(order)]
            rates[copy].append(apps[copy].run_until(begin + (1 - MARGIN) * window))
        tally = load.tally()
    finally:
        load.kill()
        for a in apps:
            a.close()
        bench.close()
        router.close()
        monitored_ctx.term()
        plain_ctx.term()
    done = tally.completed_by_port
    return AppResult(
        ratios=[m / p if p else 0.0 for m, p in zip(rates[0], rates[1], strict=True)],
        round_trips_per_second={
            "monitored": statistics.median(rates[0]),
            "plain": statistics.median(rates[1]),
        },
        churn_ratio=done[bench.port] / done[plain_port] if done[plain_port] else 0.0,
    )
