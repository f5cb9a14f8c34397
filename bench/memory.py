"""Resident memory per monitored socket: our engine against libzmq's own cost of a bare
socket with a monitor. Each side runs in a fresh process (`python -m bench.memory ours
1000`) so that neither inherits the other's heap; it prints bytes per socket as JSON."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile

import zmq

from bench.common import engine_config, raise_fd_limit
from exporter.monitor.sockets import attach_monitor

from testkit import free_port, poll_until

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _settle() -> int:
    gc.collect()
    return rss()


def bare(sockets: int, ipc_dir: str) -> float:
    """N PULL sockets bound on ipc, each with a monitor read through an unbounded PAIR."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, ctx.get(zmq.SOCKET_LIMIT))
    keep: list[zmq.Socket[bytes]] = []
    before = _settle()
    for i in range(sockets):
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        pair = attach_monitor(ctx, sock, zmq.EVENT_ALL)
        sock.bind(f"ipc://{ipc_dir}/{i}")
        pair.recv_multipart()  # LISTENING: the monitor pipe is drained, as ours is
        keep += (sock, pair)
    after = _settle()
    for s in keep:
        s.close(0)
    ctx.term()
    return (after - before) / sockets


def ours(sockets: int, ipc_dir: str) -> float:
    """The same sockets configured in our engine (config, sockets, monitors, state)."""
    from exporter.monitor.engine import Engine

    engine = Engine()
    engine.start()
    engine.snapshot()
    port = free_port()
    before = _settle()
    settings = engine_config(port, sockets - 1, ipc_dir)  # the parsed config is held too
    engine.apply(settings).result(timeout=120)
    poll_until(lambda: engine.snapshot().stats.events >= sockets, 60)
    engine.snapshot()  # the snapshot cache is part of what a socket costs
    after = _settle()
    engine.stop(timeout=30)
    return (after - before) / sockets


def measure(kind: str, sockets: int) -> float:
    """Bytes per socket, measured in a child process."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", kind, str(sockets)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout
    return float(json.loads(out)["bytes_per_socket"])


def main() -> None:
    kind, sockets = sys.argv[1], int(sys.argv[2])
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="zmqx-mem-") as ipc_dir:
        per_socket = (bare if kind == "bare" else ours)(sockets, ipc_dir)
    json.dump({"kind": kind, "sockets": sockets, "bytes_per_socket": per_socket}, sys.stdout)


if __name__ == "__main__":
    main()
