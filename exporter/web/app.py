"""The HTTP application: /metrics (text format or OpenMetrics by content negotiation, gzip
when the client accepts it), health endpoints, the landing page, POST /-/reload and GET
/probe; the web config's basic auth, rate limit and response headers, read per request
(`exporter.web.live_config.WebConfigSource`); the listeners (--web.listen-address, any number of
them, or the sockets systemd passes with --web.systemd-socket). The transport (connections,
HTTP/1.x framing, TLS, deadlines, worker lanes) is `exporter.web.server`.

/metrics is the socket families pre-rendered by `WebApp.state` (`StateCollector.prerender`,
lines kept per socket snapshot) followed by the negotiated encoder's output of everything
else; an escaping or version that `fast_format` does not cover goes through the encoder
entirely. Either way the bytes are what the encoder alone would write.

Requests go to lanes with their own threads, so that nothing queues in front of a health
probe: /-/healthy and /-/ready; scrapes and everything else (at most
`max_concurrent_scrapes` render at once, --web.max-requests, 503 beyond, 0 for no limit);
POST /-/reload (may wait 30 s); GET /probe (its own workers); and any request whose
credentials need a bcrypt check (not cached), so that password guesses hold none of the
others' workers (webauth: one check at a time, bounded per client address).
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.core import metrics
from exporter.render.collected import Collected
from exporter.render.prometheus import StateCollector, one_sample
from exporter.render.sockettext import fast_format
from exporter.web.auth import AuthResult
from exporter.web.live_config import WebConfig, WebConfigSource
from exporter.web.server import (
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    PROBE_WORKERS,
    HttpServer,
    LaneSpec,
    Request,
    Response,
)
from exporter.web.tls import check_client_sans

__all__ = ["MAX_CONNECTIONS", "WebApp", "WebServer", "parse_listen_address"]

log = logging.getLogger("zmq_exporter.web")

REJECT_REASONS = metrics.HTTP_REJECTED.values
# What answers a request (WebHandler.route), and the lane whose workers serve each route;
# the others are served by the scrape lane.
Route = Literal[
    "metrics",
    "healthy",
    "ready",
    "reload",
    "reload_needs_post",
    "probe",
    "connections",
    "landing_page",
    "not_found",
    "method_not_allowed",
]
ROUTE_LANES: dict[Route, str] = {
    "healthy": "probe",
    "ready": "probe",
    "reload": "reload",
    "probe": "zmtp-probe",
}
DEFAULT_MAX_REQUESTS = 8  # --web.max-requests
# Requests whose credentials need a bcrypt check (not cached): their own lane, so that
# password guesses never hold the workers of health probes or scrapes; one hashes at a
# time (webauth.HashGate), the backlog beyond is answered 503 (auth_busy) at once.
AUTH_WORKERS = 2
AUTH_BACKLOG = 32
# Prober.handle_probe (exporter/prober/handler.py): query, headers -> status, headers, body.
ProbeHandler = Callable[[dict[str, list[str]], http.client.HTTPMessage], Response]


SCRAPE_BUCKETS = metrics.SCRAPE_DURATION.buckets


class WebStats(Collector):
    """The web server's self-metrics: scrapes served, their duration (a prometheus_client
    Histogram), series exported and refused requests. No `_created` series, like every
    other self-metric here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scrapes = 0
        duration = metrics.SCRAPE_DURATION
        self.duration = Histogram(
            duration.metric_name,
            duration.help,
            unit=duration.unit or "",
            buckets=SCRAPE_BUCKETS,
            registry=None,
        )
        self.series = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)

    def scraped(self, seconds: float, series: int) -> None:
        self.duration.observe(seconds)
        with self._lock:
            self.scrapes += 1
            self.series = series

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            scrapes, series, rejected = self.scrapes, self.series, dict(self.rejected)
        yield one_sample(metrics.SCRAPES, scrapes)
        for family in self.duration.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
        yield one_sample(metrics.SERIES, series)
        refused = metrics.HTTP_REJECTED
        family = Metric(refused.metric_name, refused.help, refused.type)
        for reason, count in rejected.items():
            family.add_sample(refused.name, {"reason": reason}, count)
        yield family


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether `Accept-Encoding` allows gzip (RFC 9110 12.5.3): coding names are
    case-insensitive, `x-gzip` is gzip, `q=0` means "not this one", and `*` covers gzip
    when gzip is not named. prometheus_client's gzip_accepted is not used: it takes
    `gzip;q=0` for a yes."""
    named: float | None = None
    wildcard: float | None = None
    for element in (accept_encoding or "").split(","):
        coding, *params = (part.strip() for part in element.split(";"))
        q = 1.0
        for param in params:
            key, _, number = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(number.strip())
                except ValueError:
                    q = 0.0  # a malformed weight is not a yes
        coding = coding.lower()
        if coding in ("gzip", "x-gzip"):
            named = max(named or 0.0, q)
        elif coding == "*":
            wildcard = q
    if named is not None:
        return named > 0
    return wildcard is not None and wildcard > 0


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
    # --web.max-requests, as node_exporter: scrapes rendered at once, 503 beyond; 0: no limit.
    max_concurrent_scrapes: int = DEFAULT_MAX_REQUESTS
    # False once the engine thread has died: /-/healthy and /-/ready answer 503.
    is_healthy: Callable[[], bool] = lambda: True
    # GET /probe (exporter/prober): Prober.handle_probe, on a lane of its own
    # with `max_concurrent_probes` workers (--probe.max-concurrent). None: no /probe.
    probe: ProbeHandler | None = None
    max_concurrent_probes: int = 0
    # GET /api/v1/connections (exporter/connections/table.py): query -> response, in the
    # scrape lane (it reads the kernel, like a scrape). None: no such route.
    connections: Callable[[dict[str, list[str]]], Response] | None = None

    def __post_init__(self) -> None:
        self._scrape_slots = (
            threading.BoundedSemaphore(self.max_concurrent_scrapes)
            if self.max_concurrent_scrapes > 0
            else None
        )
        self.stats = WebStats()
        self.registry.register(self.stats)

    def metrics(self, accept: str | None, accept_encoding: str | None) -> Response:
        slots = self._scrape_slots
        if slots is not None and not slots.acquire(blocking=False):
            self.stats.reject("too_many_scrapes")
            # promhttp's answer (HandlerOpts.MaxRequestsInFlight), as node_exporter gives.
            message = (
                f"Limit of concurrent requests reached ({self.max_concurrent_scrapes}), "
                "try again later.\n"
            )
            return 503, {"Content-Type": "text/plain"}, message.encode()
        try:
            start = time.perf_counter()
            try:
                encoder, content_type = choose_encoder(accept or "")
            except Exception:
                # prometheus_client reads the client's Accept and fails on a malformed
                # version (`version=1.s0.0`: TypeError): served in the text format.
                encoder, content_type = choose_encoder("")
            head, series = b"", 0
            openmetrics = fast_format(encoder)
            if openmetrics is None:  # an escaping or version we do not pre-render
                families = list(self.state.collect())
            else:
                pre = self.state.prerender(openmetrics)
                head, series, families = pre.text, pre.series, pre.families
            families.extend(self.registry.collect())
            body = head + encoder(Collected(families))
            series += sum(len(family.samples) for family in families)
            self.stats.scraped(time.perf_counter() - start, series)
        finally:
            if slots is not None:
                slots.release()
        # The body depends on both: caches must key on them.
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if accepts_gzip(accept_encoding):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return 200, headers, body


# -- routing: the handler the transport calls --------------------------------------------

_PLAIN = {"Content-Type": "text/plain"}


class WebHandler:
    """`exporter.web.server.Handler` for a `WebApp`: lanes, routing, and per request the
    web config's rate limit, basic auth and response headers."""

    def __init__(self, app: WebApp, web_config: WebConfigSource | None) -> None:
        self.app = app
        self.web_config = web_config

    def lanes(self) -> Sequence[LaneSpec]:
        app = self.app
        limit = app.max_concurrent_scrapes
        # Two workers over the limit so that refusals (503) are answered at once; without
        # a limit, as many as a Python process usefully renders at once.
        scrape_workers = min(limit + 2, 32) if limit > 0 else 32
        lanes = [
            LaneSpec("probe", PROBE_WORKERS, 32, "too_many_connections"),
            LaneSpec("scrape", scrape_workers, 16, "too_many_scrapes"),
            LaneSpec("reload", 1, 32, "too_many_connections"),
            LaneSpec("auth", AUTH_WORKERS, AUTH_BACKLOG, "auth_busy"),
        ]
        if app.probe is not None:
            # /probe: a probe may wait out its whole timeout, so probes have
            # their own workers and never queue in front of scrapes or health checks.
            workers = max(1, app.max_concurrent_probes)
            lanes.append(LaneSpec("zmtp-probe", workers, 64, "too_many_connections"))
        return lanes

    def route(self, method: str, path: str) -> Route:
        """The route table: what answers `method` `path` (`_answer`), and so the lane
        whose workers do (`ROUTE_LANES`)."""
        app = self.app
        if method in ("GET", "HEAD"):
            if path == app.telemetry_path:
                return "metrics"
            if path == "/-/healthy":
                return "healthy"
            if path == "/-/ready":
                return "ready"
            if path == "/-/reload":
                return "reload_needs_post"
            if path == "/probe" and app.probe is not None:
                return "probe"
            if path == "/api/v1/connections" and app.connections is not None:
                return "connections"
            if path == "/":
                return "landing_page"
            return "not_found"
        if method == "POST" and path == "/-/reload":
            return "reload"
        return "method_not_allowed"

    def lane_for(self, request: Request) -> str:
        # Credentials that need bcrypt (checked on the event loop against the config in
        # use, without reading the file: a cache lookup, microseconds).
        auth = self.web_config.peek().auth if self.web_config else None
        header = request.headers.get("Authorization")
        if auth is not None and header is not None and not auth.cached(header):
            return "auth"
        return ROUTE_LANES.get(self.route(request.method, request.path), "scrape")

    def reject(self, reason: str) -> None:
        self.app.stats.reject(reason)

    def serve(self, request: Request) -> Response:
        """The answer to a complete request (in a worker thread: may block), with the
        headers of the web config as of this request (webconfig.WebConfigSource)."""
        config = self.web_config.current() if self.web_config else None
        status, headers, body = self._answer(request, config)
        if config is not None and config.headers:
            headers = {**headers, **config.headers}
        return status, headers, body

    def _answer(self, request: Request, config: WebConfig | None) -> Response:
        app = self.app
        plain = _PLAIN
        # rate_limit (webauth.RateLimiter) for every request, except health probes that
        # need no password check (no credentials, or cached ones): a liveness probe
        # answered 429 would get a healthy exporter restarted, but a password guess sent
        # to a probe path is a guess like any other.
        limiter = config.rate_limiter if config is not None else None
        auth = config.auth if config is not None else None
        header = request.headers.get("Authorization")
        exempt = request.path in ("/-/healthy", "/-/ready") and (
            header is None or auth is None or auth.cached(header)
        )
        if limiter is not None and not exempt and not limiter.allow():
            app.stats.reject("rate_limit")
            return 429, plain, b"Too Many Requests\n"
        peer = request.peer
        client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        verdict = auth.verify(header, client) if auth else AuthResult.OK
        if verdict is AuthResult.BUSY:  # no bcrypt slot free in time (webauth.HashGate)
            app.stats.reject("auth_busy")
            return 503, {**plain, "Retry-After": "1"}, b"Too many password checks at once\n"
        if verdict is AuthResult.THROTTLED:  # this address guessed too much (AddressThrottle)
            app.stats.reject("auth_rate")
            return 429, {**plain, "Retry-After": "1"}, b"Too many password checks\n"
        if verdict is not AuthResult.OK:
            app.stats.reject("unauthorized")
            return (
                401,
                {**plain, "WWW-Authenticate": 'Basic realm="zmq-exporter"'},
                b"Unauthorized\n",
            )
        route = self.route(request.method, request.path)
        if route == "metrics":
            headers = request.headers
            return app.metrics(headers.get("Accept"), headers.get("Accept-Encoding"))
        if route == "healthy":
            if not app.is_healthy():
                return 503, plain, b"Engine stopped\n"
            return 200, plain, b"Healthy\n"
        if route == "ready":
            if app.is_healthy() and app.is_ready():
                return 200, plain, b"Ready\n"
            return 503, plain, b"Not ready\n"
        if route == "reload_needs_post":
            return 405, {**plain, "Allow": "POST"}, b"This endpoint requires a POST request.\n"
        if route == "probe" and app.probe is not None:  # exporter/prober
            query = urllib.parse.parse_qs(request.target.partition("?")[2])
            return app.probe(query, request.headers)
        if route == "connections" and app.connections is not None:
            query = urllib.parse.parse_qs(request.target.partition("?")[2])
            return app.connections(query)
        if route == "landing_page":
            body = app.landing_page().encode()
            return 200, {"Content-Type": "text/html; charset=utf-8"}, body
        if route == "reload":
            ok, message = app.reload()
            return 200 if ok else 500, plain, message.encode() + b"\n"
        if route == "method_not_allowed":
            allow = "POST" if request.path == "/-/reload" else "GET, HEAD"
            return 405, {**plain, "Allow": allow}, b"Method not allowed\n"
        return 404, plain, b"Not found\n"


class WebTls:
    """`exporter.web.server.TlsProvider` over the web config: the SSL context as of each
    handshake, then `client_allowed_sans` (webtls.check_client_sans)."""

    def __init__(self, source: WebConfigSource) -> None:
        self.source = source
        first = source.current().ssl_context
        assert first is not None
        self._first = first

    def context(self) -> ssl.SSLContext:
        # A reload never switches TLS off (WebConfigSource keeps the last good one).
        return self.source.current().ssl_context or self._first

    def check_peer(self, sock: ssl.SSLSocket) -> bool:
        return check_client_sans(sock)


# -- listeners ---------------------------------------------------------------------------


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


def listen(address: str) -> socket.socket:
    """A listening socket for `address` (parse_listen_address); `:port` is every
    interface, IPv4 included."""
    host, port = parse_listen_address(address)
    family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::" if host == "" else host, port))
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor systemd passes


def systemd_listeners() -> list[socket.socket]:
    """The listening sockets systemd passed (socket activation, sd_listen_fds(3)):
    LISTEN_FDS descriptors from 3 on, if LISTEN_PID is this process. The variables are
    then removed (children must not take them), as the toolkit does. ValueError when
    there are none or one is not a listening stream socket."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid or pid.strip() != str(os.getpid()):
        raise ValueError(
            "--web.systemd-socket: no socket passed by systemd "
            f"(LISTEN_PID={pid or 'unset'}, this process is {os.getpid()})"
        )
    if not (count.isascii() and count.isdigit()) or int(count) < 1:
        raise ValueError(f"--web.systemd-socket: LISTEN_FDS={count!r}: no socket passed")
    listeners = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise ValueError(f"--web.systemd-socket: descriptor {fd} is not a socket")
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ValueError(f"--web.systemd-socket: descriptor {fd}: {err}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise ValueError(f"--web.systemd-socket: descriptor {fd} is not a listening TCP socket")
        listeners.append(sock)
    return listeners


def bound_address(sock: socket.socket) -> str:
    """host:port as bound: `[::]` is every interface, IPv4 included."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(name)
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WebServer:
    """`app` on every address of `listen_addresses` (or, with `systemd_socket`, on the
    sockets systemd passed), through `exporter.web.server.HttpServer`."""

    def __init__(
        self,
        app: WebApp,
        listen_addresses: str | Sequence[str],
        web_config: WebConfig | None = None,
        max_connections: int = MAX_CONNECTIONS,
        systemd_socket: bool = False,
    ) -> None:
        listeners: list[socket.socket] = []
        try:
            if systemd_socket:
                listeners = systemd_listeners()
            else:
                addresses = (
                    [listen_addresses] if isinstance(listen_addresses, str) else listen_addresses
                )
                for address in addresses:
                    listeners.append(listen(address))
        except (OSError, ValueError):
            for listener in listeners:
                listener.close()
            raise
        self.addresses = [bound_address(listener) for listener in listeners]
        self.ports = [int(listener.getsockname()[1]) for listener in listeners
                      if listener.family != socket.AF_UNIX]  # fmt: skip
        source = WebConfigSource(web_config) if web_config else None  # read per use
        tls = WebTls(source) if source is not None and source.tls else None
        self._server = HttpServer(
            listeners, WebHandler(app, source), tls, max_connections=max_connections
        )

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self.ports[0] if self.ports else 0

    @property
    def tls(self) -> bool:
        return self._server.tls is not None

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        """Stop serving and close every connection; a worker still inside a handler (a
        reload) finishes on its own, its answer dropped."""
        self._server.stop()
