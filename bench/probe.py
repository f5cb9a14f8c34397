"""What a /probe costs against the least it could cost (issue 17).

`probe_latency_overhead`: one probe of a live local ROUTER (`Prober.handle_probe`, in
process: DNS of the literal address, one raw connection carrying the peer's greeting and
the prober's own NULL handshake, the text rendered) against a bare pyzmq connect plus
handshake of the same ROUTER (a DEALER whose monitor reports HANDSHAKE_SUCCEEDED, then
closed), measured in the same run, alternating (ABAB) so that drift hits both alike; the
ratio of the medians.

`probe_latency_overhead_curve` (informational): the same against a CURVE ROUTER, with a
CURVE module and a bare CURVE DEALER. A CURVE probe still opens two connections (the raw
one for the greeting, and a libzmq socket for the handshake: the prober does not do the
crypto itself).

Then 100 threads probe the same ROUTER back to back for a while through one Prober bounded
at 100 (`--probe.max-concurrent`'s default): every probe must succeed (no 503, no failure).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass

import zmq

from exporter.config.modules import ProbeModule, default_modules
from exporter.monitor.sockets import attach_monitor
from exporter.prober import Prober

HEADERS = {"X-Prometheus-Scrape-Timeout-Seconds": "5"}


@dataclass
class ProbeBench:
    probe_s: float  # median seconds per probe
    bare_s: float  # median seconds per bare connect + handshake
    curve_probe_s: float  # the same against a CURVE ROUTER
    curve_bare_s: float
    rounds: int
    concurrent: int
    concurrent_seconds: float
    concurrent_probes: int
    concurrent_failures: dict[str, int]  # not 200 or probe_success 0: status or reason
    concurrent_p99_s: float

    @property
    def ratio(self) -> float:
        return self.probe_s / self.bare_s

    @property
    def curve_ratio(self) -> float:
        return self.curve_probe_s / self.curve_bare_s


def bare_handshake(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, curve_server: bytes | None = None
) -> float:
    started = time.perf_counter()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve_server is not None:  # as the prober's module without a client key: a new pair
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey = curve_server
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    monitor = attach_monitor(ctx, sock, zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        if not monitor.poll(5000):
            raise RuntimeError("no handshake in 5 s")
        monitor.recv_multipart()
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    return time.perf_counter() - started


def one_probe(prober: Prober, target: str, module: str = "zmtp") -> tuple[float, str]:
    """(seconds, "ok" or why not: the HTTP status or the failure reason)."""
    started = time.perf_counter()
    status, _, body = prober.handle_probe({"target": [target], "module": [module]}, HEADERS)
    took = time.perf_counter() - started
    if status != 200:
        return took, str(status)
    if b"probe_success 1.0" in body:
        return took, "ok"
    reason = body.split(b'reason="')[1].split(b'"')[0] if b'reason="' in body else b"?"
    return took, reason.decode()


def run(rounds: int = 500, concurrent: int = 100, seconds: float = 3.0) -> ProbeBench:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    # With libzmq's default backlog (100), 100 probes at once (each with a connection
    # closing and the next one opening) can overflow the ROUTER's accept queue, and a
    # dropped SYN costs a 1 s retransmit (the p99 of a concurrent run with two connections
    # per probe was 1.06 s). The measure is the prober, not the peer's backlog.
    router.setsockopt(zmq.BACKLOG, 1024)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    server_public, server_secret = zmq.curve_keypair()
    curve_router = ctx.socket(zmq.ROUTER)
    curve_router.setsockopt(zmq.LINGER, 0)
    curve_router.curve_server = True
    curve_router.curve_secretkey = server_secret
    curve = f"tcp://127.0.0.1:{curve_router.bind_to_random_port('tcp://127.0.0.1')}"
    modules = default_modules()
    modules["curve"] = ProbeModule("curve", mechanism="CURVE", curve_serverkey=server_public)
    prober = Prober(lambda: modules, max_concurrent=concurrent)
    try:
        for _ in range(20):  # warm up every path (contexts, threads, the DNS pool)
            bare_handshake(ctx, endpoint)
            assert one_probe(prober, endpoint)[1] == "ok", "the probe of a live ROUTER failed"
            bare_handshake(ctx, curve, server_public)
            assert one_probe(prober, curve, "curve")[1] == "ok", "the CURVE probe failed"
        probes, bares = [], []
        for _ in range(rounds):
            took, outcome = one_probe(prober, endpoint)
            assert outcome == "ok", f"the probe of a live ROUTER failed: {outcome}"
            probes.append(took)
            bares.append(bare_handshake(ctx, endpoint))
        curve_probes, curve_bares = [], []
        for _ in range(max(rounds // 4, 10)):  # informational: fewer rounds
            took, outcome = one_probe(prober, curve, "curve")
            assert outcome == "ok", f"the probe of a CURVE ROUTER failed: {outcome}"
            curve_probes.append(took)
            curve_bares.append(bare_handshake(ctx, curve, server_public))
        latencies: list[float] = []
        failures: Counter[str] = Counter()
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def worker() -> None:
            mine, bad = [], Counter[str]()
            while time.monotonic() < stop_at:
                took, outcome = one_probe(prober, endpoint)
                mine.append(took)
                if outcome != "ok":
                    bad[outcome] += 1
            with lock:
                latencies.extend(mine)
                failures.update(bad)

        threads = [threading.Thread(target=worker) for _ in range(concurrent)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 30)
        elapsed = time.monotonic() - started
        latencies.sort()
        return ProbeBench(
            probe_s=statistics.median(probes),
            bare_s=statistics.median(bares),
            curve_probe_s=statistics.median(curve_probes),
            curve_bare_s=statistics.median(curve_bares),
            rounds=rounds,
            concurrent=concurrent,
            concurrent_seconds=elapsed,
            concurrent_probes=len(latencies),
            concurrent_failures=dict(failures),
            concurrent_p99_s=latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        )
    finally:
        ctx.destroy(linger=0)


if __name__ == "__main__":
    result = run()
    print(result, f"ratio={result.ratio:.3f} curve_ratio={result.curve_ratio:.3f}")
