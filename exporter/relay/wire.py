"""The relay's wire format (docs/relay.md, version 1): one JSON object per ZeroMQ message,
from a sender's DEALER to the daemon's ROUTER. Each state message carries a socket's whole
cumulative state, so the latest one is all that matters: a message lost to a restart of
either side is repaired by the next one, and totals stay exact.

Public names: `WIRE_VERSION`, `encode_socket(sock)`, `encode(...)`, `decode(data, limits)`
-> `Message`, `RejectedMessage` (its `reason` is the `reason` label of the rejected
counter), `RelayLimits` (the daemon's bounds, the message size among them).
"""

from __future__ import annotations

import errno
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exporter.core import metrics
from exporter.core.events import ZAP_STATUS, ZMTP_ERRORS, Event
from exporter.core.state import EndpointSnapshot, SocketSnapshot

WIRE_VERSION = 1
# The optional `messages` object of a state's socket (docs/relay.md, "Message counts"):
# library mode's message counts, an extension with a version of its own. A daemon ignores
# an extension version it does not know (the state itself is taken), and a daemon before
# the extension ignores the key, so senders and daemons of either age work together.
MESSAGES_VERSION = 1
# Its keys, in the order of `metrics.MESSAGE_FAMILIES` (`exporter.messages.MessageCounts`).
MESSAGE_KEYS = ("sent", "received", "bytes_sent", "bytes_received", "would_block")
MESSAGE_SECONDS_KEY = "blocked_seconds"
HEARTBEAT_SECONDS = 1.0  # a sender's heartbeat interval unless it says another


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
MAX_SECONDS = float(MAX_COUNT)
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
    # state: the socket's message counts (the `messages` extension, `MESSAGE_KEYS` then
    # blocked seconds), None when the sender sent none (or a version this daemon ignores).
    messages: tuple[float, ...] | None = None
    name: str = ""  # gone: the socket's name


# ---------------------------------------------------------------------------------------
# Encoding (sender) and decoding (daemon).


def encode_socket(
    sock: SocketSnapshot, messages: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """A socket's cumulative state as the `socket` object of a state message; with
    `messages` (its message counts, `MessageCounts.values()`), the `messages` extension."""
    out = {
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
    if messages is not None:
        *counts, blocked = messages
        out["messages"] = {
            "v": MESSAGES_VERSION,
            **{k: int(n) for k, n in zip(MESSAGE_KEYS, counts, strict=True)},
            MESSAGE_SECONDS_KEY: float(blocked),
        }
    return out


def decode_messages(obj: Any) -> tuple[float, ...] | None:
    """The `messages` extension of a state's socket object, checked; None if absent or of
    an extension version this daemon does not know."""
    raw = obj.get("messages") if isinstance(obj, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RejectedMessage("invalid", "messages: expected an object")
    if raw.get("v") != MESSAGES_VERSION or type(raw.get("v")) is not int:
        return None  # a newer extension: the state is taken without it
    counts = tuple(_count(raw.get(k), f"messages.{k}") for k in MESSAGE_KEYS)
    seconds: Any = raw.get(MESSAGE_SECONDS_KEY)
    if (
        type(seconds) not in (int, float)
        or not math.isfinite(seconds)
        or not 0 <= seconds <= MAX_SECONDS
    ):
        raise RejectedMessage("invalid", "messages.blocked_seconds: expected seconds >= 0")
    return (*counts, float(seconds))


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
        raw = obj.get("socket")
        sock = _decode_socket(raw, process)
        return Message(
            kind, process, instance, seq, heartbeat, socket=sock, messages=decode_messages(raw)
        )
    if kind == "gone":
        return Message(kind, process, instance, seq, heartbeat, name=_text(obj, "socket"))
    return Message(kind, process, instance, seq, heartbeat)
