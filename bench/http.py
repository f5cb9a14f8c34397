"""What parsing a request head costs: h11 (exporter.httpserver.parse_head) against the
parser it replaced (str.split on the request line, http.client.parse_headers, the email
package's header parser), kept here only as the baseline.

Both are handed the same complete heads, as the event loop hands them over once it has
found the empty line (that search and the size limits are the same code before and after,
so they are left out of both). Per round, each parser parses every head of HEADS `batch`
times, in alternating order (ABBA) so that drift hits both alike, timed in the thread's
own CPU time (time.thread_time: time other processes take from this 2-core machine is not
charged); the value is the median of the rounds' ratios, new ÷ old. The heads are those
the exporter gets: Prometheus' scrape, a kubelet probe, curl.
"""

from __future__ import annotations

import http.client
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from exporter.httpserver import MAX_BODY_BYTES, Refusal, Request, parse_head

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


if __name__ == "__main__":
    r = run()
    print(f"h11 {r.new_us:.1f} µs, previous parser {r.old_us:.1f} µs per head: {r.ratio:.3f}")
