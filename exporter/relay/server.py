"""Relay (issue 16): application processes send their sockets' cumulative state to one
sidecar daemon, which serves it with the daemon's families plus a `process` label.

The wire format is docs/relay.md (version 1): one JSON object per ZeroMQ message, from a
DEALER (the sender) to the daemon's ROUTER. Each state message carries a socket's whole
cumulative state, so the latest one is all that matters: a message lost to a restart of
either side is repaired by the next one, and totals stay exact.

Public names:
- `WIRE_VERSION`, `encode_socket(sock)`, `decode(data, limits)` -> `Message`,
  `RejectedMessage` (its `reason` is the `reason` label of the rejected counter).
- `RelaySender`: library mode's side (a thread with its own context and DEALER).
- `RelayServer`: the daemon's side (a thread with its own context, ROUTER and monitor);
  `snapshot_sockets()` for the renderers, `collector()` for the self-metrics.
- `RelayLimits`: the daemon's bounds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import socket as _socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from zmq.auth.thread import ThreadAuthenticator

from exporter._version import __version__
from exporter.core import metrics
from exporter.core.events import MONITOR_HEAD, ZAP_STATUS, ZMTP_ERRORS, Event
from exporter.core.state import EndpointSnapshot, SocketSnapshot
from exporter.render.rows import socket_rows

log = logging.getLogger("zmq_exporter.relay")

WIRE_VERSION = 1
# Sender defaults (docs/relay.md).
COALESCE_SECONDS = 0.25  # at most one state message per socket per 250 ms
HEARTBEAT_SECONDS = 1.0
REFRESH_SECONDS = 10.0  # every socket's state again, whatever happened
SENDER_HWM = 16  # messages queued towards the daemon; beyond, send() fails and we retry
ENV_RELAY = "ZMQ_EXPORTER_RELAY"

# Why a message is dropped (the `reason` label): malformed (not a JSON object in UTF-8),
# version ("v" is not 1), too_large (over max_message_bytes), invalid (a field missing, of
# the wrong type or out of bounds), max_processes, max_sockets (limits), handshake (a
# connection failed its handshake: CURVE with a wrong or no key).
REJECT_REASONS = metrics.RELAY_MESSAGES_REJECTED.values
MESSAGE_TYPES = ("hello", "state", "gone", "heartbeat", "bye")

_EVENT_BY_NAME = {e.name: e for e in Event}
_ERRNO_NAMES = frozenset({*errno.errorcode.values(), "other"})
# The closed set of `error` values of each handshake failure reason (exporter.core.events).
_HANDSHAKE_ERRORS = {
    "no_detail": _ERRNO_NAMES,
    "protocol": frozenset({*ZMTP_ERRORS.values(), "other"}),
    "auth": frozenset({*ZAP_STATUS.values(), "other"}),
}
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,63}")
MAX_TEXT = 256  # process, instance, socket names, label values, endpoints
MAX_LABELS = 16
MAX_ENDPOINTS = 64  # per socket
MAX_COUNTER_KEYS = 64  # entries of one counts/errno/handshake/unknown map
MAX_COUNT = 2**53  # JSON numbers are exact integers up to here in every language
# Unix time of 9999-12-31T23:59:59Z: beyond it time.gmtime/strftime (the status page) fail.
MAX_TIME = 253_402_300_799.0
# Text the renderers cannot write or a reader would misread: lone surrogates (not Unicode
# scalar values: UTF-8 encoding fails, every /metrics and status page render with it) and
# C0/C1 control characters (newlines, NUL, escapes in a log or a terminal).
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class RejectedMessage(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class RelayLimits:
    max_processes: int = 1000
    max_sockets_per_process: int = 1000
    max_message_bytes: int = 256 * 1024
    # Relayed series in all (the daemon: limits.max_series less its config's estimate) and
    # per process (its share: one sender cannot take the others' room).
    max_series: int = 200_000
    max_series_per_process: int = 20_000


@dataclass(frozen=True)
class Message:
    type: str
    process: str
    instance: str
    seq: int
    heartbeat: float = HEARTBEAT_SECONDS
    socket: SocketSnapshot | None = None  # state
    name: str = ""  # gone: the socket's name


# ---------------------------------------------------------------------------------------
# Encoding (sender) and decoding (daemon).


def encode_socket(sock: SocketSnapshot) -> dict[str, Any]:
    """A socket's cumulative state as the `socket` object of a state message."""
    return {
        "name": sock.name,
        "type": sock.socket_type,
        "labels": dict(sock.labels),
        "unknown_events": {str(k): v for k, v in sock.unknown_events.items()},
        "endpoints": [
            {
                "endpoint": ep.endpoint,
                "role": ep.role,
                "counts": {e.name: n for e, n in ep.counts.items()},
                "errno_counts": _errno_map(ep.errno_counts),
                "handshake_failures": [
                    {"reason": r, "error": e, "count": n}
                    for (r, e), n in ep.handshake_failures.items()
                ],
                "connections": ep.connections,
                "listening": ep.listening,
                "ready": ep.ready,
                "reconnect_interval_ms": ep.reconnect_interval_ms,
                "last_event": ep.last_event.name if ep.last_event is not None else None,
                "last_event_time": ep.last_event_time,
            }
            for ep in sock.endpoints
        ],
    }


def _errno_map(counts: Mapping[tuple[Event, str], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (event, name), n in counts.items():
        out.setdefault(event.name, {})[name] = n
    return out


def encode(kind: str, process: str, instance: str, seq: int, **body: Any) -> bytes:
    return json.dumps(
        {"v": WIRE_VERSION, "type": kind, "process": process, "instance": instance, "seq": seq}
        | body,
        separators=(",", ":"),
    ).encode()


def _text(obj: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not value and not empty):
        raise RejectedMessage("invalid", f"{key}: expected a string of 1..{MAX_TEXT} chars")
    return _clean(value, key)


def _clean(value: str, what: str) -> str:
    if _BAD_TEXT.search(value):
        raise RejectedMessage("invalid", f"{what}: a surrogate or control character")
    return value


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise RejectedMessage("invalid", f"{what}: expected an integer 0..2^53")
    return value


def _mapping(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict) or len(value) > MAX_COUNTER_KEYS:
        raise RejectedMessage("invalid", f"{key}: expected an object of <= {MAX_COUNTER_KEYS}")
    return value


def _event(name: Any, what: str) -> Event:
    event = _EVENT_BY_NAME.get(name) if isinstance(name, str) else None
    if event is None:
        raise RejectedMessage("invalid", f"{what}: unknown event {str(name)[:40]!r}")
    return event


def _decode_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise RejectedMessage("invalid", f"labels: expected an object of <= {MAX_LABELS}")
    out = {}
    for key, val in value.items():
        if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise RejectedMessage("invalid", "labels: invalid label name")
        if not isinstance(val, str) or len(val) > MAX_TEXT:
            raise RejectedMessage("invalid", "labels: values are strings")
        _clean(val, "labels")
        # A sender never overrides the daemon's own labels: such labels are dropped.
        if key not in metrics.RESERVED_LABELS and key != "process":
            out[key] = val
    return out


def _decode_endpoint(obj: Any) -> EndpointSnapshot:
    if not isinstance(obj, dict):
        raise RejectedMessage("invalid", "endpoints: expected objects")
    role = obj.get("role")
    if role not in ("bind", "connect", None):
        raise RejectedMessage("invalid", "role: expected bind, connect or null")
    counts = {_event(k, "counts"): _count(v, "counts") for k, v in _mapping(obj, "counts").items()}
    errno_counts: dict[tuple[Event, str], int] = {}
    for ev, names in _mapping(obj, "errno_counts").items():
        event = _event(ev, "errno_counts")
        if not isinstance(names, dict) or len(names) > MAX_COUNTER_KEYS:
            raise RejectedMessage("invalid", "errno_counts: expected objects")
        for name, n in names.items():
            if name not in _ERRNO_NAMES:
                raise RejectedMessage("invalid", "errno_counts: unknown errno name")
            errno_counts[(event, name)] = _count(n, "errno_counts")
    failures: dict[tuple[str, str], int] = {}
    raw = obj.get("handshake_failures", [])
    if not isinstance(raw, list) or len(raw) > MAX_COUNTER_KEYS:
        raise RejectedMessage("invalid", "handshake_failures: expected a list")
    for item in raw:
        if not isinstance(item, dict):
            raise RejectedMessage("invalid", "handshake_failures: expected objects")
        reason, error = item.get("reason"), item.get("error")
        if not isinstance(reason, str) or not isinstance(error, str):
            raise RejectedMessage("invalid", "handshake_failures: reason and error are strings")
        if error not in _HANDSHAKE_ERRORS.get(reason, ()):
            raise RejectedMessage("invalid", "handshake_failures: unknown reason or error")
        failures[(reason, error)] = _count(item.get("count"), "handshake_failures")
    last = obj.get("last_event")
    last_time = obj.get("last_event_time", 0.0)
    if (
        type(last_time) not in (int, float)
        or not math.isfinite(last_time)
        or not 0 <= last_time <= MAX_TIME
    ):
        raise RejectedMessage("invalid", "last_event_time: expected a Unix time to year 9999")
    flags = {k: obj.get(k, False) for k in ("listening", "ready")}
    if any(type(v) is not bool for v in flags.values()):
        raise RejectedMessage("invalid", "listening/ready: expected booleans")
    return EndpointSnapshot(
        endpoint=_text(obj, "endpoint"),
        role=role,
        counts=counts,
        errno_counts=errno_counts,
        handshake_failures=failures,
        connections=_count(obj.get("connections", 0), "connections"),
        listening=flags["listening"],
        reconnect_interval_ms=_count(obj.get("reconnect_interval_ms", 0), "reconnect"),
        last_event=None if last is None else _event(last, "last_event"),
        last_event_time=float(last_time),
        ready=flags["ready"],
    )


def _decode_socket(obj: Any, process: str) -> SocketSnapshot:
    if not isinstance(obj, dict):
        raise RejectedMessage("invalid", "socket: expected an object")
    endpoints = obj.get("endpoints", [])
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise RejectedMessage("invalid", f"endpoints: expected a list of <= {MAX_ENDPOINTS}")
    eps = tuple(_decode_endpoint(ep) for ep in endpoints)
    if len({ep.endpoint for ep in eps}) != len(eps):
        raise RejectedMessage("invalid", "endpoints: duplicate endpoint")
    unknown: dict[int, int] = {}
    for key, n in _mapping(obj, "unknown_events").items():
        if not (key.isascii() and key.isdigit() and len(key) <= 5) or int(key) > 0xFFFF:
            raise RejectedMessage("invalid", "unknown_events: keys are event ids")
        unknown[int(key)] = _count(n, "unknown_events")
    labels = _decode_labels(obj.get("labels", {}))
    labels["process"] = process
    socket_type = _text(obj, "type")
    if not socket_type.isalpha() or len(socket_type) > 16:
        raise RejectedMessage("invalid", "type: expected a socket type name")
    return SocketSnapshot(
        name=_text(obj, "name"),
        socket_type=socket_type.upper(),
        labels=labels,
        endpoints=eps,
        unknown_events=unknown,
        events=0,
    )


def decode(data: bytes, limits: RelayLimits) -> Message:
    """One wire message, checked; RejectedMessage (with its reason) otherwise. Bounded:
    the size is checked before parsing, and every collection has a cap."""
    if len(data) > limits.max_message_bytes:
        raise RejectedMessage("too_large")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RejectedMessage("malformed") from None
    if not isinstance(obj, dict):
        raise RejectedMessage("malformed", "not an object")
    if obj.get("v") != WIRE_VERSION or type(obj.get("v")) is not int:
        raise RejectedMessage("version")
    kind = obj.get("type")
    if kind not in MESSAGE_TYPES:
        raise RejectedMessage("invalid", "type: unknown message type")
    process = _text(obj, "process")
    instance = _text(obj, "instance")
    seq = _count(obj.get("seq"), "seq")
    heartbeat = HEARTBEAT_SECONDS
    if kind in ("hello", "heartbeat") and "heartbeat_ms" in obj:
        ms = _count(obj["heartbeat_ms"], "heartbeat_ms")
        heartbeat = min(max(ms, 100), 60_000) / 1000
    if kind == "state":
        sock = _decode_socket(obj.get("socket"), process)
        return Message(kind, process, instance, seq, heartbeat, socket=sock)
    if kind == "gone":
        return Message(kind, process, instance, seq, heartbeat, name=_text(obj, "socket"))
    return Message(kind, process, instance, seq, heartbeat)


# ---------------------------------------------------------------------------------------
# Sender (library mode).


def default_relay_id() -> str:
    return f"{_socket.gethostname()}/{os.getpid()}"


class RelaySender:
    """Sends the changed sockets of `source()` to the daemon at `endpoint`, from a thread
    with its own context: never on the application's thread, never blocking it.

    A DEALER with IMMEDIATE (messages go only to a live connection) and a small SNDHWM,
    sending with NOBLOCK: a message that cannot go now is not queued anywhere; its socket
    stays "changed" and its latest state is sent on a later tick. Memory is bounded by the
    number of sockets, whatever the number of events. Each new connection (the DEALER's
    own monitor: HANDSHAKE_SUCCEEDED) makes it send hello and every socket again, so a
    restarted daemon gets exact totals at once; a full resend every REFRESH_SECONDS covers
    anything else."""

    def __init__(
        self,
        endpoint: str,
        source: Callable[[], tuple[SocketSnapshot, ...]],
        relay_id: str | None = None,
        *,
        coalesce: float = COALESCE_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        refresh: float = REFRESH_SECONDS,
        curve_server_key: bytes | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.relay_id = relay_id or default_relay_id()
        self.instance = secrets.token_hex(8)
        self._source = source
        self._coalesce = coalesce
        self._heartbeat = heartbeat
        self._refresh = refresh
        self._curve_server_key = curve_server_key
        self._seq = 0
        self._sent: dict[str, SocketSnapshot] = {}  # what the daemon has, as far as we know
        self._gone: set[str] = set()  # sockets removed, "gone" not sent yet
        self._hello = True
        self._stop = threading.Event()
        self.sent = 0  # messages handed to libzmq
        self.deferred = 0  # messages that could not go now (will be resent)
        self._thread = threading.Thread(target=self._run, name="zmq-exporter-relay", daemon=True)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(1)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Sends bye (best effort) and ends the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _send(self, dealer: zmq.Socket[bytes], kind: str, **body: Any) -> bool:
        self._seq += 1
        data = encode(kind, self.relay_id, self.instance, self._seq, **body)
        try:
            dealer.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.deferred += 1
            return False
        self.sent += 1
        return True

    def _run(self) -> None:
        ctx = self._ctx
        dealer: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, SENDER_HWM)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._curve_server_key is not None:
            public, secret = zmq.curve_keypair()
            dealer.curve_serverkey = self._curve_server_key
            dealer.curve_publickey = public
            dealer.curve_secretkey = secret
        addr = f"inproc://zmq-exporter.relay-monitor.{id(self)}"
        dealer.monitor(addr, int(Event.HANDSHAKE_SUCCEEDED))
        mon: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.RCVHWM, 0)
        mon.connect(addr)
        dealer.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(mon, zmq.POLLIN)
        next_tick = next_beat = time.monotonic()
        next_refresh = next_beat + self._refresh
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(next_tick, next_beat) - time.monotonic())
                if poller.poll(int(timeout * 1000)):
                    while True:
                        try:
                            mon.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                    # A new connection (a restarted daemon): everything again.
                    self._hello = True
                    self._sent.clear()
                now = time.monotonic()
                if now >= next_refresh:
                    self._sent.clear()
                    next_refresh = now + self._refresh
                if now >= next_tick:
                    self._tick(dealer)
                    next_tick = now + self._coalesce
                if now >= next_beat:
                    self._send(dealer, "heartbeat", heartbeat_ms=int(self._heartbeat * 1000))
                    next_beat = now + self._heartbeat
            self._send(dealer, "bye")
        except Exception:
            log.exception("relay sender failed; the application is unaffected")
        finally:
            dealer.setsockopt(zmq.LINGER, 100)  # give bye a moment
            with contextlib.suppress(zmq.ZMQError):
                dealer.disable_monitor()
            mon.close(0)
            dealer.close()
            ctx.term()

    def _tick(self, dealer: zmq.Socket[bytes]) -> None:
        if self._hello:
            if not self._send(dealer, "hello", heartbeat_ms=int(self._heartbeat * 1000),
                              sender=f"zmq-exporter/{__version__}"):  # fmt: skip
                return
            self._hello = False
        current = {s.name: s for s in self._source()}
        self._gone |= set(self._sent) - set(current)
        for name in list(self._gone):
            if name in current:
                self._gone.discard(name)
            elif self._send(dealer, "gone", socket=name):
                self._gone.discard(name)
                self._sent.pop(name, None)
        for name, sock in current.items():
            if self._sent.get(name) is not sock:
                if not self._send(dealer, "state", socket=encode_socket(sock)):
                    return  # the queue is full or no daemon: the rest on a later tick
                self._sent[name] = sock


# ---------------------------------------------------------------------------------------
# Daemon side.


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
                refused, series = self._check_state(proc, msg.seq, msg.socket)
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
                proc.rendered.pop(msg.name, None)
                self._count_series(proc, msg.name, 0)
            elif msg.type == "state" and not refused:
                sock = msg.socket
                assert sock is not None
                proc.sockets[sock.name] = (msg.seq, sock)
                proc.rendered.pop(sock.name, None)
                self._count_series(proc, sock.name, series)
            return None

    def _check_state(self, proc: _Process, seq: int, sock: SocketSnapshot) -> tuple[str, int]:
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
        series = series_of(sock)
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
        return _RelayCollector(self)


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
        yield one(metrics.RELAY_STATE_AGE, age)
