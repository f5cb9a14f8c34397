"""Helpers shared by the tests (tests/) and the benchmarks (bench/): free ports, waiting
with a deadline, the kernel's count of connections, and the raw TCP churn process
(bench/loadgen.py) with its tally.

It lives at the top of the repository, beside `exporter/`, `tests/` and `bench/`, because
both import it and neither should import the other: `python -m bench` finds it on the
working directory, pytest through `pythonpath` in pyproject.toml. It is not installed
(`[tool.setuptools.packages.find]` includes `exporter*` only).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent
# The churn process: stdlib only, run as a script so that its CPU is not this process's.
LOADGEN = ROOT / "bench" / "loadgen.py"

T = TypeVar("T")

_LOW, _HIGH = 20000, 32000  # below Linux's ephemeral range (32768-60999)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, picked at random below the ephemeral range: a port the
    kernel hands out with bind(0) can be taken as the source port of any outgoing
    connection before the daemon under test binds it, and the storm tests and the load
    generator make 20,000 of those."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_LOW, _HIGH)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port found in {_LOW}-{_HIGH} in 200 tries")


def poll_until(condition: Callable[[], object], timeout: float, interval: float = 0.005) -> bool:
    """Poll `condition` until it is truthy (True) or `timeout` seconds passed (False): for
    callers to whom a timeout is an outcome to report, such as the benchmarks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `condition` until it returns a truthy value and return that; fail the test
    (AssertionError) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)
        last = condition()
    return last


def established(port: int) -> int:
    """ESTABLISHED TCP connections in /proc/net/tcp{,6} with local port `port`: the
    kernel's count, independent of anything ZeroMQ tells us."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":
                count += 1
    return count


@dataclass
class Tally:
    """What the churn process did: connections completed (accepted by the kernel, then
    closed) and failed, over `seconds`."""

    completed: int
    failed: int
    seconds: float
    completed_by_port: dict[int, int]


class LoadGen:
    """Raw TCP connect+close churn from a separate process (3 monitor events per
    connection on the accepting side: ACCEPTED, HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED),
    with its own tally."""

    def __init__(
        self,
        port: int | list[int],
        count: int,
        deadline: float,
        rate: float = 0.0,
        window: float = 0.0,
        start_at: float | None = None,
        cpus: set[int] | None = None,
        connect_timeout: float = 1.0,
    ) -> None:
        """`connect_timeout`: a connect not done by then counts as failed. 1 s is short
        enough that a stalled listener shows as failures; a test that needs every connect
        of a burst to complete on a loaded machine (a SYN dropped and retransmitted after
        1 s) gives more."""
        ports = ",".join(str(p) for p in (port if isinstance(port, list) else [port]))
        args = [sys.executable, str(LOADGEN), "--port", ports, "--count", str(count)]
        args += ["--deadline", str(deadline), "--connect-timeout", str(connect_timeout)]
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
        """Wait for the churn to end (its deadline plus 30 s at most) and read its tally."""
        out, _ = self._proc.communicate(timeout=self._deadline + 30)
        if self._proc.returncode != 0:
            raise RuntimeError(f"loadgen exited with {self._proc.returncode}: {out!r}")
        data = json.loads(out)
        by_port = {int(p): int(n) for p, n in data["completed_by_port"].items()}
        return Tally(int(data["completed"]), int(data["failed"]), float(data["seconds"]), by_port)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
