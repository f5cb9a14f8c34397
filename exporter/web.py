"""The HTTP side: /metrics (text format or OpenMetrics by content negotiation), health
endpoints, the landing page and POST /-/reload, optionally behind TLS and basic auth
(`exporter.webconfig`).

/metrics is the socket families pre-rendered by `WebApp.state` (`StateCollector.prerender`,
lines kept per socket snapshot) followed by the negotiated encoder's output of everything
else; an escaping or version that `fast_format` does not cover goes through the encoder
entirely. Either way the bytes are what the encoder alone would write.

Connections are owned by one event-loop thread (selectors) while they are in the TLS
handshake, idle between requests, sending a request head or body: none of that costs a
thread, and each has a deadline (TLS_HANDSHAKE_TIMEOUT from accept, IDLE_TIMEOUT between
requests, HEADER_TIMEOUT from a request's first byte to the end of its head and again for
its body). A request head over MAX_REQUEST_LINE gets 414, over MAX_HEADER_BYTES 431, a body
over MAX_BODY_BYTES 413. Only a complete request reaches a worker, in one of three lanes
with their own threads and bounded queues (503 when full), so that nothing queues in front
of a health probe: /-/healthy and /-/ready; scrapes and everything else (at most
`max_concurrent_scrapes` render at once, 503 beyond); POST /-/reload (may wait 30 s). The
loop writes the response without blocking; a response must make progress every
WRITE_TIMEOUT, and responses not yet read are bounded to MAX_OUTPUT_BYTES in total.

At most MAX_CONNECTIONS connections are open. A new one is never refused for an idle or
slow one: at the cap the connection waiting longest without a complete request (idle, in
its handshake, head or body) is closed, or failing that the writer stalled longest;
evictions count as too_many_connections. The engine is only read through snapshots, so a
slow client blocks nothing else.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import gzip
import http.client
import io
import logging
import queue
import selectors
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import metrics
from exporter.render.prometheus import StateCollector, one_sample
from exporter.render.sockettext import fast_format
from exporter.webauth import AuthResult
from exporter.webconfig import WebConfig, WebConfigSource
from exporter.webtls import check_client_sans

log = logging.getLogger("zmq_exporter.web")

MAX_REQUEST_LINE = 8 * 1024  # 414 beyond
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; 431 beyond
MAX_BODY_BYTES = 64 * 1024  # 413 beyond (no endpoint here takes a body)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request
WRITE_TIMEOUT = 30.0  # seconds a response may take to be read by the client
TLS_HANDSHAKE_TIMEOUT = 10.0
# Open connections, every state included. The web side's descriptors are at most this plus
# 5 (the listener, the selector, its wake-up pair, a connection accepted before another is
# evicted); 1,000 idle clients are handled by eviction.
MAX_CONNECTIONS = 256
MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # responses written but not yet read, all connections
LISTEN_BACKLOG = 1024  # a burst of connects waits in the kernel, not in SYN retries
PROBE_WORKERS = 2
REJECT_REASONS = metrics.HTTP_REJECTED.values


class _Collected(Collector):
    """Families collected already, handed to an encoder."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


SCRAPE_BUCKETS = metrics.SCRAPE_DURATION.buckets


class WebStats(Collector):
    """The web server's self-metrics: scrapes served, their duration, series exported and
    refused requests. Plain numbers under a lock (no `_created` series)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scrapes = 0
        self.duration_buckets = [0] * len(SCRAPE_BUCKETS)
        self.duration_sum = 0.0
        self.series = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)

    def scraped(self, seconds: float, series: int) -> None:
        with self._lock:
            self.scrapes += 1
            self.duration_sum += seconds
            self.series = series
            for index, bound in enumerate(SCRAPE_BUCKETS):
                if seconds <= bound:
                    self.duration_buckets[index] += 1

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            scrapes, buckets, total = self.scrapes, list(self.duration_buckets), self.duration_sum
            series, rejected = self.series, dict(self.rejected)
        yield one_sample(metrics.SCRAPES, scrapes)
        duration = metrics.SCRAPE_DURATION
        histogram = HistogramMetricFamily(
            duration.metric_name, duration.help, unit=duration.unit or ""
        )
        histogram.add_metric(
            [],
            [(repr(b), c) for b, c in zip(SCRAPE_BUCKETS, buckets, strict=True)]
            + [("+Inf", scrapes)],
            total,
        )
        yield histogram
        yield one_sample(metrics.SERIES, series)
        refused = metrics.HTTP_REJECTED
        family = Metric(refused.metric_name, refused.help, refused.type)
        for reason, count in rejected.items():
            family.add_sample(refused.name, {"reason": reason}, count)
        yield family


@dataclass
class WebApp:
    """/metrics is `state` (socket families pre-rendered as text, its self-metrics as
    families) followed by the encoder's output of `registry` (every other collector)."""

    registry: CollectorRegistry
    telemetry_path: str
    is_ready: Callable[[], bool]
    landing_page: Callable[[], str]
    reload: Callable[[], tuple[bool, str]]
    state: StateCollector
    max_concurrent_scrapes: int = 8
    # False once the engine thread has died: /-/healthy and /-/ready answer 503.
    is_healthy: Callable[[], bool] = lambda: True
    # GET /probe (issue 17, exporter/prober): Prober.handle_probe, on a lane of its own
    # with `max_concurrent_probes` workers (--probe.max-concurrent). None: no /probe.
    probe: ProbeHandler | None = None
    max_concurrent_probes: int = 0

    def __post_init__(self) -> None:
        self._scrape_slots = threading.BoundedSemaphore(self.max_concurrent_scrapes)
        self.stats = WebStats()
        self.registry.register(self.stats)

    def metrics(
        self, accept: str | None, accept_encoding: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if not self._scrape_slots.acquire(blocking=False):
            self.stats.reject("too_many_scrapes")
            return 503, {"Content-Type": "text/plain"}, b"too many concurrent scrapes\n"
        try:
            start = time.perf_counter()
            encoder, content_type = choose_encoder(accept or "")
            head, series = b"", 0
            openmetrics = fast_format(encoder)
            if openmetrics is None:  # an escaping or version we do not pre-render
                families = list(self.state.collect())
            else:
                pre = self.state.prerender(openmetrics)
                head, series, families = pre.text, pre.series, pre.families
            families.extend(self.registry.collect())
            body = head + encoder(_Collected(families))
            series += sum(len(family.samples) for family in families)
            self.stats.scraped(time.perf_counter() - start, series)
        finally:
            self._scrape_slots.release()
        headers = {"Content-Type": content_type}
        if accept_encoding and "gzip" in accept_encoding:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return 200, headers, body


def parse_listen_address(address: str) -> tuple[str, int]:
    """`host:port`, `:port` (all interfaces) or `[v6]:port`; ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(f"--web.listen-address {address!r}: expected host:port, e.g. :19555")
    if int(port) > 65535:
        raise ValueError(
            f"--web.listen-address {address!r}: port {port} is out of range (0 to 65535)"
        )
    host = host.strip("[]")
    return host, int(port)


# -- the server --------------------------------------------------------------------------
#
# One event-loop thread owns every connection while it does not have a complete request:
# TLS handshake, idle keep-alive, request head, request body. Each of those states has a
# deadline and costs no thread, so idle or slow clients cannot use up the capacity real
# requests need. A complete request goes to a worker lane (its own threads and a bounded
# queue); the loop then writes the response without blocking.

_HANDSHAKE, _IDLE, _HEAD, _BODY, _BUSY, _WRITING = range(6)
_SWEEP_INTERVAL = 0.25  # how often deadlines are checked, while there are connections
_ACCEPT_BATCH = 64  # connections accepted per wake-up, so reads are not starved
_RECV_SIZE = 64 * 1024
_TLS_WRITE_CHUNK = 16 * 1024  # an SSL write is retried with the same chunk after EAGAIN
_PAUSE_ACCEPT = 0.1  # seconds without accepting after EMFILE, so the loop does not spin
_SERVER = f"zmq-exporter Python/{sys.version.split()[0]}"
# Prober.handle_probe (exporter/prober/handler.py): query, headers -> status, headers, body.
ProbeHandler = Callable[
    [dict[str, list[str]], http.client.HTTPMessage], tuple[int, dict[str, str], bytes]
]
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


@dataclass
class _Request:
    method: str
    target: str
    headers: http.client.HTTPMessage
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class _Conn:
    """One client connection; touched only by the event loop (workers get a `_Request`)."""

    __slots__ = (
        "body_left", "buf", "closed", "deadline", "events", "out", "peer", "request",
        "scanned", "sent", "sock", "state", "then", "tls",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, peer: Any, tls: bool, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.tls = tls
        self.state = _HANDSHAKE if tls else _IDLE
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf already searched for the end of the head
        self.deadline = now + (TLS_HANDSHAKE_TIMEOUT if tls else IDLE_TIMEOUT)
        self.events = 0  # what the selector watches
        self.out: memoryview | None = None
        self.sent = 0
        self.then = _IDLE  # state after the response is written; -1: close
        self.body_left = 0
        self.request: _Request | None = None
        self.closed = False


class _Lane:
    """Worker threads for one kind of request, so that scrapes and reloads (which may
    block for up to 30 s) never queue in front of health probes. Only the event loop
    submits and counts `pending`; past `limit` it answers 503 itself."""

    def __init__(self, name: str, workers: int, backlog: int, reason: str) -> None:
        self.name = name
        self.workers = workers
        self.limit = workers + backlog
        self.reason = reason  # zmq_exporter_http_requests_rejected_total reason when full
        self.pending = 0
        self.queue: queue.SimpleQueue[tuple[_Conn, _Request] | None] = queue.SimpleQueue()


class _Loop:
    def __init__(
        self,
        listener: socket.socket,
        app: WebApp,
        web_config: WebConfigSource | None,  # read per handshake and request (webconfig.py)
        max_connections: int,
    ) -> None:
        self.listener = listener
        self.app = app
        self.web_config = web_config
        # TLS or not is fixed for the listener; the context itself is the current one.
        self.ssl_context = web_config.current().ssl_context if web_config else None
        self.max_connections = max_connections
        self.selector = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()
        # Evictable connections, the one waiting longest for a complete request first:
        # accepted or done with its last response earliest (a slow trickle of header
        # bytes does not move a connection back).
        self.waiting: OrderedDict[_Conn, None] = OrderedDict()
        # Connections writing a response, the one without progress longest first.
        self.writing: OrderedDict[_Conn, float] = OrderedDict()
        self.out_bytes = 0
        scrape_workers = min(app.max_concurrent_scrapes + 2, 32)
        self.probe = _Lane("probe", PROBE_WORKERS, 32, "too_many_connections")
        self.scrape = _Lane("scrape", scrape_workers, 16, "too_many_scrapes")
        self.reload = _Lane("reload", 1, 32, "too_many_connections")
        self.lanes: tuple[_Lane, ...] = (self.probe, self.scrape, self.reload)
        # /probe (issue 17): a probe may wait out its whole timeout, so probes have their
        # own workers and never queue in front of scrapes or health checks.
        self.zmtp_probe = _Lane(
            "zmtp-probe", max(1, app.max_concurrent_probes), 64, "too_many_connections"
        )
        if app.probe is not None:
            self.lanes = (*self.lanes, self.zmtp_probe)
        self.done: deque[tuple[_Lane, _Conn, bytes, bool]] = deque()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stopping = False
        self.accept_paused_until = 0.0
        self.threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.wake_r)
        for lane in self.lanes:
            for index in range(lane.workers):
                self.threads.append(
                    threading.Thread(
                        target=self._work,
                        args=(lane,),
                        name=f"zmq-exporter-web-{lane.name}-{index}",
                        daemon=True,
                    )
                )
        self.threads.append(
            threading.Thread(target=self._run, name="zmq-exporter-web", daemon=True)
        )
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping = True
        self._wake()
        for lane in self.lanes:
            for _ in range(lane.workers):
                lane.queue.put(None)
        loop = self.threads[-1] if self.threads else None
        if loop is not None:
            loop.join(5.0)
        if loop is None or not loop.is_alive():
            for conn in list(self.conns):
                self._close(conn, graceful=False)
            self.selector.close()
        self.listener.close()
        self.wake_r.close()
        self.wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending already
            self.wake_w.send(b"\0")

    # -- the event loop ------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_INTERVAL
        while not self.stopping:
            try:
                # Deadlines only matter while there are connections: no wake-ups otherwise.
                timeout = None
                if self.conns or self.accept_paused_until:
                    timeout = max(0.0, next_sweep - time.monotonic())
                events = self.selector.select(timeout)
                for key, mask in events:
                    if key.data is None:
                        self._accept()
                    elif key.data is self.wake_r:
                        with contextlib.suppress(OSError):
                            while self.wake_r.recv(4096):
                                pass
                    else:
                        self._on_event(key.data, mask)
                self._finish_responses()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + _SWEEP_INTERVAL
            except Exception:  # a bug must not take HTTP down for good
                log.exception("HTTP event loop error")
                time.sleep(0.01)

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.closed:  # closed earlier in this batch (evicted, for example)
            return
        try:
            if conn.state == _HANDSHAKE:
                self._handshake(conn)
            elif conn.state == _WRITING:
                self._write(conn)
            elif conn.state in (_IDLE, _HEAD, _BODY):
                self._read(conn)
        except Exception:
            log.exception("HTTP connection error", extra={"peer": conn.peer})
            self._close(conn, graceful=False)

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if not events:
            self.selector.unregister(conn.sock)
        elif not conn.events:
            self.selector.register(conn.sock, events, conn)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn, graceful: bool = True) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(conn.sock)
            conn.events = 0
        self.conns.discard(conn)
        self.waiting.pop(conn, None)
        if self.writing.pop(conn, None) is not None and conn.out is not None:
            self.out_bytes -= len(conn.out) - conn.sent
        conn.out = None
        conn.buf = bytearray()
        if graceful:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _evict(self) -> bool:
        """Close the connection that has waited longest without a complete request, or
        else the writer that has made no progress for longest."""
        victim = next(iter(self.waiting), None) or next(iter(self.writing), None)
        if victim is None:
            return False
        log.debug("HTTP connection evicted", extra={"peer": victim.peer})
        self.app.stats.reject("too_many_connections")
        self._close(victim, graceful=False)
        return True

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self.conns if c.deadline <= now and c.state != _BUSY]:
            log.debug("HTTP connection timed out", extra={"peer": conn.peer})
            self._close(conn, graceful=conn.state != _WRITING)
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, None)

    # -- accepting -----------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free one and stop accepting for a moment, or
                    # the listener stays readable and the loop spins.
                    log.warning("HTTP accept failed", extra={"err": str(err)})
                    self._evict()
                    self.accept_paused_until = time.monotonic() + _PAUSE_ACCEPT
                    self.selector.unregister(self.listener)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            if len(self.conns) >= self.max_connections:
                self._evict()  # the newcomer is not among the candidates yet
            if len(self.conns) >= self.max_connections:
                # Every connection is busy with a complete request (bounded by the lanes,
                # so only with a small max_connections).
                self.app.stats.reject("too_many_connections")
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    if self.ssl_context is None:
                        sock.send(_error(503, "too many open connections", head_only=False))
                    sock.close()
                continue
            self._add(sock, peer)

    def _add(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        now = time.monotonic()
        if self.ssl_context is not None:
            try:
                sock = self._current_context().wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ValueError):
                sock.close()
                return
        conn = _Conn(sock, peer, self.ssl_context is not None, now)
        self.conns.add(conn)
        self.waiting[conn] = None
        if conn.tls:
            self._handshake(conn)
        else:
            self._watch(conn, selectors.EVENT_READ)

    def _current_context(self) -> ssl.SSLContext:
        """The web config's context as of this handshake (webconfig.WebConfigSource)."""
        context = self.web_config.current().ssl_context if self.web_config else None
        return context or self.ssl_context  # type: ignore[return-value]

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as err:
            log.debug("TLS handshake failed", extra={"peer": conn.peer, "err": str(err)})
            self._close(conn, graceful=False)
            return
        if not check_client_sans(conn.sock):  # client_allowed_sans (webtls.py)
            log.debug("TLS client certificate has no allowed SAN", extra={"peer": conn.peer})
            self._close(conn, graceful=False)
            return
        self._idle(conn, time.monotonic(), refresh=False)

    # -- reading requests ----------------------------------------------------------------

    def _idle(self, conn: _Conn, now: float, refresh: bool = True) -> None:
        """Wait for the next request (a pipelined one may be buffered already)."""
        conn.state = _IDLE
        conn.deadline = now + IDLE_TIMEOUT
        conn.scanned = 0
        conn.request = None
        if refresh:
            self.waiting[conn] = None  # at the end: its wait starts now
        if conn.buf:
            conn.state = _HEAD
            conn.deadline = now + HEADER_TIMEOUT
            if not self._parse(conn):
                return
        # Always try: a TLS socket may hold decrypted bytes the selector cannot see.
        self._read(conn)

    def _read(self, conn: _Conn) -> None:
        for _ in range(64):  # bounded: other connections get their turn
            if conn.state == _BODY:
                room = min(conn.body_left, _RECV_SIZE)
            else:  # one byte over the budget is enough to refuse the request
                room = min(MAX_HEADER_BYTES + 1 - len(conn.buf), _RECV_SIZE)
            try:
                data = conn.sock.recv(max(room, 1))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                self._watch(conn, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except (OSError, ValueError):  # ssl.SSLError included
                self._close(conn, graceful=False)
                return
            if not data:  # the client closed (mid-request: no answer is possible)
                self._close(conn)
                return
            if conn.state == _IDLE:
                conn.state = _HEAD
                conn.deadline = time.monotonic() + HEADER_TIMEOUT
            if conn.state == _BODY:
                conn.body_left -= len(data)  # read and ignored: no endpoint takes a body
                if conn.body_left <= 0:
                    self._dispatch(conn)
                    return
                continue
            conn.buf += data
            if not self._parse(conn):
                return
        self._watch(conn, selectors.EVENT_READ)

    def _parse(self, conn: _Conn) -> bool:
        """Look for a complete request head in conn.buf; True while more bytes are needed."""
        buf = conn.buf
        # Empty lines before a request line are ignored (RFC 9112 2.2).
        skip = 0
        while skip < len(buf) and buf[skip] in b"\r\n":
            skip += 1
        if skip:
            del buf[:skip]
            conn.scanned = 0
        line_end = buf.find(b"\n")
        if line_end < 0:
            if len(buf) > MAX_REQUEST_LINE:
                return self._refuse(conn, 414, "Request line too long", "too_large")
            return True
        if line_end + 1 > MAX_REQUEST_LINE:
            return self._refuse(conn, 414, "Request line too long", "too_large")
        start = max(line_end, conn.scanned - 2)
        ends = [
            i + n
            for i, n in ((buf.find(b"\n\r\n", start), 3), (buf.find(b"\n\n", start), 2))
            if i >= 0
        ]
        if not ends:
            conn.scanned = len(buf)
            if len(buf) > MAX_HEADER_BYTES:
                return self._refuse(conn, 431, "Request header fields too large", "too_large")
            return True
        end = min(ends)
        if end > MAX_HEADER_BYTES:
            return self._refuse(conn, 431, "Request header fields too large", "too_large")
        head = bytes(buf[:end])
        del buf[:end]
        conn.scanned = 0
        return self._head(conn, head, line_end)

    def _head(self, conn: _Conn, head: bytes, line_end: int) -> bool:
        """A complete head: check it as http.server would, then read the body or
        dispatch. Returns False (the connection is no longer reading a head)."""
        words = head[:line_end].decode("iso-8859-1").split()
        if len(words) != 3:
            return self._refuse(conn, 400, "Bad request syntax")
        method, target, version = words
        number = version[5:].split(".")
        if (
            not version.startswith("HTTP/")
            or len(number) != 2
            or not all(n.isascii() and n.isdigit() and len(n) <= 10 for n in number)
        ):
            return self._refuse(conn, 400, "Bad request version")
        if int(number[0]) >= 2:
            return self._refuse(conn, 505, "Invalid HTTP version")
        try:
            headers = http.client.parse_headers(io.BytesIO(head[line_end + 1 :]))
        except http.client.HTTPException:  # over 100 header lines
            return self._refuse(conn, 431, "Too many headers", "too_large")
        keep_alive = (int(number[0]), int(number[1])) >= (1, 1)
        connection = headers.get("Connection", "").lower()
        if connection == "close":
            keep_alive = False
        elif connection == "keep-alive":
            keep_alive = True
        if target.startswith("//"):  # as http.server: not an absolute URL
            target = "/" + target.lstrip("/")
        if method not in _KNOWN_METHODS:
            return self._refuse(conn, 501, f"Unsupported method ({method!r})")
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            return self._refuse(conn, 411, "Content-Length required")
        length = headers.get("Content-Length", "0").strip() or "0"
        if not (length.isascii() and length.isdigit()):  # int() refuses "²", isdigit not
            return self._refuse(conn, 400, "Bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            return self._refuse(conn, 413, "Request body too large", "too_large")
        conn.request = _Request(method, target, headers, keep_alive)
        conn.body_left = int(length)
        if not conn.body_left:
            self._dispatch(conn)
            return False
        # A body: whatever is buffered first, then the socket, within the header deadline.
        taken = min(conn.body_left, len(conn.buf))
        del conn.buf[:taken]
        conn.body_left -= taken
        if not conn.body_left:
            self._dispatch(conn)
            return False
        conn.deadline = time.monotonic() + HEADER_TIMEOUT
        if (
            headers.get("Expect", "").lower() == "100-continue"
            and int(number[0]) == 1
            and int(number[1]) >= 1
        ):
            self._respond(conn, b"HTTP/1.1 100 Continue\r\n\r\n", then=_BODY)
        else:
            conn.state = _BODY
            self._read(conn)
        return False

    def _refuse(self, conn: _Conn, status: int, message: str, reason: str = "") -> bool:
        """Answer a request that is not served and close: returns False."""
        if reason:
            self.app.stats.reject(reason)
        head_only = conn.request is not None and conn.request.method == "HEAD"
        self._respond(conn, _error(status, message, head_only), then=-1)
        return False

    def _dispatch(self, conn: _Conn) -> None:
        request = conn.request
        assert request is not None
        path = request.path
        if request.method == "POST" and path == "/-/reload":
            lane = self.reload
        elif path == "/probe" and self.app.probe is not None:  # issue 17
            lane = self.zmtp_probe
        elif (
            request.method in ("GET", "HEAD")
            and path in ("/-/healthy", "/-/ready")
            and path != self.app.telemetry_path
        ):
            lane = self.probe
        else:
            lane = self.scrape
        if lane.pending >= lane.limit:
            conn.request = None
            self.app.stats.reject(lane.reason)
            head_only = request.method == "HEAD"
            self._respond(conn, _error(503, "too many concurrent requests", head_only), then=-1)
            return
        self.waiting.pop(conn, None)  # a complete request: not evictable while served
        conn.state = _BUSY
        conn.deadline = float("inf")
        self._watch(conn, 0)
        lane.pending += 1
        lane.queue.put((conn, request))

    # -- workers -------------------------------------------------------------------------

    def _work(self, lane: _Lane) -> None:
        while True:
            job = lane.queue.get()
            if job is None:
                return
            conn, request = job
            try:
                status, headers, body = self._serve(request)
                keep_alive = request.keep_alive
                data = _response(status, headers, body, request.method == "HEAD", not keep_alive)
            except Exception:
                log.exception("HTTP handler error", extra={"path": request.path})
                keep_alive = False
                data = _error(500, "Internal server error", request.method == "HEAD")
            self.done.append((lane, conn, data, keep_alive))
            self._wake()

    def _serve(self, request: _Request) -> tuple[int, dict[str, str], bytes]:
        """The answer to a complete request (in a worker thread: may block), with the
        headers of the web config as of this request (webconfig.WebConfigSource)."""
        config = self.web_config.current() if self.web_config else None
        status, headers, body = self._answer(request, config)
        if config is not None and config.headers:
            headers = {**headers, **config.headers}
        return status, headers, body

    def _answer(
        self, request: _Request, config: WebConfig | None
    ) -> tuple[int, dict[str, str], bytes]:
        app = self.app
        plain = {"Content-Type": "text/plain"}
        # rate_limit (webauth.RateLimiter), except for health probes: a liveness probe
        # answered 429 would get a healthy exporter restarted.
        limiter = config.rate_limiter if config is not None else None
        probe = request.path in ("/-/healthy", "/-/ready")
        if limiter is not None and not probe and not limiter.allow():
            return 429, plain, b"Too Many Requests\n"
        auth = config.auth if config is not None else None
        verdict = auth.verify(request.headers.get("Authorization")) if auth else AuthResult.OK
        if verdict is AuthResult.BUSY:  # no bcrypt slot free in time (webauth.HashGate)
            return 503, {**plain, "Retry-After": "1"}, b"Too many password checks at once\n"
        if verdict is not AuthResult.OK:
            app.stats.reject("unauthorized")
            return (
                401,
                {**plain, "WWW-Authenticate": 'Basic realm="zmq-exporter"'},
                b"Unauthorized\n",
            )
        path = request.path
        if request.method in ("GET", "HEAD"):
            if path == app.telemetry_path:
                return app.metrics(
                    request.headers.get("Accept"), request.headers.get("Accept-Encoding")
                )
            if path == "/-/healthy":
                if not app.is_healthy():
                    return 503, plain, b"Engine stopped\n"
                return 200, plain, b"Healthy\n"
            if path == "/-/ready":
                if app.is_healthy() and app.is_ready():
                    return 200, plain, b"Ready\n"
                return 503, plain, b"Not ready\n"
            if path == "/-/reload":
                return (
                    405,
                    {**plain, "Allow": "POST"},
                    b"This endpoint requires a POST request.\n",
                )
            if path == "/probe" and app.probe is not None:  # issue 17: exporter/prober
                query = urllib.parse.parse_qs(request.target.partition("?")[2])
                return app.probe(query, request.headers)
            if path == "/":
                body = app.landing_page().encode()
                return 200, {"Content-Type": "text/html; charset=utf-8"}, body
            return 404, plain, b"Not found\n"
        if request.method == "POST" and path == "/-/reload":
            ok, message = app.reload()
            return 200 if ok else 500, plain, message.encode() + b"\n"
        allow = "POST" if path == "/-/reload" else "GET, HEAD"
        return 405, {**plain, "Allow": allow}, b"Method not allowed\n"

    # -- writing responses ---------------------------------------------------------------

    def _finish_responses(self) -> None:
        while self.done:
            lane, conn, data, keep_alive = self.done.popleft()
            lane.pending -= 1
            if conn.closed or self.stopping:
                continue
            try:
                self._respond(conn, data, then=_IDLE if keep_alive else -1)
            except Exception:
                log.exception("HTTP connection error", extra={"peer": conn.peer})
                self._close(conn, graceful=False)

    def _respond(self, conn: _Conn, data: bytes, then: int) -> None:
        now = time.monotonic()
        self.waiting.pop(conn, None)
        conn.state = _WRITING
        conn.then = then
        conn.out = memoryview(data)
        conn.sent = 0
        conn.deadline = now + WRITE_TIMEOUT
        self.writing[conn] = now
        self.out_bytes += len(data)
        self._write(conn)
        # Responses that clients do not read are bounded in memory as a whole: past the
        # budget, the writers stalled longest are dropped (never the newest response).
        while self.out_bytes > MAX_OUTPUT_BYTES and not conn.closed:
            oldest = next(iter(self.writing), None)
            if oldest is None or oldest is conn:
                break
            self.app.stats.reject("too_many_connections")
            self._close(oldest, graceful=False)

    def _write(self, conn: _Conn) -> None:
        out = conn.out
        assert out is not None
        while conn.sent < len(out):
            end = conn.sent + _TLS_WRITE_CHUNK if conn.tls else len(out)
            try:
                sent = conn.sock.send(out[conn.sent : end])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                return
            except (OSError, ValueError):
                self._close(conn, graceful=False)
                return
            conn.sent += sent
            self.out_bytes -= sent
            now = time.monotonic()
            conn.deadline = now + WRITE_TIMEOUT  # the timeout runs from the last progress
            self.writing[conn] = now
            self.writing.move_to_end(conn)
        del self.writing[conn]
        conn.out = None
        if conn.then == -1:
            self._close(conn)
        elif conn.then == _BODY:
            conn.state = _BODY
            conn.deadline = time.monotonic() + HEADER_TIMEOUT
            self.waiting[conn] = None
            self._read(conn)
        else:
            self._idle(conn, time.monotonic())


def _response(
    status: int, headers: dict[str, str], body: bytes, head_only: bool, close: bool
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Server: {_SERVER}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
    ]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def _error(status: int, message: str, head_only: bool) -> bytes:
    body = message.encode("latin-1", "replace") + b"\n"
    return _response(status, {"Content-Type": "text/plain"}, body, head_only, close=True)


class WebServer:
    def __init__(
        self,
        app: WebApp,
        listen_address: str,
        web_config: WebConfig | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        host, port = parse_listen_address(listen_address)
        family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # ":port" means every interface, IPv4 included.
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(("::" if host == "" else host, port))
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._loop = _Loop(
            listener,
            app,
            WebConfigSource(web_config) if web_config else None,  # read per use from now on
            max_connections,
        )
        self._port = int(listener.getsockname()[1])
        self._started = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def tls(self) -> bool:
        return self._loop.ssl_context is not None

    def start(self) -> None:
        self._started = True
        self._loop.start()

    def stop(self) -> None:
        """Stop serving and close every connection; a worker still inside a handler (a
        reload) finishes on its own, its answer dropped."""
        self._loop.stop()
