"""The libzmq monitor events we know, and bounded decodings of their values.

Everything here is pure data: ids and names come from libzmq's zmq.h (4.3.x, monitor v1).
Decoders turn an event's 32-bit value into a label value from a closed set, so a
misbehaving peer can never mint new series.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from enum import IntEnum


class Event(IntEnum):
    """Monitor v1 event ids (the 16-bit id in frame 0)."""

    CONNECTED = 0x0001
    CONNECT_DELAYED = 0x0002
    CONNECT_RETRIED = 0x0004
    LISTENING = 0x0008
    BIND_FAILED = 0x0010
    ACCEPTED = 0x0020
    ACCEPT_FAILED = 0x0040
    CLOSED = 0x0080
    CLOSE_FAILED = 0x0100
    DISCONNECTED = 0x0200
    MONITOR_STOPPED = 0x0400
    HANDSHAKE_FAILED_NO_DETAIL = 0x0800
    HANDSHAKE_SUCCEEDED = 0x1000
    HANDSHAKE_FAILED_PROTOCOL = 0x2000
    HANDSHAKE_FAILED_AUTH = 0x4000


ALL_EVENTS_MASK = 0xFFFF  # ZMQ_EVENT_ALL for monitor v1

# Event names users write in `events:`; lower-case libzmq names without the prefix.
EVENT_BY_NAME: dict[str, Event] = {e.name.lower(): e for e in Event}


def events_mask(events: Iterable[str | Event]) -> int:
    """The monitor's event mask for `events` (names of EVENT_BY_NAME or Events; "all":
    every event). MONITOR_STOPPED is always in it: it resets the connection gauges and
    tells the reader that the monitor ended. KeyError names an unknown event."""
    mask = int(Event.MONITOR_STOPPED)
    for item in events:
        if isinstance(item, Event):
            mask |= int(item)
        elif item == "all":
            return ALL_EVENTS_MASK
        else:
            mask |= int(EVENT_BY_NAME[item])
    return mask


# The event whose value is an errno that we expose as an `errno` label.
ERRNO_EVENTS = frozenset({Event.BIND_FAILED, Event.ACCEPT_FAILED, Event.CLOSE_FAILED})

HANDSHAKE_FAILURES: dict[Event, str] = {
    Event.HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
    Event.HANDSHAKE_FAILED_PROTOCOL: "protocol",
    Event.HANDSHAKE_FAILED_AUTH: "auth",
}
HANDSHAKE_REASONS = ("no_detail", "protocol", "auth")

# ZMQ_PROTOCOL_ERROR_* from zmq.h (libzmq 4.3). Lower-case, prefix dropped.
ZMTP_ERRORS: dict[int, str] = {
    0x10000000: "zmtp_unspecified",
    0x10000001: "zmtp_unexpected_command",
    0x10000002: "zmtp_invalid_sequence",
    0x10000003: "zmtp_key_exchange",
    0x10000011: "zmtp_malformed_command_unspecified",
    0x10000012: "zmtp_malformed_command_message",
    0x10000013: "zmtp_malformed_command_hello",
    0x10000014: "zmtp_malformed_command_initiate",
    0x10000015: "zmtp_malformed_command_error",
    0x10000016: "zmtp_malformed_command_ready",
    0x10000017: "zmtp_malformed_command_welcome",
    0x10000018: "zmtp_invalid_metadata",
    0x11000001: "zmtp_cryptographic",
    0x11000002: "zmtp_mechanism_mismatch",
    0x20000000: "zap_unspecified",
    0x20000001: "zap_malformed_reply",
    0x20000002: "zap_bad_request_id",
    0x20000003: "zap_bad_version",
    0x20000004: "zap_invalid_status_code",
    0x20000005: "zap_invalid_metadata",
    0x30000000: "ws_unspecified",
}

# ZAP status codes defined by RFC 27 (ZAP); anything else is "other".
ZAP_STATUS = {200: "200", 300: "300", 400: "400", 500: "500"}

# A monitor message's first frame: event id (16 bits) and value (32 bits), which libzmq
# copies from host integers (socket_base.cpp, monitor_event): native byte order, standard
# sizes, no padding.
MONITOR_HEAD = struct.Struct("=HI")


def errno_name(value: int) -> str:
    """`EADDRINUSE` for 98; errno values outside the platform table become `other`."""
    return errno.errorcode.get(value, "other")


def handshake_error(event: Event, value: int) -> str:
    """The bounded `error` label of a HANDSHAKE_FAILED_* event."""
    if event is Event.HANDSHAKE_FAILED_NO_DETAIL:
        return errno_name(value)
    if event is Event.HANDSHAKE_FAILED_PROTOCOL:
        return ZMTP_ERRORS.get(value, "other")
    return ZAP_STATUS.get(value, "other")
