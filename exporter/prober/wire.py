"""Step 4 for NULL and PLAIN: the ZMTP 3.x handshake spoken by the prober itself, on the
raw connection that carried the peer's greeting, so a probe opens one connection, not two.

What is sent and checked is what libzmq 4.3.5 sends and checks (src/mechanism.cpp,
null_mechanism.cpp, plain_client.cpp, zmtp_engine.cpp, v2_decoder.cpp), so that a peer
sees a real client and its monitor reports HANDSHAKE_SUCCEEDED:

- frames (RFC 23): a flags octet (0x04 command, | 0x02 when the size needs 8 octets), the
  size (1 octet, or 8 big-endian), the body. Like libzmq's decoder, the command bit and
  the MORE bit of what the peer sends are not checked: the body decides.
- a command body: its name's length (1 octet), the name, the data.
- properties (metadata): name length (1 octet), name, value length (4 octets,
  big-endian), value. Ours: `Socket-Type`, and `Identity` (empty) for REQ, DEALER and
  ROUTER. The peer's are parsed as `mechanism_t::parse_metadata` does: a truncated
  property is an error, and a `Socket-Type` our type may not talk to
  (`mechanism_t::check_socket_type`) is refused.
- NULL (RFC 23): both sides send READY at once; a server with ZAP that refuses us sends
  ERROR with the ZAP status ("400") instead.
- PLAIN (RFC 24): HELLO (username, password: one length octet each) -> WELCOME (no data)
  -> INITIATE (our properties) -> READY (the server's); ERROR instead of WELCOME or READY
  when ZAP refuses.

Outcomes: the peer's READY with a compatible type is success; ERROR carrying a ZAP status
(3xx-5xx, as `mechanism_base_t::handle_error_reason` reads it) is `auth`, any other ERROR,
an unexpected or malformed command, a command larger than MAX_COMMAND_SIZE, or an
incompatible type is `protocol`; the peer closing before its READY is `protocol` (NULL,
or PLAIN after our INITIATE: it refused our type) or `auth` (PLAIN before WELCOME: a
PLAIN server closes when it has no ZAP handler); nothing by the deadline is
`handshake_timeout`.
"""

from __future__ import annotations

import socket
import struct
import time

from exporter.config.modules import ProbeModule
from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult
from exporter.prober.greeting import SIGNATURE_SIZE, our_greeting

# A command a peer sends during the handshake is small (a READY with a few properties is
# under 100 octets); a size field can claim up to 2^64. Anything larger is refused unread.
MAX_COMMAND_SIZE = 64 * 1024

COMMAND_FLAG = 0x04
LARGE_FLAG = 0x02
SHORT_MAX = 255
LONG_HEADER = 9  # flags and an 8-octet size

# mechanism_t::check_socket_type: the peer types each of ours may talk to.
COMPATIBLE: dict[str, frozenset[str]] = {
    "REQ": frozenset({"REP", "ROUTER"}),
    "REP": frozenset({"REQ", "DEALER"}),
    "DEALER": frozenset({"REP", "DEALER", "ROUTER"}),
    "ROUTER": frozenset({"REQ", "DEALER", "ROUTER"}),
    "PUSH": frozenset({"PULL"}),
    "PULL": frozenset({"PUSH"}),
    "PUB": frozenset({"SUB", "XSUB"}),
    "SUB": frozenset({"PUB", "XPUB"}),
    "XPUB": frozenset({"SUB", "XSUB"}),
    "XSUB": frozenset({"PUB", "XPUB"}),
    "PAIR": frozenset({"PAIR"}),
}
# mechanism_t::add_basic_properties: these types also send their routing id.
SENDS_IDENTITY = frozenset({"REQ", "DEALER", "ROUTER"})
OWN_MECHANISMS = frozenset({"NULL", "PLAIN"})  # CURVE needs crypto: libzmq does it


def command(name: bytes, data: bytes = b"") -> bytes:
    """One command frame, as libzmq's v2/v3.1 encoders write it."""
    body = bytes([len(name)]) + name + data
    if len(body) <= SHORT_MAX:
        return bytes([COMMAND_FLAG, len(body)]) + body
    return bytes([COMMAND_FLAG | LARGE_FLAG]) + struct.pack(">Q", len(body)) + body


def encode_property(name: str, value: bytes) -> bytes:
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw + struct.pack(">I", len(value)) + value


def basic_properties(socket_type: str) -> bytes:
    out = encode_property("Socket-Type", socket_type.encode("ascii"))
    if socket_type in SENDS_IDENTITY:
        out += encode_property("Identity", b"")  # the prober sets no routing id
    return out


def parse_properties(data: bytes) -> dict[str, bytes]:
    """The properties in `data`, as `mechanism_t::parse_metadata` reads them; ProbeFailed
    ("protocol") where libzmq would fail (EPROTO)."""
    props: dict[str, bytes] = {}
    at = 0
    while len(data) - at > 1:
        name_len = data[at]
        at += 1
        if len(data) - at < name_len + 4:
            break
        name = data[at : at + name_len].decode("latin-1")
        at += name_len
        (value_len,) = struct.unpack_from(">I", data, at)
        at += 4
        if len(data) - at < value_len:
            break
        props[name] = data[at : at + value_len]
        at += value_len
    if at != len(data):
        raise ProbeFailed("protocol", f"malformed properties in the peer's command at octet {at}")
    return props


def check_socket_type(ours: str, props: dict[str, bytes]) -> str:
    """The peer's Socket-Type; ProbeFailed("protocol") if ours may not talk to it. A peer
    that sends none passes, as in libzmq (it checks the property only when present)."""
    theirs = props.get("Socket-Type")
    if theirs is None:
        return "(none)"
    shown = theirs.decode("latin-1")
    if shown not in COMPATIBLE.get(ours, frozenset()):
        raise ProbeFailed(
            "protocol", f"the peer is a {shown}: a {ours} may not talk to it (libzmq refuses)"
        )
    return shown


class CommandReader:
    """Reads whole command frames from the connection: every read bounded in size (by
    MAX_COMMAND_SIZE) and in time (by the deadline)."""

    def __init__(self, sock: socket.socket, deadline: Deadline, closed_reason: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()
        # What the peer closing the connection before the expected command means.
        self.closed_reason = closed_reason

    def _read_size(self, wanted: int) -> int:
        # What the frame still needs, at least a small page (a READY and what may follow
        # come in one read), never beyond the largest frame: recv allocates what it is
        # asked for, so a 64 KiB read per command would cost more than the command.
        room = MAX_COMMAND_SIZE + LONG_HEADER - len(self.buffer)
        return min(max(wanted - len(self.buffer), 4096), room)

    def _fill(self, wanted: int, waiting_for: str) -> None:
        while len(self.buffer) < wanted:
            remaining = self.deadline.remaining()
            if remaining <= 0:
                raise ProbeFailed("handshake_timeout", f"no {waiting_for} before the deadline")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(self._read_size(wanted))
            except TimeoutError:
                continue
            except OSError as err:  # ECONNRESET: the peer closed with our data unread
                raise ProbeFailed(
                    self.closed_reason, f"the peer reset the connection before its {waiting_for}"
                ) from err
            if not chunk:
                raise ProbeFailed(
                    self.closed_reason, f"the peer closed the connection before its {waiting_for}"
                )
            self.buffer += chunk

    def next_command(self, waiting_for: str) -> bytes:
        """The body of the peer's next frame."""
        self._fill(2, waiting_for)
        flags = self.buffer[0]
        if flags & LARGE_FLAG:
            self._fill(LONG_HEADER, waiting_for)
            (size,) = struct.unpack_from(">Q", self.buffer, 1)
            header = LONG_HEADER
        else:
            size, header = self.buffer[1], 2
        if size > MAX_COMMAND_SIZE:
            raise ProbeFailed(
                "protocol", f"the peer sent a frame of {size} octets (at most {MAX_COMMAND_SIZE})"
            )
        self._fill(header + size, waiting_for)
        body = bytes(self.buffer[header : header + size])
        del self.buffer[: header + size]
        return body


def split_command(body: bytes) -> tuple[bytes, bytes]:
    """(name, data) of a command body; ProbeFailed("protocol") unless a name-length octet
    and a name fit (mechanism_base_t::check_basic_command_structure)."""
    if not body or body[0] >= len(body):
        raise ProbeFailed("protocol", f"malformed command {body[:16]!r}")
    return body[1 : 1 + body[0]], body[1 + body[0] :]


def _error_reason(data: bytes) -> ProbeFailed:
    """What an ERROR command means: a ZAP status is `auth`, anything else `protocol`."""
    if not data or data[0] > len(data) - 1:
        return ProbeFailed("protocol", f"malformed ERROR command {data[:16]!r}")
    reason = data[1 : 1 + data[0]]
    zap_status = len(reason) == 3 and reason[1:] == b"00" and b"3"[0] <= reason[0] <= b"5"[0]
    text = reason.decode("latin-1")
    if zap_status:
        return ProbeFailed("auth", f"the peer refused us: ERROR {text} (ZAP status)")
    return ProbeFailed("protocol", f"the peer sent ERROR {text!r}")


# libzmq's PLAIN server spells its ERROR command "\x5eRROR": in plain_common.hpp the C
# escape "\x05E" of "\x05ERROR" reads as one hex escape (0x5E), so the name is "^RROR"
# with no length octet (4.3.5 and master). Its PLAIN client expects exactly that; a PLAIN
# probe takes it, and the RFC's spelling, as ERROR.
LIBZMQ_PLAIN_ERROR = b"^RROR"


def _expect(reader: CommandReader, wanted: bytes, log: ProbeLog, plain: bool = False) -> bytes:
    """The data of the peer's next command, which must be `wanted` (or ERROR)."""
    shown = wanted.decode()
    body = reader.next_command(shown)
    if plain and body.startswith(LIBZMQ_PLAIN_ERROR):
        name, data = b"ERROR", body[len(LIBZMQ_PLAIN_ERROR) :]
    else:
        name, data = split_command(body)
    log.debug("Received a command", command=name.decode("latin-1"), octets=len(data))
    if name == b"ERROR":
        raise _error_reason(data)
    if name != wanted:
        raise ProbeFailed("protocol", f"expected {shown}, the peer sent {name.decode('latin-1')!r}")
    return data


def handshake_over(
    sock: socket.socket,
    module: ProbeModule,
    connected_at: float,
    deadline: Deadline,
    log: ProbeLog,
    result: ProbeResult,
) -> None:
    """The rest of our greeting, then the module's mechanism, on `sock` (after
    read_greeting). Its duration runs from `connected_at` (the connection established) to
    the peer's READY, or to the failure."""
    assert module.mechanism in OWN_MECHANISMS, module.mechanism
    rest = our_greeting(module.mechanism)[SIGNATURE_SIZE + 1 :]
    props = basic_properties(module.socket_type)
    try:
        if module.mechanism == "NULL":
            _null(sock, rest, props, module, deadline, log)
        else:
            _plain(sock, rest, props, module, deadline, log)
    finally:
        result.handshake_seconds = time.monotonic() - connected_at
    log.debug("Handshake succeeded", seconds=f"{result.handshake_seconds:.6f}")


def _send(sock: socket.socket, data: bytes, deadline: Deadline, what: str, closed: str) -> None:
    sock.settimeout(max(deadline.remaining(), 0.001))
    try:
        sock.sendall(data)
    except TimeoutError:
        failure = ProbeFailed("handshake_timeout", f"could not send {what} before the deadline")
        raise failure from None
    except OSError as err:
        failure = ProbeFailed(closed, f"the peer closed the connection before our {what}: {err}")
        raise failure from None


def _null(
    sock: socket.socket,
    rest: bytes,
    props: bytes,
    module: ProbeModule,
    deadline: Deadline,
    log: ProbeLog,
) -> None:
    # Both sides send READY without waiting: ours goes with the rest of our greeting.
    _send(sock, rest + command(b"READY", props), deadline, "greeting and READY", "protocol")
    log.debug("Sent the rest of our greeting and READY", socket_type=module.socket_type)
    # A peer that refuses our READY (an incompatible type) closes: `protocol`.
    reader = CommandReader(sock, deadline, "protocol")
    data = _expect(reader, b"READY", log)
    peer_type = check_socket_type(module.socket_type, parse_properties(data))
    log.debug("Received the peer's READY", socket_type=peer_type)


def _plain(
    sock: socket.socket,
    rest: bytes,
    props: bytes,
    module: ProbeModule,
    deadline: Deadline,
    log: ProbeLog,
) -> None:
    assert module.plain_username is not None and module.plain_password is not None
    user, password = module.plain_username, module.plain_password
    hello = command(b"HELLO", bytes([len(user)]) + user + bytes([len(password)]) + password)
    # A PLAIN server without a ZAP handler closes on our HELLO: it accepts nobody.
    _send(sock, rest + hello, deadline, "greeting and HELLO", "auth")
    log.debug("Sent the rest of our greeting and HELLO")
    reader = CommandReader(sock, deadline, "auth")
    if _expect(reader, b"WELCOME", log, plain=True):
        raise ProbeFailed("protocol", "malformed WELCOME (it carries no data)")
    # From here a close is the server refusing our INITIATE (our type): `protocol`.
    reader.closed_reason = "protocol"
    _send(sock, command(b"INITIATE", props), deadline, "INITIATE", "protocol")
    log.debug("Sent INITIATE", socket_type=module.socket_type)
    data = _expect(reader, b"READY", log, plain=True)
    peer_type = check_socket_type(module.socket_type, parse_properties(data))
    log.debug("Received the peer's READY", socket_type=peer_type)
