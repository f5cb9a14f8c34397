"""The web server's worker threads start on demand and end when idle: an idle daemon runs
a handful of threads (a container's pids limit counts them), a burst of slow requests gets
at most a lane's workers, and they are gone again after WORKER_IDLE_SECONDS."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from exporter.web import server as httpserver
from exporter.web.server import HttpServer, LaneSpec, Request, Response

from helpers import Daemon
from testkit import free_port, wait_until

# Threads of an idle daemon on the default lanes: main, web loop, log writer, engine
# reader, libzmq's I/O and reaper threads, and a few more; 44f8c93 ran 122 (one per
# possible concurrent request, started up front).
IDLE_THREADS_MAX = 20


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_an_idle_daemon_runs_a_handful_of_threads() -> None:
    config = f"sockets:\n  - name: backend\n    type: ROUTER\n    bind: [tcp://127.0.0.1:{free_port()}]\n"
    with Daemon(config) as daemon:
        assert daemon.proc is not None
        for _ in range(5):  # served requests leave at most a worker per lane behind
            daemon.scrape()
        count = threads_of(daemon.proc.pid)
        assert count <= IDLE_THREADS_MAX, f"{count} threads at idle"


class _SlowHandler:
    """One lane of 4 workers; every request waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.serving = 0
        self.lock = threading.Lock()

    def lanes(self) -> Sequence[LaneSpec]:
        return [LaneSpec("slow", workers=4, backlog=16, reason="slow")]

    def lane_for(self, request: Request) -> str:
        return "slow"

    def serve(self, request: Request) -> Response:
        with self.lock:
            self.serving += 1
        self.release.wait(20)
        return 200, {"Content-Type": "text/plain"}, b"ok\n"

    def reject(self, reason: str) -> None:
        pass


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zmq-exporter-web-slow-")]


@pytest.fixture
def slow_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HttpServer, _SlowHandler]]:
    monkeypatch.setattr(httpserver, "WORKER_IDLE_SECONDS", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    handler = _SlowHandler()
    server = HttpServer([listener], handler)
    server.start()
    try:
        yield server, handler
    finally:
        handler.release.set()
        server.stop()


def test_workers_start_on_demand_up_to_the_lane_size_and_end_when_idle(
    slow_server: tuple[HttpServer, _SlowHandler],
) -> None:
    server, handler = slow_server
    assert _lane_threads() == []  # none before the first request
    port = server.listeners[0].getsockname()[1]
    answers: list[int] = []

    def get() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        answers.append(conn.getresponse().status)
        conn.close()

    clients = [threading.Thread(target=get) for _ in range(10)]
    for client in clients:
        client.start()
    wait_until(lambda: handler.serving == 4, timeout=10, what="4 requests being served")
    assert len(_lane_threads()) == 4  # the lane's size, not one per request
    handler.release.set()
    for client in clients:
        client.join(30)
    assert answers == [200] * 10
    wait_until(lambda: not _lane_threads(), timeout=10, what="idle workers ended")
    # and the lane still serves after its threads ended
    handler.release.set()
    get()
    assert answers[-1] == 200
