"""The HTTP side: /metrics (text format or OpenMetrics by content negotiation), health
endpoints, the landing page and POST /-/reload, optionally behind TLS and basic auth
(`exporter.webconfig`).

/metrics is the socket families pre-rendered by `WebApp.state` (`StateCollector.prerender`,
lines kept per socket snapshot) followed by the negotiated encoder's output of everything
else; an escaping or version that `fast_format` does not cover goes through the encoder
entirely. Either way the bytes are what the encoder alone would write.

One thread per connection; the engine is only ever read through snapshots, so a slow
client blocks nothing but its own thread. What one client can hold is bounded: the TLS
handshake runs in the connection's thread (never in the accept loop) with a deadline; the
request line and headers must arrive within HEADER_TIMEOUT and fit in MAX_HEADER_BYTES
(414/431 otherwise); bodies over MAX_BODY_BYTES get 413; at most MAX_CONNECTIONS
connections are served at once (503 beyond) and at most `max_concurrent_scrapes` scrapes
render at once (503 beyond). A scrape releases its slot before writing the response, so a
client that never reads holds only its own thread, until the socket timeout.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.render.prometheus import StateCollector, for_text_format
from exporter.render.sockettext import fast_format
from exporter.webconfig import BasicAuth, WebConfig

log = logging.getLogger("zmq_exporter.web")

MAX_REQUEST_LINE = 8 * 1024  # 414 beyond
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; 431 beyond
MAX_BODY_BYTES = 64 * 1024  # 413 beyond (no endpoint here takes a body)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request
WRITE_TIMEOUT = 30.0  # seconds a response may take to be read by the client
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
REJECT_REASONS = ("unauthorized", "too_many_scrapes", "too_many_connections", "too_large")


class _Collected(Collector):
    """Families collected already, handed to an encoder."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


SCRAPE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
        family = CounterMetricFamily(
            "zmq_exporter_scrapes", "Scrapes of the metrics endpoint served (answered 200)."
        )
        family.add_metric([], scrapes)
        yield family
        histogram = HistogramMetricFamily(
            "zmq_exporter_scrape_duration_seconds", "Time to collect and encode one scrape."
        )
        histogram.add_metric(
            [],
            [(repr(b), c) for b, c in zip(SCRAPE_BUCKETS, buckets, strict=True)]
            + [("+Inf", scrapes)],
            total,
        )
        yield histogram
        gauge = GaugeMetricFamily(
            "zmq_exporter_series", "Samples (series) in the last scrape served, all included."
        )
        gauge.add_metric([], series)
        yield gauge
        refused = CounterMetricFamily(
            "zmq_exporter_http_requests_rejected",
            "HTTP requests refused before being served, by reason.",
            labels=["reason"],
        )
        for reason, count in rejected.items():
            refused.add_metric([reason], count)
        yield refused


@dataclass
class WebApp:
    """/metrics is `state` (socket families pre-rendered as text, its self-metrics as
    families) followed by the encoder's output of `registry` (every other collector)."""

    registry: CollectorRegistry
    telemetry_path: str
    is_ready: Callable[[], bool]
    landing_page: Callable[[], str]
    reload: Callable[[], tuple[bool, str]]
    max_concurrent_scrapes: int = 8
    state: StateCollector | None = None

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
            head, series, families = b"", 0, []
            if self.state is not None:
                openmetrics = fast_format(encoder)
                if openmetrics is None:  # an escaping or version we do not pre-render
                    families = list(self.state.collect())
                else:
                    pre = self.state.prerender(openmetrics)
                    head, series, families = pre.text, pre.series, pre.families
            families.extend(self.registry.collect())
            if not content_type.startswith("application/openmetrics-text"):
                families = for_text_format(families)
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
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--web.listen-address {address!r}: expected host:port, e.g. :19555")
    host = host.strip("[]")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        app: WebApp,
        ssl_context: ssl.SSLContext | None = None,
        auth: BasicAuth | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.app = app
        self.ssl_context = ssl_context
        self.auth = auth
        self.max_connections = max_connections
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(("::" if host == "" else host, address[1]), handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":port" means every interface, IPv4 included.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.ssl_context is not None:
            # No I/O here: the handshake runs in the connection's own thread, so a client
            # that connects and stays silent cannot stall the accept loop.
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self.app.stats.reject("too_many_connections")
            if not isinstance(request, ssl.SSLSocket):
                with contextlib.suppress(OSError):
                    request.setblocking(False)
                    request.send(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: 25\r\nConnection: close\r\n\r\n"
                        b"too many open connections"
                    )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                request.settimeout(TLS_HANDSHAKE_TIMEOUT)
                try:
                    request.do_handshake()
                except (OSError, ValueError) as err:
                    log.debug("TLS handshake failed", extra={"peer": client_address, "err": err})
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection error", exc_info=True, extra={"peer": client_address})


class _RequestTooLarge(Exception):
    pass


class _BoundedReader(io.BufferedIOBase):
    """The handler's rfile during the request line and headers: at most `budget` bytes,
    all of them before `deadline` (the socket timeout shrinks as it nears)."""

    def __init__(self, inner: Any, sock: socket.socket) -> None:
        self._inner = inner
        self._sock = sock
        self.budget: int | None = None
        self.deadline: float | None = None

    def readline(self, limit: int | None = -1) -> bytes:
        if self.budget is None and self.deadline is None:
            return bytes(self._inner.readline(limit))
        limit = -1 if limit is None else limit
        line = bytearray()
        # Chunk by chunk, not one inner readline: a client trickling a byte per second
        # would otherwise keep one readline (and the connection) alive for ever.
        while limit < 0 or len(line) < limit:
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("request headers too slow")
                self._sock.settimeout(remaining)
            chunk = self._inner.peek(1)  # at most one recv, bounded by the timeout
            if not chunk:
                break
            end = chunk.find(b"\n")
            take = len(chunk) if end < 0 else end + 1
            if limit >= 0:
                take = min(take, limit - len(line))
            line += self._inner.read(take)
            if self.budget is not None and len(line) > self.budget:
                raise _RequestTooLarge
            if line.endswith(b"\n"):
                break
        if self.budget is not None:
            self.budget -= len(line)
        return bytes(line)

    def read(self, size: int | None = -1) -> bytes:
        return bytes(self._inner.read(size))

    def peek(self, size: int = 1) -> bytes:
        return bytes(self._inner.peek(size))

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._inner.close()
        super().close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = IDLE_TIMEOUT
    protocol_version = "HTTP/1.1"
    server_version = "zmq-exporter"
    _reader: _BoundedReader

    def setup(self) -> None:
        super().setup()
        self._reader = _BoundedReader(self.rfile, self.connection)
        self.rfile = self._reader

    def handle_one_request(self) -> None:
        reader = self._reader
        reader.budget = None
        reader.deadline = None
        self.connection.settimeout(IDLE_TIMEOUT)
        try:
            if not reader.peek(1):
                self.close_connection = True  # the client closed a kept-alive connection
                return
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        reader.budget = MAX_HEADER_BYTES
        reader.deadline = time.monotonic() + HEADER_TIMEOUT
        self.raw_requestline = b""
        self.request_version = "HTTP/1.1"  # for an error sent before the request line parses
        self.command = ""
        self.requestline = ""
        try:
            super().handle_one_request()
        except _RequestTooLarge:
            self.server.app.stats.reject("too_large")
            if self.raw_requestline:
                self.send_error(431, "Request header fields too large")
            else:
                self.send_error(414, "Request line too long")
            self.close_connection = True

    def parse_request(self) -> bool:
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.server.app.stats.reject("too_large")
            self.close_connection = True
            self.send_error(414, "Request line too long")
            return False
        ok = super().parse_request()
        reader = self._reader
        reader.budget = None
        reader.deadline = None
        self.connection.settimeout(WRITE_TIMEOUT)
        return ok

    # -- checks shared by every method ---------------------------------------------------

    def _admit(self) -> bool:
        """Basic auth and body size; answers the request itself when refusing it."""
        auth = self.server.auth
        if auth is not None and not auth.check(self.headers.get("Authorization")):
            self.server.app.stats.reject("unauthorized")
            self._send(
                401,
                {"Content-Type": "text/plain", "WWW-Authenticate": 'Basic realm="zmq-exporter"'},
                b"Unauthorized\n",
            )
            return False
        return self._discard_body()

    def _discard_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(411, {"Content-Type": "text/plain"}, b"Content-Length required\n")
            return False
        text = self.headers.get("Content-Length", "0").strip() or "0"
        if not text.isdigit():
            self.close_connection = True
            self._send(400, {"Content-Type": "text/plain"}, b"Bad Content-Length\n")
            return False
        length = int(text)
        if length > MAX_BODY_BYTES:
            self.server.app.stats.reject("too_large")
            self.close_connection = True
            self._send(413, {"Content-Type": "text/plain"}, b"Request body too large\n")
            return False
        if length:
            self.connection.settimeout(HEADER_TIMEOUT)
            self.rfile.read(length)
            self.connection.settimeout(WRITE_TIMEOUT)
        return True

    # -- methods -------------------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._admit():
            return
        app = self.server.app
        path = self.path.split("?", 1)[0]
        if path == app.telemetry_path:
            status, headers, body = app.metrics(
                self.headers.get("Accept"), self.headers.get("Accept-Encoding")
            )
            self._send(status, headers, body)
        elif path == "/-/healthy":
            self._send(200, {"Content-Type": "text/plain"}, b"Healthy\n")
        elif path == "/-/ready":
            if app.is_ready():
                self._send(200, {"Content-Type": "text/plain"}, b"Ready\n")
            else:
                self._send(503, {"Content-Type": "text/plain"}, b"Not ready\n")
        elif path == "/-/reload":
            self._send(
                405,
                {"Content-Type": "text/plain", "Allow": "POST"},
                b"This endpoint requires a POST request.\n",
            )
        elif path == "/":
            body = app.landing_page().encode()
            self._send(200, {"Content-Type": "text/html; charset=utf-8"}, body)
        else:
            self._send(404, {"Content-Type": "text/plain"}, b"Not found\n")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if not self._admit():
            return
        path = self.path.split("?", 1)[0]
        if path != "/-/reload":
            self._send(
                405, {"Content-Type": "text/plain", "Allow": "GET, HEAD"}, b"Method not allowed\n"
            )
            return
        ok, message = self.server.app.reload()
        self._send(200 if ok else 500, {"Content-Type": "text/plain"}, message.encode() + b"\n")

    def _not_allowed(self) -> None:
        if not self._admit():
            return
        path = self.path.split("?", 1)[0]
        allow = "POST" if path == "/-/reload" else "GET, HEAD"
        self._send(405, {"Content-Type": "text/plain", "Allow": allow}, b"Method not allowed\n")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format, *args)


class WebServer:
    def __init__(
        self,
        app: WebApp,
        listen_address: str,
        web_config: WebConfig | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._server = _Server(
            parse_listen_address(listen_address),
            _Handler,
            app,
            ssl_context=web_config.ssl_context if web_config else None,
            auth=web_config.basic_auth() if web_config else None,
            max_connections=max_connections,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="zmq-exporter-web", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def tls(self) -> bool:
        return self._server.ssl_context is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
