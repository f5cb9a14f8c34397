"""Shared pieces of the benchmarks: the load process, per-thread CPU clocks, ports and an
in-process engine built from a YAML config like the daemon's."""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from exporter.config import Settings, parse_config
from exporter.engine import COALESCE_SECONDS, Engine

LOADGEN = Path(__file__).with_name("loadgen.py")
# A deep listen backlog, as a busy ROUTER should have: with libzmq's default of 100 a
# moment of CPU contention drops SYNs and the client retransmits after 1 s.
BACKLOG = 4096


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: 4,000 monitored sockets need ~12,000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range (the load generator's
    own source ports come from there)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def thread_cpu(thread: threading.Thread) -> Callable[[], float]:
    """A clock reading `thread`'s CPU time in seconds (works from any thread)."""
    assert thread.ident is not None, "thread not started"
    clock = time.pthread_getcpuclockid(thread.ident)
    return lambda: time.clock_gettime(clock)


def process_cpu() -> float:
    """User + system CPU seconds of this process, all threads (libzmq's included)."""
    t = os.times()
    return t.user + t.system


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def wait_quiet(cpu: Callable[[], float], timeout: float, step: float = 0.2) -> bool:
    """Wait until a thread's CPU clock (`thread_cpu`) stops moving for `step` seconds."""
    last: float | None = None  # the first look only takes a reading

    def quiet() -> bool:
        nonlocal last
        now, before = cpu(), last
        last = now
        return now == before

    return wait_until(quiet, timeout, step)


@dataclass
class Tally:
    completed: int
    failed: int
    seconds: float
    completed_by_port: dict[int, int]


class LoadGen:
    """Raw TCP connect+close churn from a separate process (3 monitor events per
    connection), with its own tally."""

    def __init__(
        self,
        port: int | list[int],
        count: int,
        deadline: float,
        rate: float = 0.0,
        window: float = 0.0,
        start_at: float | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        ports = ",".join(str(p) for p in (port if isinstance(port, list) else [port]))
        args = [sys.executable, str(LOADGEN), "--port", ports, "--count", str(count)]
        args += ["--deadline", str(deadline), "--connect-timeout", "1"]
        args += ["--rate", str(rate), "--window", str(window)]
        if start_at is not None:
            args += ["--start-at", str(start_at)]
        self._proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        if cpus:
            os.sched_setaffinity(self._proc.pid, cpus)
        self._deadline = deadline + (max(0.0, start_at - time.monotonic()) if start_at else 0)

    def tally(self) -> Tally:
        out, _ = self._proc.communicate(timeout=self._deadline + 30)
        data = json.loads(out)
        by_port = {int(p): int(n) for p, n in data["completed_by_port"].items()}
        return Tally(int(data["completed"]), int(data["failed"]), float(data["seconds"]), by_port)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


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
