"""The HTTP side: /metrics (text format or OpenMetrics by content negotiation), health
endpoints and the landing page. One thread per connection; the engine is only ever read
through snapshots, so a slow client blocks nothing but its own thread.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("zmq_exporter.web")


@dataclass
class WebApp:
    registry: CollectorRegistry
    telemetry_path: str
    is_ready: Callable[[], bool]
    landing_page: Callable[[], str]
    reload: Callable[[], tuple[bool, str]]
    max_concurrent_scrapes: int = 8

    def __post_init__(self) -> None:
        self._scrape_slots = threading.BoundedSemaphore(self.max_concurrent_scrapes)

    def metrics(
        self, accept: str | None, accept_encoding: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if not self._scrape_slots.acquire(blocking=False):
            return 503, {"Content-Type": "text/plain"}, b"too many concurrent scrapes\n"
        try:
            encoder, content_type = choose_encoder(accept or "")
            body = encoder(self.registry)
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
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], app: WebApp
    ) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.app = app
        super().__init__(("::" if host == "" else host, address[1]), handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ":port" means every interface, IPv4 included.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # seconds a client may take to send its request
    protocol_version = "HTTP/1.1"
    server_version = "zmq-exporter"

    def do_GET(self) -> None:
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

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/-/reload":
            self._send(
                405, {"Content-Type": "text/plain", "Allow": "GET, HEAD"}, b"Method not allowed\n"
            )
            return
        ok, message = self.server.app.reload()
        self._send(200 if ok else 500, {"Content-Type": "text/plain"}, message.encode() + b"\n")

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format, *args)


class WebServer:
    def __init__(self, app: WebApp, listen_address: str) -> None:
        self._server = _Server(parse_listen_address(listen_address), _Handler, app)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="zmq-exporter-web", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
