"""The zero-code launcher's cost (bench/README.md): `launcher_app_throughput`, an
application's REQ/REP round trips per second under `zmq-exporter-instrument` ÷ the same
application run plain, in alternating windows of one run; and `launcher_startup_overhead_ms`,
what the launcher adds to `python -c pass` (its own interpreter, which execs the program,
and the program's sitecustomize)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

# An unmodified application: a REP and a REQ in one thread over loopback TCP, its sockets
# created through the context (so the launcher instruments both); it runs one window per
# line on stdin and prints its round trips per second.
APP = """\
import sys, time, zmq
ctx = zmq.Context()
rep = ctx.socket(zmq.REP)
rep.bind("tcp://127.0.0.1:*")
req = ctx.socket(zmq.REQ)
req.connect(rep.last_endpoint.decode())
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        lib = sys.modules.get("exporter.library")
        print(len(lib._process.handles) if lib else 0, flush=True)
        continue
    n, begin = 0, time.perf_counter()
    end = begin + float(line)
    while time.perf_counter() < end:
        for _ in range(50):
            req.send(b"x")
            rep.send(rep.recv())
            req.recv()
        n += 50
    print(n / (time.perf_counter() - begin), flush=True)
"""

LAUNCHER = [sys.executable, "-m", "exporter.instrument.launcher"]


@dataclass
class Throughput:
    ratio: float
    plain: float  # median round trips/s
    launched: float
    instrumented_sockets: int
    windows: int


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{cmd}: the application did not start")
    return proc


def _ask(proc: subprocess.Popen[str], line: str) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def throughput(pairs: int, window: float) -> Throughput:
    plain = _start([sys.executable, "-c", APP])
    launched = _start([*LAUNCHER, sys.executable, "-c", APP])
    try:
        _ask(plain, str(window))  # warm-up, both
        _ask(launched, str(window))
        ratios, a, b = [], [], []
        for n in range(pairs):  # ABBA: plain, launched, launched, plain, ...
            order = (plain, launched) if n % 2 == 0 else (launched, plain)
            got = {id(p): _ask(p, str(window)) for p in order}
            a.append(got[id(plain)])
            b.append(got[id(launched)])
            # A window of 0 round trips (a stalled machine) gives 0, never a
            # ZeroDivisionError: the bench reports, the goal shows unmet (as bench/app.py).
            ratios.append(got[id(launched)] / got[id(plain)] if got[id(plain)] else 0.0)
        instrumented = int(_ask(launched, "check"))
        return Throughput(
            statistics.median(ratios), statistics.median(a), statistics.median(b),
            instrumented, pairs,
        )  # fmt: skip
    finally:
        for proc in (plain, launched):
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10)


@dataclass
class Startup:
    overhead_ms: float  # median (launched - plain) over alternating runs
    plain_ms: float
    launched_ms: float
    runs: int


def _wall(cmd: list[str]) -> float:
    begin = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - begin


def startup(runs: int) -> Startup:
    plain_cmd = [sys.executable, "-c", "pass"]
    launched_cmd = [*LAUNCHER, sys.executable, "-c", "pass"]
    _wall(plain_cmd)
    _wall(launched_cmd)
    plain, launched, diffs = [], [], []
    for n in range(runs):
        if n % 2 == 0:
            p, q = _wall(plain_cmd), _wall(launched_cmd)
        else:
            q, p = _wall(launched_cmd), _wall(plain_cmd)
        plain.append(p)
        launched.append(q)
        diffs.append(q - p)
    return Startup(
        statistics.median(diffs) * 1000,
        statistics.median(plain) * 1000,
        statistics.median(launched) * 1000,
        runs,
    )
