"""`connections_scrape_cost` (issue 18): what the connection metrics cost a scrape.

Two real daemons (`python -m exporter`, each its own process) on the same sockets config,
`endpoints` ROUTERs bound on loopback, one with `connections: {metrics: true}` and one with
`{metrics: false}`; each holds `endpoints x per_endpoint` live TCP connections (4 x 1,000
in the full and quick profiles) from this process. The clients are raw TCP sockets that
speak ZMTP 3.0's NULL handshake as a DEALER (the prober's wire code), so libzmq counts them
as handshaked peers and no handshake timer drops them; they then stay silent (no
heartbeats from a bind socket, so nothing moves). /metrics of the two is then scraped back
to back, alternating A B B A per round on one clock: the value is the median scrape time
with the metrics on ÷ off.

Details reported:
- `tcp_info_us`: one `getsockopt(TCP_INFO)` per connection, over every connection of the
  "on" daemon (this process's ends: the same kind of socket, the same syscall), fastest
  of 5 passes;
- `first_read_us` / `pinned_read_us`: `exporter.connections.kernel.read_connection` on the same
  fds, unpinned (addresses checked) and pinned (the steady state), fastest of 5 passes;
- `sample_duration_s`: the on-daemon's own `zmq_exporter_connection_sample_duration_seconds`
  (the sampler's last pass over all connections), when the daemon has that family;
- `sampler_cpu_share`: the on-daemon's CPU minus the off-daemon's over an idle window
  (nothing scraped, nothing connecting), per wall second: the sampler's share of a core at
  the default interval (Python 3.11 does not name its threads for the kernel, so the
  sampler thread's own clock cannot be told apart from outside).
"""

from __future__ import annotations

import re
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.common import BACKLOG, DaemonProcess, free_port, raise_fd_limit, wait_until
from exporter.connections.kernel import TCP_INFO_LEN, Expected, Gone, read_connection
from exporter.prober.greeting import our_greeting
from exporter.prober.wire import basic_properties, command

ROOT = Path(__file__).resolve().parents[1]
# What a DEALER says: the ZMTP 3.0 greeting (NULL, as client) and its READY command.
HELLO = our_greeting("NULL") + command(b"READY", basic_properties("DEALER"))
SAMPLE_DURATION = "zmq_exporter_connection_sample_duration_seconds"
SAMPLE_AGE = "zmq_exporter_connection_sample_age_seconds"
_SAMPLE = re.compile(rf"^{SAMPLE_DURATION}(_sum|_count)?(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", re.M)
_FAMILY_SAMPLE = re.compile(r"^(zmq_\w+?)(?:\{[^}]*\})? [0-9.e+-]+$", re.M)
_LABEL_ENDPOINT = re.compile(r'endpoint="([^"]*)"')


@dataclass
class ConnectionsResult:
    connections: int  # per daemon
    rounds: int
    scrape_on_s: float  # medians
    scrape_off_s: float
    tcp_info_us: float
    first_read_us: float
    pinned_read_us: float
    sample_duration_s: float | None  # steady state (pinned reads), after the idle window
    first_sample_duration_s: float | None  # the first sample of every connection
    sample_interval_s: float
    sampler_cpu_share: float
    idle_seconds: float
    families_on: int  # zmq_connection* families served by the on-daemon
    series_on: int  # and their samples
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.scrape_on_s / self.scrape_off_s


class _Daemon(DaemonProcess):
    """A real daemon: `endpoints` ROUTERs, each bound on a loopback port of its own."""

    def __init__(self, tmp: Path, name: str, endpoints: int, metrics: bool) -> None:
        self.ports = [free_port() for _ in range(endpoints)]
        lines = [
            f"connections: {{metrics: {'true' if metrics else 'false'}}}",
            "sockets:",
        ]
        for i, port in enumerate(self.ports):
            lines += [
                f"  - name: router-{i}",
                "    type: ROUTER",
                f"    bind: ['tcp://127.0.0.1:{port}']",
                f"    options: {{backlog: {BACKLOG}}}",
            ]
        super().__init__(tmp, name, "\n".join(lines) + "\n", lambda text: "zmq_listening" in text)

    def timed_scrape(self) -> float:
        t0 = time.perf_counter()
        self.scrape()
        return time.perf_counter() - t0

    def handshaked(self) -> float:
        text = self.scrape()
        return sum(
            float(v)
            for v in re.findall(r"^zmq_handshake_succeeded_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
        )


def _handshaked_all(daemon: _Daemon, n: int) -> bool:
    return daemon.handshaked() >= n


def _connect(port: int, count: int) -> list[socket.socket]:
    """`count` ZMTP-speaking clients of the ROUTER on `port`."""
    out = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(HELLO)
        out.append(s)
    return out


def _per_connection_us(
    fn: Callable[[socket.socket], object], socks: list[socket.socket], passes: int = 5
) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for s in socks:
            fn(s)
        best = min(best, time.perf_counter() - t0)
    return best / len(socks) * 1e6


def read_costs(socks: list[socket.socket], port_of: dict[int, int]) -> tuple[float, float, float]:
    """(TCP_INFO alone, first read, pinned read), µs per connection, fastest of 5 passes,
    over this process's ends of the connections (connect side: the endpoint is the peer)."""
    tcp_info = _per_connection_us(
        lambda s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN), socks
    )
    expected = {
        s.fileno(): Expected.for_endpoint(f"tcp://127.0.0.1:{port_of[s.fileno()]}", "connect")
        for s in socks
    }
    pinned: dict[int, Expected] = {}

    def first(s: socket.socket) -> None:
        info = read_connection(s.fileno(), expected[s.fileno()])
        if isinstance(info, Gone):
            raise RuntimeError(f"a live bench connection read as gone: {info}")
        pinned[s.fileno()] = expected[s.fileno()].pinned(info)

    def again(s: socket.socket) -> None:
        read_connection(s.fileno(), pinned[s.fileno()])

    first_us = _per_connection_us(first, socks)
    pinned_us = _per_connection_us(again, socks)
    return tcp_info, first_us, pinned_us


def sample_duration(text: str) -> float | None:
    """The on-daemon's sampler duration: a gauge's value, or a summary/histogram's mean."""
    values: dict[str, float] = {}
    for suffix, value in _SAMPLE.findall(text):
        values[suffix] = values.get(suffix, 0.0) + float(value)
    if "" in values:
        return values[""]
    if values.get("_count"):
        return values["_sum"] / values["_count"]
    return None


def connection_series(text: str) -> tuple[int, int]:
    """(families, samples) of the zmq_connection* metrics in `text` (not zmq_connections,
    the event-based count both daemons serve)."""
    names = [
        n
        for n in _FAMILY_SAMPLE.findall(text)
        if n.startswith(("zmq_connection_", "zmq_connections_")) and n != "zmq_connections"
    ]
    return len(set(names)), len(names)


def gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def fresh_sample(daemon: _Daemon, since: float) -> str | None:
    """The daemon's /metrics once its sampler finished a sample that started after
    `since` (a time.monotonic()), i.e. with every connection open by then; else None."""
    text = daemon.scrape()
    now = time.monotonic()
    age, took = gauge(text, SAMPLE_AGE), sample_duration(text)
    if age is None or took is None:
        return None
    return text if now - age - took > since else None


def run(
    endpoints: int = 4,
    per_endpoint: int = 1000,
    rounds: int = 200,
    scrape_seconds: float = 10.0,
    idle_seconds: float = 10.0,
    sample_interval: float = 2.0,
) -> ConnectionsResult:
    """`rounds` rounds of back-to-back scrapes (A B, then B A) spread evenly over
    `scrape_seconds`, so that they meet the sampler's passes as often as chance has it."""
    raise_fd_limit()
    n = endpoints * per_endpoint
    with tempfile.TemporaryDirectory(prefix="zmqx-bench-conn-") as tmp_dir:
        tmp = Path(tmp_dir)
        on = _Daemon(tmp, "on", endpoints, metrics=True)
        daemons = [on]
        clients: list[socket.socket] = []
        try:
            off = _Daemon(tmp, "off", endpoints, metrics=False)
            daemons.append(off)
            port_of: dict[int, int] = {}
            on_clients: list[socket.socket] = []
            for d in daemons:
                for port in d.ports:
                    socks = _connect(port, per_endpoint)
                    clients += socks
                    if d is on:
                        on_clients += socks
                        port_of.update((s.fileno(), port) for s in socks)
            for d in daemons:
                if not wait_until(partial(_handshaked_all, d, n), 120, 0.2):
                    raise RuntimeError(f"only {d.handshaked()} of {n} clients handshaked")
            # A sample of every connection (the sampler's first: unpinned reads) first.
            everyone = time.monotonic()
            first_text = ""

            def sampled() -> bool:
                nonlocal first_text
                first_text = fresh_sample(on, everyone) or ""
                return bool(first_text)

            wait_until(sampled, 3 * sample_interval + 10, 0.1)
            first_duration = sample_duration(first_text) if first_text else None
            on.scrape(), off.scrape()  # warm: first scrapes build label strings
            times: dict[str, list[float]] = {"on": [], "off": []}
            start = time.monotonic()
            for i in range(rounds):  # A B, B A: each order as often, drifts cancel
                slot = start + i * scrape_seconds / rounds
                pause = slot - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing: the rounds are spread, not waited for
                order = ((on, "on"), (off, "off")) if i % 2 == 0 else ((off, "off"), (on, "on"))
                for d, key in order:
                    times[key].append(d.timed_scrape())
            on_text, off_text = on.scrape(), off.scrape()
            families, series = connection_series(on_text)
            tcp_info_us, first_us, pinned_us = read_costs(on_clients, port_of)
            # Idle window: no scrape, no connection moves; the on-daemon's sampler runs.
            a0, b0, t0 = on.cpu(), off.cpu(), time.monotonic()
            time.sleep(idle_seconds)
            a1, b1, t1 = on.cpu(), off.cpu(), time.monotonic()
            wall = t1 - t0
            duration = sample_duration(on.scrape())  # a steady-state (pinned) sample
            on_sorted, off_sorted = sorted(times["on"]), sorted(times["off"])
            p95 = max(0, round(0.95 * len(on_sorted)) - 1)
            return ConnectionsResult(
                connections=n,
                rounds=rounds,
                scrape_on_s=statistics.median(on_sorted),
                scrape_off_s=statistics.median(off_sorted),
                tcp_info_us=tcp_info_us,
                first_read_us=first_us,
                pinned_read_us=pinned_us,
                sample_duration_s=duration,
                first_sample_duration_s=first_duration,
                sample_interval_s=sample_interval,
                sampler_cpu_share=((a1 - a0) - (b1 - b0)) / wall,
                idle_seconds=idle_seconds,
                families_on=families,
                series_on=series,
                detail={
                    "on_idle_cpu_share": (a1 - a0) / wall,
                    "off_idle_cpu_share": (b1 - b0) / wall,
                    "scrape_on_p95_s": on_sorted[p95],
                    "scrape_off_p95_s": off_sorted[p95],
                    "metrics_bytes_on": len(on_text),
                    "metrics_bytes_off": len(off_text),
                    "scrape_on_mean_s": statistics.fmean(on_sorted),
                    "scrape_off_mean_s": statistics.fmean(off_sorted),
                },
            )
        finally:
            for s in clients:
                s.close()
            for d in daemons:
                d.close()


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--per-endpoint", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--scrape-seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    r = run(args.endpoints, args.per_endpoint, args.rounds, args.scrape_seconds, args.idle)
    print(json.dumps({"ratio": r.ratio, **vars(r)}, indent=1))


if __name__ == "__main__":
    main()
