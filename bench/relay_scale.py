"""`relay_scale`: a sidecar holding many processes' same-named sockets (the relay's normal
case at scale), against the same daemon's own sockets, side by side in one run.

Three real daemons (`python -m exporter`, each its own process), connection metrics off:
- `sidecar`: one daemon-owned ROUTER and a relay listener (ipc); `processes` sender
  processes x `sockets` sockets named alike (`s0`, `s1`, ...) are relayed to it;
- `owned`: the same config plus `owned` daemon-owned ROUTERs bound on ipc (the same shape
  of series as a relayed socket: one bind endpoint);
- `base`: the same config as the sidecar, nothing relayed to it (the fixed cost of a
  scrape: HTTP, self-metrics, process collector).

The sender processes are simulated by a few subprocesses (`python -m bench.relay_scale
--sender`), each holding one DEALER per simulated process (its own connection, process id
and instance, as a real process has) and speaking the wire format with the library's own
encoder (`exporter.relay.wire.encode`, `encode_socket`); their sockets' states are reduced from
synthetic monitor events by the library's reducer, 3 events per connection, as in
bench/relay.py. A thousand Python processes (or 1,000 `RelaySender` threads, each with a
context) would not fit 2 cores beside the daemon; what the sidecar sees is the same: 1,000
connections, 1,000 process ids, 20,000 sockets.

Measured:
- sidecar RSS per relayed socket (`VmRSS`), against the same daemon before any sender
  (scraped once, then read when its RSS and thread count hold for 3 reads 50 ms apart):
  once every socket is relayed and scraped, and after churn (`rounds` new states of every
  socket, the sidecar scraped every 0.5 s meanwhile, then scraped twice);
- a warm scrape's cost per socket (every socket unchanged since the previous scrape),
  relayed against daemon-owned: (median scrape time of `sidecar` - `base`) / relayed
  sockets ÷ (median of `owned` - `base`) / owned sockets; the three are scraped in rotating
  order, round after round, so drifts of the machine hit all alike. A scrape is timed from
  the request to the last byte read (`urllib`), as Prometheus would see it.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq

from bench.common import ROOT, DaemonProcess, raise_fd_limit, wait_until
from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import SocketState, apply_event, snapshot_socket
from exporter.relay.wire import encode, encode_socket

_CONNECTION = (  # one raw connect+close, as bench/relay.py and bench's load generator
    (int(Event.ACCEPTED), 12),
    (int(Event.HANDSHAKE_FAILED_NO_DETAIL), 0),
    (int(Event.DISCONNECTED), 12),
)
HEARTBEAT_MS = 60_000  # the longest a sender may say: no heartbeat within the measure
SENDER_PROCESSES = 2  # subprocesses simulating the sender processes


@dataclass
class ScaleResult:
    processes: int
    sockets_per_process: int
    relayed: int  # sockets the sidecar held
    owned: int  # daemon-owned sockets of the `owned` daemon (beyond the base config's one)
    rounds: int  # churn: new states of every socket
    rss_per_socket_bytes: float  # after churn
    rss_per_socket_before_churn_bytes: float
    scrape_ratio: float  # per relayed socket / per owned socket, warm scrapes
    relayed_scrape_us_per_socket: float
    owned_scrape_us_per_socket: float
    scrape_s: dict[str, float]  # median warm scrape, per daemon
    bytes_per_socket: dict[str, float]  # /metrics bytes per socket, relayed and owned
    scrape_rounds: int
    messages: int  # received by the sidecar, in total
    sidecar_us_per_message: float  # sidecar CPU during churn / state messages of churn
    seconds: float


def _config(tmp: Path, name: str, owned: int, relay: bool) -> str:
    lines = [
        "limits: {max_sockets: 100000, max_series: 10000000}",
        "connections: {metrics: false}",
    ]
    if relay:
        lines += [
            "relay:",
            f"  listen: ['ipc://{tmp}/{name}-relay.sock']",
            "  expire: 5m",
            "  max_processes: 100000",
        ]
    lines.append("sockets:")
    for i in range(owned + 1):
        lines += [f"  - name: own-{i}", "    type: ROUTER", f"    bind: ['ipc://{tmp}/{name}-{i}']"]
    return "\n".join(lines) + "\n"


def _value(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# The baseline RSS is read once the daemon has stopped moving after its first scrape (the
# web worker that served it started, its allocations made): SETTLE_READS reads in a row,
# SETTLE_STEP_S apart, with the same RSS and thread count, within SETTLE_TIMEOUT_S.
SETTLE_READS = 3
SETTLE_STEP_S = 0.05
SETTLE_TIMEOUT_S = 10.0


def _rss_and_threads(daemon: DaemonProcess) -> tuple[int, int]:
    """(VmRSS in bytes, Threads) of the daemon, from one read of /proc/PID/status."""
    fields: dict[str, str] = {}
    with open(f"/proc/{daemon.proc.pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = rest
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def _settled_rss(daemon: DaemonProcess) -> int:
    """The daemon's RSS once SETTLE_READS consecutive reads agree (RSS and thread count);
    RuntimeError if they do not within SETTLE_TIMEOUT_S (at most ~200 reads)."""
    recent: deque[tuple[int, int]] = deque(maxlen=SETTLE_READS)

    def settled() -> bool:
        recent.append(_rss_and_threads(daemon))
        return len(recent) == SETTLE_READS and len(set(recent)) == 1

    if not wait_until(settled, SETTLE_TIMEOUT_S, SETTLE_STEP_S):
        raise RuntimeError(
            f"the sidecar's RSS and threads did not settle in {SETTLE_TIMEOUT_S:g} s: "
            f"last reads {list(recent)}"
        )
    return recent[-1][0]


def _timed_scrape(daemon: DaemonProcess) -> tuple[float, int]:
    t0 = time.perf_counter()
    text = daemon.scrape()
    return time.perf_counter() - t0, len(text)


class _Senders:
    """The sender subprocesses, driven by lines on their stdin."""

    def __init__(self, endpoint: str, processes: int, sockets: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        share = -(-processes // SENDER_PROCESSES)
        for first in range(0, processes, share):
            count = min(share, processes - first)
            args = [sys.executable, "-m", "bench.relay_scale", "--sender", endpoint,
                    "--first", str(first), "--processes", str(count),
                    "--sockets", str(sockets)]  # fmt: skip
            self.procs.append(
                subprocess.Popen(
                    args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )

    def command(self, line: str, timeout: float) -> int:
        """Send `line` to every sender; the messages they sent for it, in total."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line + "\n")
            p.stdin.flush()
        sent = 0
        deadline = time.monotonic() + timeout
        for p in self.procs:
            assert p.stdout is not None
            reply = p.stdout.readline()  # the sender bounds its own sends (SNDTIMEO)
            if not reply or time.monotonic() > deadline:
                raise RuntimeError(f"relay_scale sender failed ({p.poll()}) on {line!r}")
            sent += int(reply)
        return sent

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None and p.poll() is None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def run(processes: int, sockets: int, owned: int, rounds: int, scrape_rounds: int) -> ScaleResult:
    started = time.monotonic()
    raise_fd_limit()  # inherited by the daemons: 1,000 relay connections, 4 fds a socket
    relayed = processes * sockets
    with tempfile.TemporaryDirectory(prefix="bench-relay-scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        daemons: list[DaemonProcess] = []
        senders: _Senders | None = None
        try:
            sidecar = DaemonProcess(
                tmp, "sidecar", _config(tmp, "sidecar", 0, True), scrape_timeout=60
            )
            daemons.append(sidecar)
            base = DaemonProcess(tmp, "base", _config(tmp, "base", 0, True))
            daemons.append(base)
            mine = DaemonProcess(
                tmp,
                "owned",
                _config(tmp, "owned", owned, True),
                ready=lambda text: _value(text, "zmq_exporter_sockets") >= owned + 1,
                scrape_timeout=60,
            )
            daemons.append(mine)
            sidecar.scrape()
            rss0 = _settled_rss(sidecar)

            def received() -> float:
                return _value(sidecar.scrape(), "zmq_exporter_relay_messages_received_total")

            senders = _Senders(f"ipc://{tmp}/sidecar-relay.sock", processes, sockets)
            expected = senders.command("start", 120)
            if not wait_until(lambda: received() >= expected, 120, 0.5):
                rejected = re.findall(r"^zmq_exporter_relay_messages_rejected_total.*$",
                                      sidecar.scrape(), re.M)  # fmt: skip
                raise RuntimeError(f"the sidecar did not receive {expected} messages in 120 s "
                                   f"({received()}; {rejected})")  # fmt: skip
            text = sidecar.scrape()
            if _value(text, "zmq_exporter_relay_sockets") != relayed:
                raise RuntimeError(f"the sidecar holds {_value(text, 'zmq_exporter_relay_sockets')}"
                                   f" relayed sockets, not {relayed}")  # fmt: skip
            sidecar.scrape()
            rss_relayed = sidecar.rss()

            cpu0 = sidecar.cpu()
            churn = senders.command(f"churn {rounds}", 300)
            expected += churn
            # Scraped meanwhile, as Prometheus would: every socket changed between scrapes.
            if not wait_until(lambda: received() >= expected, 300, 0.5):
                raise RuntimeError(f"the sidecar did not receive the churn's {churn} messages")
            cpu1 = sidecar.cpu()
            sidecar.scrape()
            sidecar.scrape()
            rss1 = sidecar.rss()

            times: dict[str, list[float]] = {"sidecar": [], "owned": [], "base": []}
            sizes: dict[str, int] = {}
            order = [("sidecar", sidecar), ("owned", mine), ("base", base)]
            for _, daemon in order:
                daemon.scrape()  # warm: nothing changes from here on
            for k in range(scrape_rounds):
                for name, daemon in order[k % 3 :] + order[: k % 3]:
                    seconds, size = _timed_scrape(daemon)
                    times[name].append(seconds)
                    sizes[name] = size
        finally:
            if senders is not None:
                senders.close()
            for daemon in daemons:
                daemon.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    relayed_s = max(med["sidecar"] - med["base"], 1e-9) / relayed
    owned_s = max(med["owned"] - med["base"], 1e-9) / owned
    return ScaleResult(
        processes=processes,
        sockets_per_process=sockets,
        relayed=relayed,
        owned=owned,
        rounds=rounds,
        rss_per_socket_bytes=(rss1 - rss0) / relayed,
        rss_per_socket_before_churn_bytes=(rss_relayed - rss0) / relayed,
        scrape_ratio=relayed_s / owned_s,
        relayed_scrape_us_per_socket=relayed_s * 1e6,
        owned_scrape_us_per_socket=owned_s * 1e6,
        scrape_s=med,
        bytes_per_socket={
            "relayed": (sizes["sidecar"] - sizes["base"]) / relayed,
            "owned": (sizes["owned"] - sizes["base"]) / owned,
        },
        scrape_rounds=scrape_rounds,
        messages=expected,
        sidecar_us_per_message=(cpu1 - cpu0) / max(1, churn) * 1e6,
        seconds=time.monotonic() - started,
    )


# ---------------------------------------------------------------------------------------
# Sender subprocess: `--sender ENDPOINT --first N --processes N --sockets N`.


class _Process:
    """One simulated application process: its own DEALER (connection), id and instance."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, index: int,
                 sockets: int) -> None:  # fmt: skip
        self.process = f"scale-{index}"
        self.instance = secrets.token_hex(8)
        self.seq = 0
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 2000)
        self.dealer.setsockopt(zmq.SNDTIMEO, 30_000)
        self.dealer.setsockopt(zmq.SNDHWM, 0)  # a bench: never drop, never block on HWM
        self.dealer.connect(endpoint)
        self.states: list[SocketState] = []
        now = time.time()
        for j in range(sockets):
            ep = f"tcp://0.0.0.0:{20000 + j}"
            state = SocketState(f"s{j}", "ROUTER", {}, EndpointMap((ep,), ()))
            apply_event(state, int(Event.LISTENING), 10, ep, now)
            self.states.append(state)

    def send(self, kind: str, **body: object) -> None:
        self.seq += 1
        self.dealer.send(encode(kind, self.process, self.instance, self.seq, **body))

    def state(self, state: SocketState) -> None:
        self.send("state", socket=encode_socket(snapshot_socket(state)))

    def connection(self, j: int) -> None:
        state = self.states[j]
        ep = state.endpoint_map.binds[0]
        now = time.time()
        for event, value in _CONNECTION:
            apply_event(state, event, value, ep, now)
        self.state(state)


def sender(endpoint: str, first: int, processes: int, sockets: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 fds a DEALER
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(1)
    fleet = [_Process(ctx, endpoint, first + i, sockets) for i in range(processes)]
    for line in sys.stdin:
        words = line.split()
        sent = 0
        if words == ["start"]:
            for p in fleet:
                p.send("hello", heartbeat_ms=HEARTBEAT_MS, sender="bench.relay_scale")
                for state in p.states:
                    p.state(state)
                sent += 1 + len(p.states)
        elif words[:1] == ["churn"]:
            for _ in range(int(words[1])):
                for j in range(sockets):
                    for p in fleet:
                        p.connection(j)
                        sent += 1
        else:
            break
        print(sent, flush=True)
    for p in fleet:
        p.send("bye")
        p.dealer.close()
    ctx.term()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_scale")
    parser.add_argument("--sender", metavar="ENDPOINT", help="(internal) a sender subprocess")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--sockets", type=int, default=20)
    parser.add_argument("--owned", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scrape-rounds", type=int, default=15)
    args = parser.parse_args()
    if args.sender:
        sender(args.sender, args.first, args.processes, args.sockets)
        return 0
    r = run(args.processes, args.sockets, args.owned, args.rounds, args.scrape_rounds)
    print(json.dumps(r.__dict__, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
