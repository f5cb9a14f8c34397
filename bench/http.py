"""What parsing a request head costs: h11 (exporter.web.server.parse_head) against the
parser it replaced (str.split on the request line, http.client.parse_headers, the email
package's header parser), kept here only as the baseline.

Both are handed the same complete heads, as the event loop hands them over once it has
found the empty line (that search and the size limits are the same code before and after,
so they are left out of both). Per round, each parser parses every head of HEADS `batch`
times, in alternating order (ABBA) so that drift hits both alike, timed in the thread's
own CPU time (time.thread_time: time other processes take from this 2-core machine is not
charged); the value is the median of the rounds' ratios, new ÷ old. The heads are those
the exporter gets: Prometheus' scrape, a kubelet probe, curl.

`http_round_trip` (informational): the whole request through the server, h11 or not:
today's `HttpServer` and the one of BASELINE_COMMIT (its source read with `git show`, so
its code is not kept here; skipped outside a git checkout), both in this process with the
same trivial handler, each on its own loopback port; a client keeps one connection to
each and sends Prometheus' scrape head, reading each answer, in alternating batches
(ABBA); median of the batches' ratios of the process's CPU time per round trip (client
and server threads: the client's share is the same for both), new ÷ old.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from bench.common import ROOT
from exporter.web.server import (
    MAX_BODY_BYTES,
    HttpServer,
    LaneSpec,
    Refusal,
    Request,
    Response,
    parse_head,
)

BASELINE_COMMIT = "44f8c93"  # the last commit with the str.split/email parser

HEADS = [
    # Prometheus 2.x/3.x scrape (its Accept, gzip, the scrape timeout header)
    b"GET /metrics HTTP/1.1\r\nHost: 10.0.3.7:19555\r\nUser-Agent: Prometheus/3.1.0\r\n"
    b"Accept: application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,"
    b"application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;"
    b"escaping=underscores;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1\r\n"
    b"Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
    # kubelet liveness probe
    b"GET /-/healthy HTTP/1.1\r\nHost: 10.0.3.7:19555\r\nUser-Agent: kube-probe/1.31\r\n"
    b"Accept: */*\r\nConnection: close\r\n\r\n",
    # curl
    b"GET /-/ready HTTP/1.1\r\nHost: localhost:19555\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n\r\n",
]
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def old_parse_head(head: bytes, line_end: int) -> Request | int:
    """The parser of 44f8c93 (HttpServer._head up to the Request), its refusals as a
    status. Kept only as this benchmark's baseline: it is lenient where a server must be
    strict (see tests/testdata/http/corpus.txt)."""
    words = head[:line_end].decode("iso-8859-1").split()
    if len(words) != 3:
        return 400
    method, target, version = words
    number = version[5:].split(".")
    if (
        not version.startswith("HTTP/")
        or len(number) != 2
        or not all(n.isascii() and n.isdigit() and len(n) <= 10 for n in number)
    ):
        return 400
    if int(number[0]) >= 2:
        return 505
    try:
        headers = http.client.parse_headers(io.BytesIO(head[line_end + 1 :]))
    except http.client.HTTPException:
        return 431
    keep_alive = (int(number[0]), int(number[1])) >= (1, 1)
    connection = headers.get("Connection", "").lower()
    if connection == "close":
        keep_alive = False
    elif connection == "keep-alive":
        keep_alive = True
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    if method not in _KNOWN_METHODS:
        return 501
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return 411
    lengths = {
        value.strip()
        for header in headers.get_all("Content-Length") or ["0"]
        for value in header.split(",")
    }
    if len(lengths) != 1:
        return 400
    length = lengths.pop() or "0"
    if not (length.isascii() and length.isdigit()):
        return 400
    if int(length) > MAX_BODY_BYTES:
        return 413
    return Request(method, target, headers, keep_alive, None)


def new_parse_head(head: bytes, line_end: int) -> Request | int:
    parsed = parse_head(head, line_end)
    return parsed.status if isinstance(parsed, Refusal) else parsed[0]


@dataclass
class HttpBench:
    new_us: float  # median µs of CPU per head, h11
    old_us: float  # median µs of CPU per head, the previous parser
    ratio: float  # median of the rounds' new ÷ old
    rounds: int
    heads: int  # heads parsed per parser


def _time(parse: Callable[[bytes, int], Request | int], batch: int) -> float:
    """µs per head over `batch` passes over HEADS."""
    work = [(head, head.index(b"\n")) for head in HEADS]
    start = time.thread_time()
    for _ in range(batch):
        for head, line_end in work:
            parse(head, line_end)
    return (time.thread_time() - start) / (batch * len(work)) * 1e6


def run(rounds: int = 20, batch: int = 200) -> HttpBench:
    for head in HEADS:  # the same answer from both, or the comparison is meaningless
        old, new = old_parse_head(head, head.index(b"\n")), new_parse_head(head, head.index(b"\n"))
        assert isinstance(old, Request) and isinstance(new, Request), (old, new)
        assert (old.method, old.target, old.keep_alive) == (new.method, new.target, new.keep_alive)
        assert list(old.headers.items()) == list(new.headers.items())
    _time(old_parse_head, batch // 4 + 1)  # warm-up
    _time(new_parse_head, batch // 4 + 1)
    old_times: list[float] = []
    new_times: list[float] = []
    for index in range(rounds):
        order = (old_parse_head, new_parse_head) if index % 2 else (new_parse_head, old_parse_head)
        for parse in order:
            (old_times if parse is old_parse_head else new_times).append(_time(parse, batch))
    return HttpBench(
        statistics.median(new_times),
        statistics.median(old_times),
        statistics.median(n / o for n, o in zip(new_times, old_times, strict=True)),
        rounds,
        rounds * batch * len(HEADS),
    )


# -- the whole round trip ---------------------------------------------------------------


class _Healthy:
    """The smallest handler: one lane, every request answered 200."""

    def lanes(self) -> Sequence[LaneSpec]:
        return [LaneSpec("probe", 2, 32, "too_many_connections")]

    def lane_for(self, request: Any) -> str:
        return "probe"

    def serve(self, request: Any) -> Response:
        return 200, {"Content-Type": "text/plain"}, b"Healthy\n"

    def reject(self, reason: str) -> None:
        pass


def baseline_server_module() -> ModuleType | None:
    """exporter/web/server.py as of BASELINE_COMMIT, imported under another name; None
    outside a git checkout."""
    try:
        source = subprocess.run(
            ["git", "show", f"{BASELINE_COMMIT}:exporter/web/server.py"],
            cwd=ROOT, capture_output=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    name = "bench_baseline_httpserver"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{BASELINE_COMMIT}:exporter/web/server.py", "exec"), module.__dict__)
    return module


def _round_trips(sock: socket.socket, count: int) -> float:
    """CPU seconds of this process (client and server threads) per round trip of
    HEADS[0] on a kept-alive connection."""
    start = time.process_time()
    for _ in range(count):
        sock.sendall(HEADS[0])
        answer = b""
        for _ in range(100):
            answer += sock.recv(65536)
            if answer.endswith(b"\r\n\r\nHealthy\n"):
                break
        else:
            raise AssertionError(f"no answer: {answer[:200]!r}")
    return (time.process_time() - start) / count


def run_round_trip(batches: int = 20, batch: int = 200) -> tuple[float, float, float] | None:
    """(new seconds per round trip, old, median ratio), or None without the baseline."""
    old_module = baseline_server_module()
    if old_module is None:
        return None
    servers: list[Any] = []
    clients = []
    try:
        for server_class in (HttpServer, old_module.HttpServer):
            listener = socket.create_server(("127.0.0.1", 0))
            server = server_class([listener], _Healthy())
            server.start()
            servers.append(server)
            client = socket.create_connection(listener.getsockname(), timeout=10)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            clients.append(client)
        new_client, old_client = clients
        _round_trips(new_client, batch // 4 + 1)  # warm-up
        _round_trips(old_client, batch // 4 + 1)
        new_times: list[float] = []
        old_times: list[float] = []
        for index in range(batches):
            if index % 2:
                old_times.append(_round_trips(old_client, batch))
                new_times.append(_round_trips(new_client, batch))
            else:
                new_times.append(_round_trips(new_client, batch))
                old_times.append(_round_trips(old_client, batch))
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
    ratio = statistics.median(n / o for n, o in zip(new_times, old_times, strict=True))
    return statistics.median(new_times), statistics.median(old_times), ratio


if __name__ == "__main__":
    r = run()
    print(f"h11 {r.new_us:.1f} µs, previous parser {r.old_us:.1f} µs per head: {r.ratio:.3f}")
    trip = run_round_trip()
    if trip is not None:
        new_s, old_s, ratio = trip
        print(
            f"round trip {new_s * 1e6:.0f} µs, {old_s * 1e6:.0f} µs at {BASELINE_COMMIT}: "
            f"{ratio:.3f}"
        )
