"""What monitoring costs the application it watches: round trips per second through an
application's own REQ/REP pair in the same process and ZeroMQ context as the engine,
while a load process churns connections at a fixed rate against a ROUTER of that context
- monitored by our engine, or the same ROUTER unmonitored."""

from __future__ import annotations

import time
from dataclasses import dataclass

import zmq

from bench.common import BACKLOG, BenchEngine, LoadGen, free_port


@dataclass
class AppRun:
    round_trips_per_second: float
    churn_per_second: float  # connections the load process completed per second


def _ping_pong(ctx: zmq.Context[zmq.Socket[bytes]], seconds: float) -> float:
    """Round trips per second REQ -> REP -> REQ over TCP loopback, both ends driven by
    this one thread (one Python thread fewer competing for the two cores)."""
    port = free_port()
    rep = ctx.socket(zmq.REP)
    req = ctx.socket(zmq.REQ)
    try:
        for sock in (rep, req):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 2000)
        rep.bind(f"tcp://127.0.0.1:{port}")
        req.connect(f"tcp://127.0.0.1:{port}")
        count = 0
        started = time.monotonic()
        end = started + seconds
        while time.monotonic() < end:
            req.send(b"ping")
            rep.send(rep.recv())
            req.recv()
            count += 1
        return count / (time.monotonic() - started)
    finally:
        req.close()
        rep.close()


def _run(ctx: zmq.Context[zmq.Socket[bytes]], port: int, seconds: float, rate: float) -> AppRun:
    churn = LoadGen(port, int(rate * seconds * 2), seconds, rate)
    try:
        rtps = _ping_pong(ctx, seconds)
        tally = churn.tally()
    finally:
        churn.kill()
    return AppRun(rtps, tally.completed / tally.seconds)


def run_monitored(seconds: float, rate: float) -> AppRun:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    bench = BenchEngine(ctx=ctx)
    try:
        return _run(ctx, bench.port, seconds, rate)
    finally:
        bench.close()
        ctx.term()


def run_unmonitored(seconds: float, rate: float) -> AppRun:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    port = free_port()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.BACKLOG, BACKLOG)
    router.bind(f"tcp://127.0.0.1:{port}")
    try:
        return _run(ctx, port, seconds, rate)
    finally:
        router.close()
        ctx.term()
