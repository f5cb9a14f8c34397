"""The HTTP transport under `exporter.web.app`: listeners, connections, HTTP/1.x framing, TLS
and worker lanes. It knows nothing of the endpoints: a `Handler` (exporter.web.app.WebApp's
routing) names the lanes, picks one per request and answers it; a `TlsProvider` hands out
the SSL context per handshake and checks the peer after it (the web config, read per use).

Why hand-written and not a server library: cheroot, hypercorn and aiohttp (with strict
timeouts) were run against the probe-lockout requirement (1,000 idle + 200 slowloris
connections, silent TLS clients); see the commit that split web.py for the figures. None of
them bounds its connections or evicts idle ones, so they hold one descriptor per attacker
and fail probes once the descriptor limit is reached; cheroot also handshakes TLS and reads
request heads on its worker threads, so a few silent clients lock everything out.

Connections are owned by one event-loop thread (selectors) while they are in the TLS
handshake, idle between requests, sending a request head or body: none of that costs a
thread, and each has a deadline (TLS_HANDSHAKE_TIMEOUT from accept, IDLE_TIMEOUT between
requests, HEADER_TIMEOUT from a request's first byte to the end of its head and again for
its body). The loop finds where a head ends and enforces the sizes: a request line over
MAX_REQUEST_LINE gets 414, a head over MAX_HEADER_BYTES 431 (up to MAX_EMPTY_LINES empty
lines before it are ignored and counted, more are 400), a body over MAX_BODY_BYTES 413,
HTTP/2 and later 505, plain HTTP on a TLS listener Go's 400 answer. The head itself is
parsed by h11 (sans-IO: it only sees complete heads, never a socket), strict where
str.split and the email parser were lenient, plus checks for what h11 lets through: any
malformed head is 400 and the connection closed. Only a complete request reaches a worker, in
the lane the handler picks (its own threads and bounded queue, 503 when full), so that
nothing queues in front of a health probe. The loop writes the response without blocking;
a response must make progress every WRITE_TIMEOUT, and responses not yet read are bounded
to MAX_OUTPUT_BYTES in total.

At most MAX_CONNECTIONS connections are open, over every listener. A new one is never
refused for an idle or slow one: at the cap the connection waiting longest without a
complete request (idle, in its handshake, head or body) is closed, or failing that the
writer stalled longest; evictions are reported to the handler as too_many_connections.

Out of descriptors (peers flooding a monitored bind take them all until the engine sheds
that listener), accept() fails with EMFILE; Linux reserves the descriptor before it looks
at the queue, so it does even with nobody waiting, e.g. right after the last free one was
taken by a probe. The server then closes a descriptor it holds in reserve for this (on
/dev/null), accepts into it and serves that connection, and takes the reserve again when
one is free (libev's and nginx's trick). Only a connection that has waited for its
request for EVICT_ON_EMFILE_AFTER is evicted to free one: never the probe just accepted.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http.client
import logging
import os
import queue
import re
import selectors
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import h11

log = logging.getLogger("zmq_exporter.web")

MAX_REQUEST_LINE = 8 * 1024  # 414 beyond
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; 431 beyond
MAX_BODY_BYTES = 64 * 1024  # 413 beyond (no endpoint here takes a body)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request
WRITE_TIMEOUT = 30.0  # seconds a response may take to be read by the client
TLS_HANDSHAKE_TIMEOUT = 10.0
# Open connections, every state included. The web side's descriptors are at most this plus
# 6 (the listener, the selector, its wake-up pair, the reserve, a connection accepted before
# another is evicted); 1,000 idle clients are handled by eviction.
MAX_CONNECTIONS = 256
MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # responses written but not yet read, all connections
LISTEN_BACKLOG = 1024  # a burst of connects waits in the kernel, not in SYN retries
WORKER_IDLE_SECONDS = 30.0  # a lane's thread ends after this long without a request

PROBE_WORKERS = 2
# Go's answer to plain HTTP on a TLS listener (net/http), word for word.
HTTP_TO_HTTPS = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"

Response = tuple[int, dict[str, str], bytes]  # status, headers, body


@dataclass(frozen=True)
class LaneSpec:
    """Worker threads for one kind of request, with `backlog` more queued; past that the
    loop answers 503 and reports `reason`."""

    name: str
    workers: int
    backlog: int
    reason: str


class Handler(Protocol):
    """The application: its lanes, the lane of a complete request, and the answer (called
    in a worker thread of that lane: may block)."""

    def lanes(self) -> Sequence[LaneSpec]: ...

    def lane_for(self, request: Request) -> str: ...

    def serve(self, request: Request) -> Response: ...

    def reject(self, reason: str) -> None: ...


class TlsProvider(Protocol):
    """TLS for a listener: the context for each new connection (so rotated certificates
    apply to the next handshake) and a check of the peer once the handshake is done."""

    def context(self) -> ssl.SSLContext: ...

    def check_peer(self, sock: ssl.SSLSocket) -> bool: ...


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
# On EMFILE without a reserve, a connection waiting this long for its request is closed to
# free a descriptor; a younger one (the probe just accepted) never is.
EVICT_ON_EMFILE_AFTER = 1.0
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_SERVER = f"zmq-exporter Python/{sys.version.split()[0]}"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
MAX_EMPTY_LINES = 4  # ignored before a request line; more is refused
MAX_HEADERS = 100  # header fields per request (as http.client); 431 beyond
# The start of a request line (a method token, then a space or nothing yet) on a TLS
# listener: a TLS record starts with a byte under 0x20, a request with a letter.
_PLAIN_HTTP = re.compile(rb"[A-Z]{1,15}(?: |\Z)")
_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
# The version of a request line, read before h11 so that HTTP/2 and later get 505.
_VERSION = re.compile(rb" HTTP/([0-9]{1,10})\.[0-9]{1,10}\r?$")
# What h11 accepts in a head and we do not: control characters other than HTAB, CR, LF
# (a bare CR is h11's to refuse), found as what is left once every other byte is deleted
# (bytes.translate: 8 times as fast as a regex), and obs-fold (a line starting with SP
# or HTAB).
_NOT_CONTROL = bytes(b for b in range(256) if b in b"\t\r\n" or 0x20 <= b != 0x7F)
_OBS_FOLD = re.compile(rb"\n[ \t]")


@dataclass
class Request:
    method: str
    target: str
    headers: http.client.HTTPMessage
    keep_alive: bool
    peer: Any = None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class _Conn:
    """One client connection; touched only by the event loop (workers get a `Request`)."""

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
        # Bytes of buf already searched for the end of the head; in the TLS handshake, 1
        # once the client's first bytes were seen not to be plain HTTP.
        self.scanned = 0
        self.deadline = now + (TLS_HANDSHAKE_TIMEOUT if tls else IDLE_TIMEOUT)
        self.events = 0  # what the selector watches
        self.out: memoryview | None = None
        self.sent = 0
        self.then = _IDLE  # state after the response is written; -1: close
        self.body_left = 0
        self.request: Request | None = None
        self.closed = False


class _Lane:
    """Worker threads for one kind of request, so that scrapes and reloads (which may
    block for up to 30 s) never queue in front of health probes. Only the event loop
    submits and counts `pending`; past `limit` it answers 503 itself."""

    def __init__(self, name: str, workers: int, backlog: int, reason: str) -> None:
        self.name = name
        self.workers = workers  # the most threads this lane runs at once
        self.limit = workers + backlog
        self.reason = reason  # zmq_exporter_http_requests_rejected_total reason when full
        self.pending = 0
        self.queue: queue.SimpleQueue[tuple[_Conn, Request] | None] = queue.SimpleQueue()
        # Threads start on demand and end after WORKER_IDLE_SECONDS without a request, so
        # an idle daemon runs a handful of threads, not one per possible concurrent
        # request (a container's pids limit counts them). Guarded by `lock`: `queued`
        # jobs not yet taken, `started` threads alive, `idle` threads not serving.
        self.lock = threading.Lock()
        self.queued = 0
        self.started = 0
        self.idle = 0
        self.serial = 0  # for thread names


class HttpServer:
    """Serves `handler` on `listeners` (bound, listening sockets; closed by `stop`)."""

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        handler: Handler,
        tls: TlsProvider | None = None,  # TLS or not is fixed for the listeners
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.listeners = list(listeners)
        for listener in self.listeners:
            listener.setblocking(False)
        self.handler = handler
        self.tls = tls
        self.max_connections = max_connections
        self.selector = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()
        # Evictable connections, the one waiting longest for a complete request first:
        # accepted or done with its last response earliest (a slow trickle of header
        # bytes does not move a connection back), with the time that wait started.
        self.waiting: OrderedDict[_Conn, float] = OrderedDict()
        # Connections writing a response, the one without progress longest first.
        self.writing: OrderedDict[_Conn, float] = OrderedDict()
        self.out_bytes = 0
        self.lanes = {
            spec.name: _Lane(spec.name, spec.workers, spec.backlog, spec.reason)
            for spec in handler.lanes()
        }
        self.done: deque[tuple[_Lane, _Conn, bytes, bool]] = deque()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stopping = False
        self.accept_paused_until = 0.0
        # A descriptor held for accept() to use when the process has none left (EMFILE).
        self.reserve: int | None = None
        self._take_reserve()
        self.threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        for listener in self.listeners:
            self.selector.register(listener, selectors.EVENT_READ, listener)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.wake_r)
        self.threads.append(
            threading.Thread(target=self._run, name="zmq-exporter-web", daemon=True)
        )
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping = True
        self._wake()
        for lane in self.lanes.values():
            with lane.lock:
                for _ in range(lane.started):
                    lane.queue.put(None)
        loop = self.threads[-1] if self.threads else None
        if loop is not None:
            loop.join(5.0)
        if loop is None or not loop.is_alive():
            for conn in list(self.conns):
                self._close(conn, graceful=False)
            self.selector.close()
        for listener in self.listeners:
            listener.close()
        self.wake_r.close()
        self.wake_w.close()
        self._drop_reserve()

    def _take_reserve(self) -> None:
        if self.reserve is None and not self.stopping:
            with contextlib.suppress(OSError):  # none free: tried again later
                self.reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _drop_reserve(self) -> None:
        reserve, self.reserve = self.reserve, None
        if reserve is not None:
            os.close(reserve)

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
                    if isinstance(key.data, _Conn):
                        self._on_event(key.data, mask)
                    elif key.data is self.wake_r:
                        with contextlib.suppress(OSError):
                            while self.wake_r.recv(4096):
                                pass
                    else:
                        self._accept(key.data)
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
        if self.reserve is None:  # spent on an accept: its descriptor is free now
            self._take_reserve()

    def _evict(self, min_wait: float = 0.0) -> bool:
        """Close the connection that has waited longest without a complete request, or
        else the writer that has made no progress for longest; only one that has waited
        or stalled for `min_wait` seconds."""
        victim = next(iter(self.waiting), None)
        since = self.waiting[victim] if victim is not None else 0.0
        if victim is None:
            victim = next(iter(self.writing), None)
            since = self.writing[victim] if victim is not None else 0.0
        if victim is None or time.monotonic() - since < min_wait:
            return False
        log.debug("HTTP connection evicted", extra={"peer": victim.peer})
        self.handler.reject("too_many_connections")
        self._close(victim, graceful=False)
        return True

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self.conns if c.deadline <= now and c.state != _BUSY]:
            log.debug("HTTP connection timed out", extra={"peer": conn.peer})
            self._close(conn, graceful=conn.state != _WRITING)
        self._take_reserve()
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            for listener in self.listeners:
                self.selector.register(listener, selectors.EVENT_READ, listener)

    # -- accepting -----------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        self._take_reserve()  # if spent and not taken back yet
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno not in _EXHAUSTED:
                    continue  # ECONNABORTED and the like: that client is gone
                accepted = self._accept_exhausted(listener, err)
                if accepted is None:
                    return
                sock, peer = accepted
            if len(self.conns) >= self.max_connections:
                self._evict()  # the newcomer is not among the candidates yet
            if len(self.conns) >= self.max_connections:
                # Every connection is busy with a complete request (bounded by the lanes,
                # so only with a small max_connections).
                self.handler.reject("too_many_connections")
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    if self.tls is None:
                        sock.send(_error(503, "too many open connections", head_only=False))
                    sock.close()
                continue
            self._add(sock, peer)

    def _accept_exhausted(
        self, listener: socket.socket, err: OSError
    ) -> tuple[socket.socket, Any] | None:
        """accept() failed for want of descriptors (or memory): accept into the reserve.
        None if there was nobody to accept or it failed again; accepting is then paused
        for a moment, or the listener stays readable and the loop spins."""
        if self.reserve is not None:
            self._drop_reserve()
            try:
                return listener.accept()
            except (BlockingIOError, InterruptedError):
                return None  # nobody waiting: EMFILE came before the queue was looked at
            except OSError as again:  # another thread took the descriptor first
                err = again
            finally:
                self._take_reserve()  # none free if the connection took it: later then
        log.warning("HTTP accept failed", extra={"err": str(err)})
        # Free one, but never the probe just accepted: only a connection that has waited
        # long for its request (an idle keep-alive, a slow client).
        self._evict(EVICT_ON_EMFILE_AFTER)
        self.accept_paused_until = time.monotonic() + _PAUSE_ACCEPT
        for other in self.listeners:
            self.selector.unregister(other)
        return None

    def _add(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        now = time.monotonic()
        if self.tls is not None:
            try:  # the context as of this handshake
                sock = self.tls.context().wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ValueError):
                sock.close()
                return
        conn = _Conn(sock, peer, self.tls is not None, now)
        self.conns.add(conn)
        self.waiting[conn] = now
        if conn.tls:
            self._handshake(conn)
        else:
            self._watch(conn, selectors.EVENT_READ)

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        if not conn.scanned:  # the client's first bytes not looked at yet
            try:
                first = socket.socket.recv(conn.sock, 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self._watch(conn, selectors.EVENT_READ)
                return
            except OSError:
                self._close(conn, graceful=False)
                return
            if _PLAIN_HTTP.match(first):
                # A request line where a ClientHello (first byte 0x16) should be: answer
                # as Go does for every method, not only the four OpenSSL recognises.
                self._plain_http_on_tls(conn)
                return
            conn.scanned = 1  # reset by _idle once the handshake is done
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
            if isinstance(err, ssl.SSLError) and err.reason == "HTTP_REQUEST":
                # OpenSSL saw "GET ", "POST", "HEAD" or "PUT " where a ClientHello should
                # be (a request line that arrived after the first peek).
                self._plain_http_on_tls(conn)
                return
            self._close(conn, graceful=False)
            return
        assert self.tls is not None
        if not self.tls.check_peer(conn.sock):
            log.debug("TLS client refused after the handshake", extra={"peer": conn.peer})
            self._close(conn, graceful=False)
            return
        self._idle(conn, time.monotonic(), refresh=False)

    def _plain_http_on_tls(self, conn: _Conn) -> None:
        """Go's 400 answer, on the socket itself (not through TLS)."""
        with contextlib.suppress(OSError):
            socket.socket.send(conn.sock, HTTP_TO_HTTPS)
            # The rest of the request is read away first: closing with unread bytes sends
            # a reset, which can discard the answer at the client.
            for _ in range(4):
                if not socket.socket.recv(conn.sock, _RECV_SIZE, socket.MSG_DONTWAIT):
                    break
        self._close(conn, graceful=True)

    # -- reading requests ----------------------------------------------------------------

    def _idle(self, conn: _Conn, now: float, refresh: bool = True) -> None:
        """Wait for the next request (a pipelined one may be buffered already)."""
        conn.state = _IDLE
        conn.deadline = now + IDLE_TIMEOUT
        conn.scanned = 0
        conn.request = None
        if refresh:
            self.waiting[conn] = now  # at the end: its wait starts now
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
        """Look for a complete request head in conn.buf; True while more bytes are needed.
        Only where the head ends and the size limits are found here; the head itself is
        parsed by h11 (`_head`)."""
        buf = conn.buf
        # A few empty lines before a request line are ignored (RFC 9112 2.2); more is a
        # client streaming line ends, refused at once. They count against the budgets.
        skip = _EMPTY_LINES.match(buf).end()  # type: ignore[union-attr]
        if buf.count(b"\n", 0, skip) > MAX_EMPTY_LINES:
            return self._refuse(conn, 400, "Bad request syntax")
        line_end = buf.find(b"\n", skip)
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
        head = bytes(buf[skip:end])
        del buf[:end]
        conn.scanned = 0
        return self._head(conn, head, line_end - skip)

    def _head(self, conn: _Conn, head: bytes, line_end: int) -> bool:
        """A complete head (`parse_head`): refuse it, read its body or dispatch it.
        Returns False (the connection is no longer reading a head)."""
        parsed = parse_head(head, line_end, conn.peer)
        if isinstance(parsed, Refusal):
            return self._refuse(conn, parsed.status, parsed.message, parsed.reason)
        conn.request, conn.body_left, expect_continue = parsed
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
        if expect_continue:
            self._respond(conn, b"HTTP/1.1 100 Continue\r\n\r\n", then=_BODY)
        else:
            conn.state = _BODY
            self._read(conn)
        return False

    def _refuse(self, conn: _Conn, status: int, message: str, reason: str = "") -> bool:
        """Answer a request that is not served and close: returns False."""
        if reason:
            self.handler.reject(reason)
        head_only = conn.request is not None and conn.request.method == "HEAD"
        self._respond(conn, _error(status, message, head_only), then=-1)
        return False

    def _dispatch(self, conn: _Conn) -> None:
        request = conn.request
        assert request is not None
        lane = self.lanes[self.handler.lane_for(request)]
        if lane.pending >= lane.limit:
            conn.request = None
            self.handler.reject(lane.reason)
            head_only = request.method == "HEAD"
            self._respond(conn, _error(503, "too many concurrent requests", head_only), then=-1)
            return
        self.waiting.pop(conn, None)  # a complete request: not evictable while served
        conn.state = _BUSY
        conn.deadline = float("inf")
        self._watch(conn, 0)
        lane.pending += 1
        with lane.lock:
            lane.queued += 1
            lane.queue.put((conn, request))
            if lane.idle < lane.queued and lane.started < lane.workers:
                lane.started += 1
                lane.idle += 1
                lane.serial += 1
                threading.Thread(
                    target=self._work,
                    args=(lane,),
                    name=f"zmq-exporter-web-{lane.name}-{lane.serial}",
                    daemon=True,
                ).start()

    # -- workers -------------------------------------------------------------------------

    def _work(self, lane: _Lane) -> None:
        while True:
            try:
                job = lane.queue.get(timeout=WORKER_IDLE_SECONDS)
            except queue.Empty:
                with lane.lock:
                    if lane.queued:  # a job was put between the timeout and the lock
                        continue
                    lane.idle -= 1
                    lane.started -= 1
                    return
            if job is None:
                with lane.lock:
                    lane.idle -= 1
                    lane.started -= 1
                return
            with lane.lock:
                lane.queued -= 1
                lane.idle -= 1
            self._serve(lane, *job)
            with lane.lock:
                lane.idle += 1

    def _serve(self, lane: _Lane, conn: _Conn, request: Request) -> None:
        """One request; its own frame, so an idle worker holds no response body (at
        20,000 sockets a body is ~24 MB)."""
        try:
            status, headers, body = self.handler.serve(request)
            keep_alive = request.keep_alive
            data = _response(status, headers, body, request.method == "HEAD", not keep_alive)
        except Exception:
            log.exception("HTTP handler error", extra={"path": request.path})
            keep_alive = False
            data = _error(500, "Internal server error", request.method == "HEAD")
        self.done.append((lane, conn, data, keep_alive))
        self._wake()

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
            self.handler.reject("too_many_connections")
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
            self.waiting[conn] = time.monotonic()
            self._read(conn)
        else:
            self._idle(conn, time.monotonic())


# -- request heads ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A head that is not served: the status and message of the answer (the connection
    is closed after it), and the zmq_exporter_http_requests_rejected_total reason if any."""

    status: int
    message: str
    reason: str = ""


def parse_head(head: bytes, line_end: int, peer: Any = None) -> tuple[Request, int, bool] | Refusal:
    """A complete request head (the request line ends at `line_end`, the head with its
    empty line), parsed by h11: RFC 9110/9112 grammar (single spaces in the request
    line, a visible-ASCII target, no whitespace before a colon, no bare CR, one Host in
    HTTP/1.1, one Content-Length value, Transfer-Encoding exactly `chunked`), plus what h11
    lets through and a server must not: obs-fold, control characters in values,
    Content-Length with Transfer-Encoding. The request, its body's length and whether the
    client waits for 100 Continue; or why it is refused."""
    version = _VERSION.search(head, 0, line_end)
    if version is not None and int(version[1]) >= 2:
        return Refusal(505, "Invalid HTTP version")
    if head.translate(None, _NOT_CONTROL) or _OBS_FOLD.search(head, line_end):
        return Refusal(400, "Bad request syntax")
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES + 1)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as err:  # not echoed: it quotes the client's bytes
        log.debug("Bad request", extra={"peer": peer, "err": str(err)})
        return Refusal(400, "Bad request syntax")
    if not isinstance(event, h11.Request):
        return Refusal(400, "Bad request syntax")
    method = event.method.decode("ascii")
    if method not in _KNOWN_METHODS:
        return Refusal(501, f"Unsupported method ({method!r})")
    fields = event.headers.raw_items()
    if len(fields) > MAX_HEADERS:
        return Refusal(431, "Too many headers", "too_large")
    headers = http.client.HTTPMessage()
    length = 0
    chunked = False
    tokens: list[bytes] = []
    for name, value in fields:
        lower = name.lower()
        if lower == b"content-length":
            length = int(value)  # h11: digits only, one value
        elif lower == b"transfer-encoding":
            chunked = True  # h11: exactly `chunked`, once
        elif lower == b"connection":
            tokens += (token.strip().lower() for token in value.split(b","))
        headers[name.decode("ascii")] = value.decode("iso-8859-1")
    if chunked and "Content-Length" in headers:
        # Which one frames the body is the classic smuggling ambiguity (RFC 9112 6.1).
        return Refusal(400, "Content-Length with Transfer-Encoding")
    if chunked:  # well-formed, but no endpoint takes a body
        return Refusal(411, "Content-Length required")
    if length > MAX_BODY_BYTES:
        return Refusal(413, "Request body too large", "too_large")
    # `Connection` is a list of tokens: `close` anywhere closes.
    http11 = event.http_version == b"1.1"
    keep_alive = b"close" not in tokens and (http11 or b"keep-alive" in tokens)
    target = event.target.decode("ascii")  # h11: visible ASCII only
    if not target.startswith("/") and "://" in target:  # absolute-form (RFC 9112 3.2.2)
        parts = urllib.parse.urlsplit(target)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expect_continue = length > 0 and http11 and headers.get("Expect", "").lower() == "100-continue"
    return Request(method, target, headers, keep_alive, peer), length, expect_continue


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
