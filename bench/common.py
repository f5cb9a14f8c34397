"""Shared pieces of the benchmarks: per-thread CPU clocks, the fd limit and an in-process
engine built from a YAML config like the daemon's (ports, waiting and the load process
come from testkit.py, shared with the tests)."""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable

import zmq

from exporter.config import Settings, parse_config
from exporter.engine import COALESCE_SECONDS, Engine

from testkit import LOADGEN, LoadGen, Tally, free_port, poll_until

# The helpers tests share live in testkit.py. bench/run.py and bench/soak.py still import
# them from here, `wait_until` being testkit's non-raising `poll_until` (bench/ reports a
# timeout as an outcome).
wait_until = poll_until
__all__ = ["LOADGEN", "LoadGen", "Tally", "free_port", "poll_until", "wait_until"]
# A deep listen backlog, as a busy ROUTER should have: with libzmq's default of 100 a
# moment of CPU contention drops SYNs and the client retransmits after 1 s.
BACKLOG = 4096


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: 4,000 monitored sockets need ~12,000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def thread_cpu(thread: threading.Thread) -> Callable[[], float]:
    """A clock reading `thread`'s CPU time in seconds (works from any thread)."""
    assert thread.ident is not None, "thread not started"
    clock = time.pthread_getcpuclockid(thread.ident)
    return lambda: time.clock_gettime(clock)


def process_cpu() -> float:
    """User + system CPU seconds of this process, all threads (libzmq's included)."""
    t = os.times()
    return t.user + t.system


def wait_quiet(cpu: Callable[[], float], timeout: float, step: float = 0.2) -> bool:
    """Wait until a thread's CPU clock (`thread_cpu`) stops moving for `step` seconds."""
    last: float | None = None  # the first look only takes a reading

    def quiet() -> bool:
        nonlocal last
        now, before = cpu(), last
        last = now
        return now == before

    return poll_until(quiet, timeout, step)


def engine_config(storm_port: int, idle: int, ipc_dir: str) -> Settings:
    """One ROUTER on `storm_port` plus `idle` quiet sockets bound on ipc (3 fds each)."""
    lines = [
        "limits: {max_sockets: 100000, max_series: 10000000}",
        "sockets:",
        "  - name: storm",
        "    type: ROUTER",
        f"    bind: ['tcp://127.0.0.1:{storm_port}']",
        f"    options: {{backlog: {BACKLOG}}}",
    ]
    for i in range(idle):
        lines += [
            f"  - name: idle-{i}",
            "    type: PULL",
            f"    bind: ['ipc://{ipc_dir}/{i}']",
        ]
    return parse_config("\n".join(lines) + "\n", "<bench>")


class BenchEngine:
    """An `Engine` running `engine_config(...)` in this process, as the daemon runs it."""

    def __init__(
        self,
        idle: int = 0,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        coalesce: float = COALESCE_SECONDS,
    ) -> None:
        self.port = free_port()
        self._ipc = tempfile.TemporaryDirectory(prefix="zmqx-bench-")
        self.settings = engine_config(self.port, idle, self._ipc.name)
        self.engine = Engine(ctx, coalesce=coalesce)
        self.engine.start()
        self.engine.apply(self.settings).result(timeout=120)
        self.cpu = self.engine.cpu_seconds

    def events(self) -> int:
        return self.engine.snapshot().stats.events

    def socket_events(self, name: str = "storm") -> int:
        for sock in self.engine.snapshot().sockets:
            if sock.name == name:
                return sock.events
        raise KeyError(name)

    def close(self) -> None:
        self.engine.stop(timeout=30)
        self._ipc.cleanup()

    def __enter__(self) -> BenchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
