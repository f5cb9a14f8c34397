"""`relay_fanin` (issue 16): many application processes' sockets relayed to one sidecar.

A real daemon (`python -m exporter`, its own process) listens for the relay on an ipc
socket. Fan-in: 50 senders x 20 sockets, each sender a `RelaySender` (the library's own
sender: its thread, its own context and DEALER, its coalescing) with its own relay id, all
threads of this process rather than 50 processes (50 Python processes do not fit 2 cores
beside the daemon and would measure the scheduler). Their sockets' states are reduced from
synthetic monitor events by the library's reducer (`apply_event`), 3 events per connection
(ACCEPTED, HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED, as bench's load generator causes),
at `rate` connections/s in total spread round-robin over every socket: the relay sees what
it would see from real sockets under that churn, without 1,000 real sockets' monitors
competing for the same 2 cores (their cost is the library's, measured by bench/library.py).

- the daemon's CPU per relayed message (from /proc, over a window without scrapes besides
  the two reading its counters);
- staleness: a connection applied at t is seen on /metrics (its socket's
  `zmq_accepted_total` reached) at the end of the first scrape showing it; scrapes every
  100 ms, so the figure includes up to 100 ms of polling;
- the daemon's RSS per relayed socket: after every socket is relayed and scraped, against
  the same daemon before any sender;
- the sender's cost: one application process (a subprocess, as in production) with
  `sender_sockets` ROUTERs instrumented in library mode under real TCP churn (bench's
  load generator) at `rate` connections/s, with `relay=` to the daemon against without:
  CPU per monitor event of the whole process (headline) and of the library's threads.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bench.common import BACKLOG, DaemonProcess, LoadGen, free_port, thread_cpu, wait_until
from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import SocketSnapshot, SocketState, apply_event, snapshot_socket
from exporter.relay.sender import RelaySender

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_INTERVAL = 0.1
_ACCEPTED = re.compile(r"^zmq_accepted_total\{([^}]*)\} ([0-9.e+]+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_CONNECTION = (  # what one raw connect+close of bench's load generator causes
    (int(Event.ACCEPTED), 12),
    (int(Event.HANDSHAKE_FAILED_NO_DETAIL), 0),
    (int(Event.DISCONNECTED), 12),
)


@dataclass
class RelayResult:
    senders: int
    sockets_per_sender: int
    rate: float
    connections: int  # applied during the CPU window
    messages: int  # received by the daemon during the CPU window
    daemon_us_per_message: float
    daemon_us_per_connection: float
    staleness_p99_s: float
    staleness_p50_s: float
    staleness_max_s: float
    staleness_samples: int
    rss_per_socket_bytes: float  # after the churn and the scrapes
    rss_per_socket_before_churn_bytes: float  # every socket relayed once, scraped
    sender_ratio: float  # process CPU per event, relay / none (medians)
    sender: dict[str, float] = field(default_factory=dict)


class _Daemon(DaemonProcess):
    def __init__(self, tmp: Path) -> None:
        self.endpoint = f"ipc://{tmp}/relay.sock"
        config = f"relay:\n  listen: [{self.endpoint}]\n  expire: 5m\n"
        super().__init__(tmp, "relay", config, scrape_timeout=10)

    def received(self) -> int:
        m = re.search(r"^zmq_exporter_relay_messages_received_total ([0-9.e+]+)$",
                      self.scrape(), re.M)  # fmt: skip
        return int(float(m.group(1))) if m else 0


def accepted(text: str) -> dict[tuple[str, str], float]:
    """(process, socket) -> zmq_accepted_total, summed over endpoints."""
    out: dict[tuple[str, str], float] = {}
    for labels, value in _ACCEPTED.findall(text):
        d = dict(_LABEL.findall(labels))
        key = (d.get("process", ""), d.get("socket", ""))
        out[key] = out.get(key, 0.0) + float(value)
    return out


class _Sender:
    """One synthetic application process: `n` sockets reduced from synthetic events,
    relayed by a RelaySender of its own."""

    def __init__(self, index: int, n: int, endpoint: str) -> None:
        self.relay_id = f"bench-{index}"
        self.lock = threading.Lock()
        self.states: list[SocketState] = []
        self.snaps: dict[str, SocketSnapshot] = {}
        for j in range(n):
            ep = f"tcp://0.0.0.0:{20000 + j}"
            state = SocketState(f"s{j}", "ROUTER", {}, EndpointMap((ep,), ()))
            apply_event(state, int(Event.LISTENING), 10, ep, time.time())
            self.states.append(state)
            self.snaps[state.name] = snapshot_socket(state)
        self.sender = RelaySender(endpoint, self.source, self.relay_id)
        self.sender.start()

    def source(self) -> tuple[SocketSnapshot, ...]:
        with self.lock:
            return tuple(self.snaps.values())

    def connection(self, j: int) -> float:
        """One connection's events on socket j; its new accepted count."""
        state = self.states[j]
        ep = state.endpoint_map.binds[0]
        now = time.time()
        with self.lock:
            for event, value in _CONNECTION:
                apply_event(state, event, value, ep, now)
            snap = self.snaps[state.name] = snapshot_socket(state)
        return float(sum(e.counts.get(Event.ACCEPTED, 0) for e in snap.endpoints))


class _Churn:
    """Applies `rate` connections/s round-robin over every sender's sockets, on a thread;
    every `mark` seconds one connection is remembered for staleness."""

    def __init__(self, senders: list[_Sender], rate: float, mark: float = 0.05) -> None:
        self.senders = senders
        self.rate = rate
        self.mark = mark
        self.applied = 0
        self.marks: list[tuple[float, str, str, float]] = []  # (t, process, socket, count)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = len(self.senders[0].states)
        total = n * len(self.senders)
        start = time.monotonic()
        next_mark = start
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.applied < due:
                k = self.applied % total
                sender, j = self.senders[k % len(self.senders)], k // len(self.senders)
                count = sender.connection(j)
                self.applied += 1
                now = time.monotonic()
                if now >= next_mark:
                    self.marks.append((now, sender.relay_id, f"s{j}", count))
                    next_mark = now + self.mark
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _staleness(daemon: _Daemon, churn: _Churn, seconds: float) -> list[float]:
    seen: list[tuple[float, dict[tuple[str, str], float]]] = []
    first = len(churn.marks)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        text = daemon.scrape()
        seen.append((time.monotonic(), accepted(text)))
        time.sleep(SCRAPE_INTERVAL)
    marks = churn.marks[first:]
    out = []
    for t, process, sock, count in marks:
        for when, values in seen:
            if when >= t and values.get((process, sock), 0.0) >= count:
                out.append(when - t)
                break
    return out


def _sender_cost(
    endpoint: str, sockets: int, rate: float, seconds: float, pairs: int
) -> dict[str, Any]:
    out: dict[str, list[float]] = {"relay": [], "none": [], "relay_threads": [],
                                   "none_threads": []}  # fmt: skip
    for _ in range(pairs):
        for mode in ("none", "relay"):
            args = [sys.executable, "-m", "bench.relay", "--app", "--sockets", str(sockets),
                    "--rate", str(rate), "--seconds", str(seconds)]  # fmt: skip
            if mode == "relay":
                args += ["--relay", endpoint]
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                                  timeout=seconds + 120, stdin=subprocess.DEVNULL)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"bench.relay --app failed: {done.stderr[-2000:]}")
            r = json.loads(done.stdout)
            out[mode].append(r["process_us_per_event"])
            out[f"{mode}_threads"].append(r["threads_us_per_event"])
    return {k: statistics.median(v) for k, v in out.items()}


def run(senders: int, sockets: int, rate: float, seconds: float, sender_sockets: int,
        sender_seconds: float, pairs: int) -> RelayResult:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        daemon = _Daemon(Path(tmp))
        fleet: list[_Sender] = []
        churn: _Churn | None = None
        try:
            daemon.scrape()
            time.sleep(0.5)
            rss0 = daemon.rss()
            fleet = [_Sender(i, sockets, daemon.endpoint) for i in range(senders)]
            total = senders * sockets

            def all_relayed() -> bool:
                values = accepted(daemon.scrape())
                return sum(1 for k in values if k[0].startswith("bench-")) >= total

            if not wait_until(all_relayed, 60, 0.2):
                raise RuntimeError("not every relayed socket reached the daemon in 60 s")
            rss_relayed = daemon.rss()
            churn = _Churn(fleet, rate)
            time.sleep(1.0)  # steady state
            cpu0, msgs0, applied0 = daemon.cpu(), daemon.received(), churn.applied
            time.sleep(seconds)
            cpu1, msgs1, applied1 = daemon.cpu(), daemon.received(), churn.applied
            delays = sorted(_staleness(daemon, churn, seconds))
            churn.stop()
            daemon.scrape()
            rss1 = daemon.rss()
            for s in fleet:
                s.sender.stop()
            fleet = []
            cost = _sender_cost(daemon.endpoint, sender_sockets, rate, sender_seconds, pairs)
        finally:
            if churn is not None:
                churn.stop()
            for s in fleet:
                s.sender.stop()
            daemon.close()
    msgs, conns = max(1, msgs1 - msgs0), max(1, applied1 - applied0)
    p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))] if delays else float("inf")
    return RelayResult(
        senders=senders,
        sockets_per_sender=sockets,
        rate=rate,
        connections=conns,
        messages=msgs,
        daemon_us_per_message=(cpu1 - cpu0) / msgs * 1e6,
        daemon_us_per_connection=(cpu1 - cpu0) / conns * 1e6,
        staleness_p99_s=p99,
        staleness_p50_s=statistics.median(delays) if delays else float("inf"),
        staleness_max_s=delays[-1] if delays else float("inf"),
        staleness_samples=len(delays),
        rss_per_socket_bytes=(rss1 - rss0) / total,
        rss_per_socket_before_churn_bytes=(rss_relayed - rss0) / total,
        sender_ratio=cost["relay"] / cost["none"],
        sender=cost,
    )


def app(sockets: int, rate: float, seconds: float, relay: str | None) -> dict[str, float]:
    """One application process (`--app`): `sockets` ROUTERs instrumented in library mode
    (to `relay`, or to nothing), churned for `seconds`; its CPU per monitor event."""
    import exporter
    from exporter import library

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    routers, handles, ports = [], [], []
    for i in range(sockets):
        r = ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.BACKLOG, BACKLOG)
        handles.append(exporter.instrument(r, f"r{i}", registry=None, relay=relay,
                                           relay_id="bench-app"))  # fmt: skip
        port = free_port()
        r.bind(f"tcp://127.0.0.1:{port}")
        routers.append(r)
        ports.append(port)
    reader = library.reader()
    assert reader is not None
    relay_threads = [t for t in threading.enumerate() if t.name == "zmq-exporter-relay"]
    clocks: list[Callable[[], float]] = [thread_cpu(t) for t in relay_threads]
    time.sleep(0.5)  # connected, hello and first states sent
    start = time.monotonic() + 0.3
    load = LoadGen(ports, int(rate * seconds) + 1, seconds, rate, 0.01, start)
    # process_time(): os.times() ticks at 10 ms, coarse for a few hundred ms of CPU.
    cpu0, tcpu0 = time.process_time(), reader.cpu_seconds() + sum(c() for c in clocks)
    events0 = reader.snapshot().stats.events
    try:
        load.tally()
        time.sleep(0.3)  # the last coalesced batch read and relayed
        cpu = time.process_time() - cpu0
        tcpu = reader.cpu_seconds() + sum(c() for c in clocks) - tcpu0
        events = reader.snapshot().stats.events - events0
    finally:
        load.kill()
    for h in handles:
        h.close()
    for r in routers:
        r.close()
    ctx.term()
    return {
        "events": events,
        "process_us_per_event": cpu / max(1, events) * 1e6,
        "threads_us_per_event": tcpu / max(1, events) * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--app", action="store_true", help="one application process")
    parser.add_argument("--sockets", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--relay")
    args = parser.parse_args()
    if args.app:
        print(json.dumps(app(args.sockets, args.rate, args.seconds, args.relay)))
        return 0
    r = run(50, 20, args.rate, args.seconds, args.sockets, args.seconds, 2)
    print(json.dumps(r.__dict__, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
