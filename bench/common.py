"""Shared pieces of the benchmarks: per-thread CPU clocks, the fd limit and an in-process
engine built from a YAML config like the daemon's (ports, waiting and the load process
come from testkit.py, shared with the tests)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import zmq

from exporter.config import Settings, parse_config
from exporter.monitor.engine import COALESCE_SECONDS, Engine

from testkit import LOADGEN, LoadGen, Tally, free_port, poll_until

ROOT = Path(__file__).resolve().parent.parent

# The helpers tests share live in testkit.py. bench/run.py and bench/soak.py still import
# them from here, `wait_until` being testkit's non-raising `poll_until` (bench/ reports a
# timeout as an outcome).
wait_until = poll_until
__all__ = ["LOADGEN", "LoadGen", "Tally", "free_port", "poll_until", "wait_until"]
# A deep listen backlog, as a busy ROUTER should have: with libzmq's default of 100 a
# moment of CPU contention drops SYNs and the client retransmits after 1 s.
BACKLOG = 4096


class DaemonProcess:
    """A real daemon (`python -m exporter`) on `config_text`, its output in `<name>.log`
    under `workdir`; ready once /metrics answers and `ready(text)` holds. Its CPU and RSS
    read from /proc, for the benches that measure the daemon from outside."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        config_text: str,
        ready: Callable[[str], bool] = lambda text: True,
        scrape_timeout: float = 30,
    ) -> None:
        self.port = free_port()
        self.scrape_timeout = scrape_timeout
        self._ready = ready
        config = workdir / f"{name}.yml"
        config.write_text(config_text)
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", f"--config.file={config}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if not poll_until(self._up, 30, 0.05):
            self.close()
            raise RuntimeError(f"daemon {name} did not serve /metrics: {self.log.read_text()}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}")
        try:
            return self._ready(self.scrape())
        except OSError:
            return False

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=self.scrape_timeout) as resp:
            body: bytes = resp.read()
        return body.decode()

    def cpu(self) -> float:
        """User + system CPU seconds of the daemon process."""
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
