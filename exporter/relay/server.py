"""The relay's sidecar side: the daemon's ROUTER, reading application processes' socket
states (exporter.relay.wire) and serving them with the daemon's families plus a `process`
label.

Public names: `RelayServer` (a thread with its own context, ROUTER and monitor;
`snapshot_sockets()` for the renderers, `collector()` for the self-metrics and the
relayed message counts of library mode's `messages=True`), `Peer`,
`may_claim`, `goes_backwards`, `series_of`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as _socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from zmq.auth.thread import ThreadAuthenticator

from exporter.core import metrics
from exporter.core.events import MONITOR_HEAD, Event
from exporter.core.state import SocketSnapshot
from exporter.messages import families as message_families
from exporter.relay.wire import REJECT_REASONS, Message, RejectedMessage, RelayLimits, decode
from exporter.render.rows import socket_rows

log = logging.getLogger("zmq_exporter.relay")


@dataclass(frozen=True)
class Peer:
    """Who a sender connection is: its ROUTER routing id (unique while the ROUTER lives),
    and what the kernel or the handshake says of the peer. On ipc, SO_PEERCRED of the
    connection's fd (pid, uid); on CURVE, the client's public key (Z85, the ZAP user id)."""

    conn: bytes
    pid: int | None = None
    uid: int | None = None
    key: str | None = None


@dataclass
class _Conn:
    peer: Peer
    fd: int
    last_seen: float  # monotonic


@dataclass
class _Process:
    instance: str
    heartbeat: float
    last_seen: float  # monotonic
    owner: Peer  # the connection that holds this process id, and its credentials
    # name -> (seq of the state shown, state as received, as rendered)
    sockets: dict[str, tuple[int, SocketSnapshot]] = field(default_factory=dict)
    down_since: float | None = None  # monotonic: its connection ended / it went silent
    rendered: dict[str, SocketSnapshot] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)  # name -> series it renders
    total_series: int = 0
    # name -> its message counts (the wire's `messages` extension), for the sockets whose
    # latest state carried them.
    messages: dict[str, tuple[float, ...]] = field(default_factory=dict)


def may_claim(proc: _Process, peer: Peer) -> bool:
    """Whether `peer` may send as `proc`'s process id (docs/relay.md, "Identity").

    The connection that holds it always may. While that connection lives (no DISCONNECTED
    seen, no bye, not silent for 3 heartbeats), only the same peer on a new connection
    may: the same pid and uid on ipc, the same CURVE key. Once it ended, a peer with the
    same credentials (uid on ipc, CURVE key; none on plain tcp) takes over at once; other
    credentials wait until the process expires (`relay.expire`)."""
    owner = proc.owner
    if peer.conn == owner.conn:
        return True
    if proc.down_since is None:
        same_pid = peer.pid is not None and (peer.pid, peer.uid) == (owner.pid, owner.uid)
        return same_pid or (peer.key is not None and peer.key == owner.key)
    return (peer.uid, peer.key) == (owner.uid, owner.key)


def goes_backwards(old: SocketSnapshot, new: SocketSnapshot) -> bool:
    """Whether a cumulative count of `old` is above the same count in `new` (an endpoint
    both have; a count `new` lacks is 0): a counter going back without a restart."""
    for event_id, n in old.unknown_events.items():
        if new.unknown_events.get(event_id, 0) < n:
            return True
    by_name = {ep.endpoint: ep for ep in new.endpoints}
    for ep in old.endpoints:
        now = by_name.get(ep.endpoint)
        if now is None:
            continue
        pairs: tuple[tuple[Mapping[Any, int], Mapping[Any, int]], ...] = (
            (ep.counts, now.counts),
            (ep.errno_counts, now.errno_counts),
            (ep.handshake_failures, now.handshake_failures),
        )
        for held, current in pairs:
            for key, n in held.items():
                if current.get(key, 0) < n:
                    return True
    return False


def series_of(sock: SocketSnapshot) -> int:
    """The series a relayed socket renders (its rows in every output)."""
    return sum(1 for _ in socket_rows(sock))


@dataclass
class RelayStats:
    received: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))


class RelayServer:
    """The daemon's relay: a ROUTER on `listen`, read by a thread of its own, with its own
    monitor so that a sender's connection ending zeroes its gauges at once."""

    def __init__(
        self,
        listen: tuple[str, ...],
        *,
        expire: float = 300.0,
        limits: RelayLimits | None = None,
        ipc_mode: int | None = None,
        curve_secret_key: bytes | None = None,
        curve_allowed_clients: frozenset[bytes] | None = None,
    ) -> None:
        self.listen = listen
        self._allowed = curve_allowed_clients  # Z85 keys; None: any key pair
        self.expire = expire
        self.limits = limits or RelayLimits()
        self._ipc_mode = ipc_mode
        self._curve = curve_secret_key
        self._lock = threading.Lock()
        self._processes: dict[str, _Process] = {}  # guarded by _lock
        self._series = 0  # relayed series held, all processes; guarded by _lock
        # Live sender connections by routing id, and by fd for the monitor's DISCONNECTED
        # (reader thread only).
        self._conns: dict[bytes, _Conn] = {}
        self._conn_by_fd: dict[int, bytes] = {}
        self.stats = RelayStats()  # guarded by _lock
        self._stop = threading.Event()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(1)
        self._router: zmq.Socket[bytes] = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 10_000)
        # A hard memory bound (libzmq drops the connection beyond it); messages between
        # the limit and this are read and counted as too_large.
        self._router.setsockopt(zmq.MAXMSGSIZE, 4 * self.limits.max_message_bytes)
        # With CURVE, a ZAP handler on its own thread: it admits the allowed client keys
        # (relay.curve_allowed_clients; any without it) and makes each connection's key
        # its ZAP user id, which binds a process id to the key (see `Peer`).
        self._auth: ThreadAuthenticator | None = None
        if curve_secret_key is not None:
            self._auth = ThreadAuthenticator(self._ctx, log=log.getChild("zap"))
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=self)
            self._router.curve_server = True
            self._router.curve_secretkey = curve_secret_key
        addr = f"inproc://zmq-exporter.relay-server.{id(self)}"
        self._router.monitor(addr, int(Event.DISCONNECTED) | _HANDSHAKE_FAILED)
        self._mon: zmq.Socket[bytes] = self._ctx.socket(zmq.PAIR)
        self._mon.setsockopt(zmq.RCVHWM, 0)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(addr)
        self.bound: list[str] = []  # as bound (tcp://127.0.0.1:* resolved), once started
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="zmq-exporter-relay", daemon=True)

    def start(self) -> None:
        """Bind and start reading. Raises ZMQError/OSError if an endpoint cannot be bound
        (the daemon then exits with one line); `stop()` cleans up either way."""
        for endpoint in self.listen:
            self._router.bind(endpoint)
            self.bound.append(self._router.getsockopt_string(zmq.LAST_ENDPOINT))
            if endpoint.startswith("ipc://") and self._ipc_mode is not None:
                os.chmod(endpoint.removeprefix("ipc://"), self._ipc_mode)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self._closed:
            self._closed = True
            self._mon.close(0)
            self._router.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP handler's question (its thread): may this CURVE client key (Z85) send?"""
        allowed = self._allowed
        return allowed is None or key in allowed

    def set_allowed_clients(self, keys: frozenset[bytes] | None) -> None:
        """A new allow-list (a reload): new connections are checked against it; those
        already admitted stay."""
        self._allowed = keys

    # -- reader thread --------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
                if self._mon in ready:
                    self._read_monitor()
                if self._router in ready:
                    self._read_messages()
                self._expire(time.monotonic())
            except Exception:
                # Never crash the daemon: log, and go on with the next message (after a
                # pause, so that an error on every pass cannot spin).
                log.exception("relay: unexpected error; counted as invalid, going on")
                with self._lock:
                    self.stats.rejected["invalid"] += 1
                self._stop.wait(0.1)

    def _read_monitor(self) -> None:
        for _ in range(1000):
            try:
                head, _endpoint = self._mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, value = MONITOR_HEAD.unpack_from(head)
            if event == Event.HANDSHAKE_FAILED_AUTH:  # ZAP said no: a key not allowed
                with self._lock:
                    self.stats.rejected["unauthorized"] += 1
            elif event & _HANDSHAKE_FAILED:
                with self._lock:
                    self.stats.rejected["handshake"] += 1
            elif event == Event.DISCONNECTED:
                # The connection on this fd ended: the processes it holds are down (and
                # may be taken over). Should this DISCONNECTED be that of an older
                # connection on a reused fd, the newer one's next message makes it live
                # again (a heartbeat at most later).
                conn = self._conn_by_fd.pop(value, None)
                if conn is None:
                    continue
                self._conns.pop(conn, None)
                now = time.monotonic()
                with self._lock:
                    for proc in self._processes.values():
                        if proc.owner.conn == conn and proc.down_since is None:
                            self._down(proc, now)

    def _read_messages(self) -> None:
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            if len(frames) != 2:
                self._reject("malformed")
                continue
            frame = frames[1]
            peer = self._peer(frames[0].bytes, frame, now)
            try:
                msg = decode(frame.bytes, self.limits)
            except RejectedMessage as err:
                self._reject(err.reason)
                continue
            except Exception:  # a decoder bug: the message is dropped, never the daemon
                log.exception("relay: cannot decode a message; counted as invalid")
                self._reject("invalid")
                continue
            reason = self.apply(msg, peer, now)
            if reason is not None:
                self._reject(reason)

    def _peer(self, conn: bytes, frame: zmq.Frame, now: float) -> Peer:
        """The sender connection `conn` (a routing id), registered at its first message."""
        known = self._conns.get(conn)
        if known is not None:
            known.last_seen = now
            return known.peer
        fd = int(frame.get(zmq.SRCFD))
        key = None
        if self._curve is not None:
            with contextlib.suppress(zmq.ZMQError):
                key = str(frame.get("User-Id")) or None  # the ZAP handler's user id: the key
        pid, uid = _peer_cred(fd)
        peer = Peer(conn, pid, uid, key)
        if len(self._conns) >= 16_384:  # bounded: forget the longest silent
            oldest = min(self._conns, key=lambda c: self._conns[c].last_seen)
            self._conn_by_fd.pop(self._conns.pop(oldest).fd, None)
        self._conns[conn] = _Conn(peer, fd, now)
        self._conn_by_fd[fd] = conn
        return peer

    def _reject(self, reason: str) -> None:
        with self._lock:
            self.stats.rejected[reason] += 1

    def apply(self, msg: Message, peer: Peer, now: float) -> str | None:
        """Applies one decoded message from `peer`; the reason it was refused, or None."""
        with self._lock:
            proc = self._processes.get(msg.process)
            if proc is not None and not may_claim(proc, peer):
                return "identity"
            if proc is None or proc.instance != msg.instance:
                if proc is None and len(self._processes) >= self.limits.max_processes:
                    return "max_processes"
                # A new process, or a restarted one (new instance): it starts afresh.
                if proc is not None:
                    self._series -= proc.total_series
                proc = self._processes[msg.process] = _Process(
                    msg.instance, msg.heartbeat, now, peer
                )
            refused, series = "", 0
            if msg.type == "state":
                assert msg.socket is not None
                refused, series = self._check_state(proc, msg.seq, msg.socket, msg.messages)
                if refused not in ("", "old"):
                    return refused
            self.stats.received += 1
            proc.last_seen = now
            proc.owner = peer
            if msg.type in ("hello", "heartbeat"):  # others carry no interval
                proc.heartbeat = msg.heartbeat
            if proc.down_since is not None:
                proc.down_since = None
                proc.rendered.clear()
            if msg.type == "bye":
                self._down(proc, now)
            elif msg.type == "gone":
                proc.sockets.pop(msg.name, None)
                proc.messages.pop(msg.name, None)
                proc.rendered.pop(msg.name, None)
                self._count_series(proc, msg.name, 0)
            elif msg.type == "state" and not refused:
                sock = msg.socket
                assert sock is not None
                proc.sockets[sock.name] = (msg.seq, sock)
                if msg.messages is not None:
                    proc.messages[sock.name] = msg.messages
                else:
                    proc.messages.pop(sock.name, None)
                proc.rendered.pop(sock.name, None)
                self._count_series(proc, sock.name, series)
            return None

    def _check_state(
        self,
        proc: _Process,
        seq: int,
        sock: SocketSnapshot,
        messages: tuple[float, ...] | None = None,
    ) -> tuple[str, int]:
        """With the lock: why a state is not taken ("old": overtaken by a newer one, taken
        as received but not shown), or "" to take it; and the series it renders. A state
        is taken whole or not at all."""
        held = proc.sockets.get(sock.name)
        if held is None and len(proc.sockets) >= self.limits.max_sockets_per_process:
            return "max_sockets", 0
        if held is not None:
            if held[0] >= seq:
                return "old", 0  # only the latest state counts
            if goes_backwards(held[1], sock):
                return "backwards", 0
            held_messages = proc.messages.get(sock.name)
            if (
                held_messages is not None
                and messages is not None
                and any(new < old for old, new in zip(held_messages, messages, strict=True))
            ):
                return "backwards", 0
        series = series_of(sock) + (len(metrics.MESSAGE_FAMILIES) if messages else 0)
        grow = series - proc.series.get(sock.name, 0)
        if grow > 0 and (
            proc.total_series + grow > self.limits.max_series_per_process
            or self._series + grow > self.limits.max_series
        ):
            return "max_series", 0
        return "", series

    def _count_series(self, proc: _Process, name: str, series: int) -> None:
        old = proc.series.pop(name, 0)
        if series:
            proc.series[name] = series
        proc.total_series += series - old
        self._series += series - old

    def _down(self, proc: _Process, now: float) -> None:
        """With the lock: a dead process holds no connections; its gauges show 0."""
        proc.down_since = now
        proc.rendered.clear()

    def _expire(self, now: float) -> None:
        with self._lock:
            for name, proc in list(self._processes.items()):
                if proc.down_since is None and now - proc.last_seen > 3 * proc.heartbeat:
                    self._down(proc, now)  # silent past its heartbeat
                if proc.down_since is not None and now - proc.down_since >= self.expire:
                    del self._processes[name]
                    self._series -= proc.total_series

    # -- any thread -----------------------------------------------------------------------

    def snapshot_sockets(self) -> tuple[SocketSnapshot, ...]:
        """Every relayed socket as the renderers take it (`process` among its labels).
        The same object while a socket is unchanged, so renderers' caches hold."""
        out: list[SocketSnapshot] = []
        with self._lock:
            for proc in self._processes.values():
                for name, (_, sock) in proc.sockets.items():
                    shown = proc.rendered.get(name)
                    if shown is None:
                        shown = proc.rendered[name] = (
                            _zeroed(sock) if proc.down_since is not None else sock
                        )
                    out.append(shown)
        return tuple(out)

    def set_max_series(self, max_series: int) -> None:
        """A new budget for relayed series (a reload changed the config's own estimate).
        Series already held stay; states that would grow beyond it are refused."""
        with self._lock:
            self.limits = replace(self.limits, max_series=max_series)

    def processes(self) -> dict[str, bool]:
        """Process id -> connected."""
        with self._lock:
            return {k: p.down_since is None for k, p in self._processes.items()}

    def collector(self) -> Collector:
        """The relay's self-metrics (`metrics.RELAY_FAMILIES`), for /metrics."""
        return _RelayCollector(self)

    def message_collector(self) -> Collector:
        """The relayed sockets' message counts (`metrics.MESSAGE_FAMILIES`), for /metrics
        and the OTLP push."""
        return _RelayMessages(self)


def _peer_cred(fd: int) -> tuple[int | None, int | None]:
    """(pid, uid) of the peer of a unix socket fd (SO_PEERCRED), (None, None) for tcp or
    when it cannot be read. The fd is libzmq's: it is duplicated, never closed."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None, None
    try:
        with _socket.socket(fileno=dup) as sock:
            if sock.family != _socket.AF_UNIX:
                return None, None
            raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CRED.size)
    except OSError:
        return None, None
    pid, uid, _gid = _CRED.unpack(raw)
    return pid, uid


_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

_HANDSHAKE_FAILED = (
    int(Event.HANDSHAKE_FAILED_NO_DETAIL)
    | int(Event.HANDSHAKE_FAILED_PROTOCOL)
    | int(Event.HANDSHAKE_FAILED_AUTH)
)


def _zeroed(sock: SocketSnapshot) -> SocketSnapshot:
    eps = tuple(replace(ep, connections=0, listening=False, ready=False) for ep in sock.endpoints)
    return replace(sock, endpoints=eps)


class _RelayCollector(Collector):
    def __init__(self, server: RelayServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        now = time.monotonic()
        with server._lock:
            procs = list(server._processes.values())
            received = server.stats.received
            rejected = dict(server.stats.rejected)
            series, series_limit = server._series, server.limits.max_series
        connected = sum(1 for p in procs if p.down_since is None)
        age = max((now - p.last_seen for p in procs if p.down_since is None), default=0.0)

        def one(family: metrics.Family, value: float) -> Metric:
            out = Metric(family.metric_name, family.help, family.type, family.unit or "")
            out.add_sample(family.name, {}, value)
            return out

        yield one(metrics.RELAY_PROCESSES, connected)
        yield one(metrics.RELAY_SOCKETS, sum(len(p.sockets) for p in procs))
        yield one(metrics.RELAY_MESSAGES_RECEIVED, received)
        family = metrics.RELAY_MESSAGES_REJECTED
        out = Metric(family.metric_name, family.help, family.type)
        for reason, n in rejected.items():
            out.add_sample(family.name, {"reason": reason}, n)
        yield out
        yield one(metrics.RELAY_SERIES, series)
        yield one(metrics.RELAY_SERIES_LIMIT, series_limit)
        yield one(metrics.RELAY_STATE_AGE, age)


class _RelayMessages(Collector):
    """The relayed sockets' message counts, labelled as their other series; nothing while
    no sender counts messages."""

    def __init__(self, server: RelayServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        with server._lock:
            counted = [
                (name, proc.sockets[name][1].labels, values)
                for proc in server._processes.values()
                for name, values in proc.messages.items()
                if name in proc.sockets
            ]
        if counted:
            yield from message_families(counted)
