"""`python -m bench.soak [--minutes N | --quick | --seconds S] [--rate R] [--json]`: a soak.

A real daemon process (`python -m exporter`) under N minutes of connection churn from
bench/loadgen.py (raw TCP connect+close at `--rate` connections/s against a ROUTER it
monitors), while this process scrapes /metrics and samples the daemon's resident memory,
open fds and threads every `--interval` seconds. At the end the daemon's counters must
equal the load generator's own tally, and no scraped counter may ever have gone
backwards. Reported: RSS slope (bytes/minute, least squares over all samples and over the
second half only, after start-up allocations have settled), fd and thread min/max.

Not a test (it takes minutes): run it by hand; results go to bench/results.md ("Soak").
Exit status 0 only if the counters equal the tally and nothing went backwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.common import BACKLOG, LOADGEN, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
# The counters of the churned ROUTER that must equal the tally (raw TCP connect+close:
# ACCEPTED, HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED once per connection).
TALLIED = ("zmq_accepted_total", "zmq_disconnected_total")


@dataclass
class Sample:
    t: float  # seconds since the daemon was ready
    rss: int  # bytes
    fds: int
    threads: int


@dataclass
class SoakResult:
    seconds: float
    rate: float
    interval: float
    completed: int  # the load generator's tally
    failed: int
    counted: dict[str, float]  # the daemon's counters at the end
    exact: bool  # counted == completed for every TALLIED counter, and 0 connections
    backwards: list[str]  # counters that went down between two scrapes (must be empty)
    scrapes: int
    scrape_errors: int
    rss_start: int
    rss_end: int
    rss_max: int
    rss_slope_bytes_per_min: float
    rss_slope_second_half_bytes_per_min: float
    fds_min: int
    fds_max: int
    threads_min: int
    threads_max: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exact and not self.backwards


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per minute."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def read_sample(pid: int, t: float) -> Sample:
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return Sample(round(t, 2), rss, fds, threads)


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Series:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def socket_value(series: Series, name: str, sock: str) -> float:
    return sum(v for (n, labels), v in series.items() if n == name and ("socket", sock) in labels)


def counters_backwards(before: Series, after: Series) -> list[str]:
    """Counter series (`*_total`) present in both scrapes whose value went down."""
    return [
        f"{name}{dict(labels)}: {before[(name, labels)]} -> {v}"
        for (name, labels), v in after.items()
        if name.endswith("_total") and (name, labels) in before and v < before[(name, labels)]
    ]


CONFIG = """\
sockets:
  - name: churn
    type: ROUTER
    bind: ['tcp://127.0.0.1:{port}']
    options: {{backlog: {backlog}}}
  - name: quiet
    type: PULL
    bind: ['ipc://{ipc}/quiet']
  - name: outbound
    type: DEALER
    connect: ['tcp://127.0.0.1:{dead}']
    options: {{reconnect_ivl: 500ms}}
"""


class DaemonProcess:
    """`python -m exporter` on a temp config; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, config: str, web_port: int, workdir: Path) -> None:
        path = workdir / "config.yml"
        path.write_text(config)
        self.url = f"http://127.0.0.1:{web_port}"
        self.log = workdir / "daemon.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    f"--config.file={path}",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def soak(seconds: float, rate: float, interval: float, progress: bool = False) -> SoakResult:
    workdir = Path(tempfile.mkdtemp(prefix="zmqx-soak-"))
    port, dead = free_port(), free_port()  # `dead`: nothing listens (a reconnect cycle)
    config = CONFIG.format(port=port, backlog=BACKLOG, ipc=workdir, dead=dead)
    daemon = DaemonProcess(config, free_port(), workdir)
    loadgen: subprocess.Popen[str] | None = None
    try:
        if not wait_until(daemon.ready, 30, 0.05):
            raise RuntimeError(f"daemon not ready: {daemon.log.read_text()}")
        pid = daemon.proc.pid
        t0 = time.monotonic()
        samples = [read_sample(pid, 0.0)]
        count = int(seconds * rate) + 1
        loadgen = subprocess.Popen(
            [
                *(sys.executable, str(LOADGEN), "--port", str(port), "--count", str(count)),
                *("--rate", str(rate), "--deadline", str(seconds), "--connect-timeout", "1"),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        backwards: list[str] = []
        scrapes = errors = 0
        last: Series | None = None
        next_at = t0 + interval
        # Bounded: the load generator stops at its deadline; this loop at twice it.
        while loadgen.poll() is None and time.monotonic() < t0 + 2 * seconds + 30:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            now = time.monotonic() - t0
            samples.append(read_sample(pid, now))
            try:
                series = scrape(daemon.url + "/metrics")
                scrapes += 1
            except OSError:
                errors += 1
                continue
            if last is not None:
                backwards += counters_backwards(last, series)
            last = series
            if progress:
                s = samples[-1]
                accepted = socket_value(series, "zmq_accepted_total", "churn")
                print(
                    f"{now:7.1f}s rss {s.rss / 2**20:6.1f} MiB fds {s.fds:4d} "
                    f"threads {s.threads:3d} accepted {accepted:9.0f}",
                    file=sys.stderr,
                    flush=True,
                )
        out, _ = loadgen.communicate(timeout=60)
        tally = json.loads(out)
        completed = int(tally["completed"])

        def settled() -> bool:
            series = scrape(daemon.url + "/metrics")
            return all(socket_value(series, c, "churn") == completed for c in TALLIED)

        wait_until(settled, 60, 0.2)
        final = scrape(daemon.url + "/metrics")
        if last is not None:
            backwards += counters_backwards(last, final)
        samples.append(read_sample(pid, time.monotonic() - t0))
        counted = {c: socket_value(final, c, "churn") for c in (*TALLIED, "zmq_connections")}
        exact = all(counted[c] == completed for c in TALLIED) and counted["zmq_connections"] == 0
        rss = [(s.t, float(s.rss)) for s in samples]
        half = samples[-1].t / 2
        return SoakResult(
            seconds=round(samples[-1].t, 1),
            rate=rate,
            interval=interval,
            completed=completed,
            failed=int(tally["failed"]),
            counted=counted,
            exact=exact,
            backwards=backwards,
            scrapes=scrapes,
            scrape_errors=errors,
            rss_start=samples[0].rss,
            rss_end=samples[-1].rss,
            rss_max=max(s.rss for s in samples),
            rss_slope_bytes_per_min=round(slope_per_minute(rss)),
            rss_slope_second_half_bytes_per_min=round(
                slope_per_minute([p for p in rss if p[0] >= half])
            ),
            fds_min=min(s.fds for s in samples),
            fds_max=max(s.fds for s in samples),
            threads_min=min(s.threads for s in samples),
            threads_max=max(s.threads for s in samples),
            samples=samples,
        )
    finally:
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(r: SoakResult) -> str:
    mib = 2**20
    lines = [
        f"soak {r.seconds:.0f} s at {r.rate:g} connections/s, sampled every {r.interval:g} s",
        f"  load generator: {r.completed} completed, {r.failed} failed",
        f"  daemon counted: {', '.join(f'{k}={v:g}' for k, v in r.counted.items())}"
        f"  -> {'exact' if r.exact else 'NOT EXACT'}",
        f"  scrapes: {r.scrapes} ({r.scrape_errors} failed), counters backwards: "
        f"{len(r.backwards)}",
        f"  RSS: start {r.rss_start / mib:.1f} MiB, end {r.rss_end / mib:.1f} MiB, "
        f"max {r.rss_max / mib:.1f} MiB",
        f"  RSS slope: {r.rss_slope_bytes_per_min / 1024:+.1f} KiB/min (all), "
        f"{r.rss_slope_second_half_bytes_per_min / 1024:+.1f} KiB/min (second half)",
        f"  fds: {r.fds_min}..{r.fds_max}, threads: {r.threads_min}..{r.threads_max}",
    ]
    lines += [f"  backwards: {b}" for b in r.backwards[:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0, help="default: %(default)s")
    length.add_argument("--quick", action="store_true", help="60 s")
    length.add_argument("--seconds", type=float, help="any length (the smoke test: 10)")
    parser.add_argument("--rate", type=float, default=500.0, help="connections/s (500)")
    parser.add_argument("--interval", type=float, help="seconds between samples (5; quick 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--progress", action="store_true", help="a line per sample on stderr")
    args = parser.parse_args(argv)
    seconds = args.seconds or (60.0 if args.quick else args.minutes * 60)
    interval = args.interval or (5.0 if seconds > 120 else 2.0 if seconds > 20 else 1.0)
    result = soak(seconds, args.rate, interval, args.progress)
    if args.json:
        doc: dict[str, Any] = asdict(result)
        doc["ok"] = result.ok
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(report(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
