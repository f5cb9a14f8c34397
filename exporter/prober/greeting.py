"""Step 3: the peer's ZMTP greeting, read over the raw connection (libzmq does not expose
it). RFC 23/ZMTP 3.x: signature (%xFF, 8 octets of padding, %x7F), version major and
minor, a 20-octet mechanism name padded with NULs, the as-server flag, 31 octets of filler:
64 octets in all.

A libzmq peer sends its signature at once and the rest of its greeting once it has read
our signature and major version; it checks our mechanism only when it has our whole
greeting, and a peer that finds a mismatch closes at once, its own greeting unsent. So we
send those 11 octets and nothing more until we have the peer's greeting: we learn it
without telling ours. A peer with another mechanism, and a CURVE peer (whose handshake
libzmq does on a second connection), sees a connection that closed during the greeting;
for NULL and PLAIN, `wire` then sends the rest of ours and completes the handshake.

A peer that speaks another protocol either answers with something that does not start
with %xFF (`not_zmtp`) or waits for more: an HTTP server waits for the end of a request
line. If nothing at all has come when half of the remaining time is gone, we shut down our
sending side; an HTTP server then answers `400 Bad Request` (`not_zmtp`), a frozen peer
stays silent (`greeting_timeout`), a slow ZMTP peer still sends its greeting.
"""

from __future__ import annotations

import contextlib
import socket
import time

from exporter.config.modules import ProbeModule
from exporter.prober.base import Deadline, Greeting, ProbeFailed, ProbeLog, ProbeResult

GREETING_SIZE = 64
SIGNATURE_SIZE = 10
ZMTP2_GREETING_SIZE = 12  # ZMTP/2.0 (libzmq 3.x): signature, revision, socket type


def our_greeting(mechanism: str) -> bytes:
    # Padding 0...01 as libzmq sends it (an unversioned ZMTP/1.0 peer reads it as a length).
    signature = b"\xff" + bytes(7) + b"\x01" + b"\x7f"
    return signature + b"\x03\x01" + mechanism.encode().ljust(20, b"\0") + b"\x00" + bytes(31)


def parse_greeting(data: bytes) -> Greeting:
    """The greeting in `data` (64 octets, or 12 of a ZMTP/2.0 peer); ProbeFailed if the
    octets are not ZMTP."""
    if not data or data[0] != 0xFF or (len(data) >= SIGNATURE_SIZE and data[9] != 0x7F):
        raise ProbeFailed("not_zmtp", f"not a ZMTP signature: {data[:16]!r}")
    if len(data) < SIGNATURE_SIZE + 1:
        raise ProbeFailed("protocol", f"incomplete greeting: {data!r}")
    major = data[10]
    if major < 3:  # ZMTP/2.0 (revision 1) and older: no mechanism, NULL security
        return Greeting(
            version="2.0" if major == 1 else f"{major}.0", mechanism="NULL", as_server=False
        )
    if len(data) < GREETING_SIZE:
        raise ProbeFailed("protocol", f"incomplete greeting ({len(data)} of 64 octets)")
    name = data[12:32].rstrip(b"\0")
    if not name or not all(0x20 < c < 0x7F for c in name):
        raise ProbeFailed("protocol", f"malformed mechanism name {data[12:32]!r}")
    return Greeting(
        version=f"{major}.{data[11]}",
        mechanism=name.decode("ascii"),
        as_server=bool(data[32] & 0x01),
    )


def _wanted(data: bytes) -> int:
    """How many octets make the greeting whose first octets are `data`."""
    if len(data) > SIGNATURE_SIZE and data[10] < 3:
        return ZMTP2_GREETING_SIZE
    return GREETING_SIZE


def read_greeting(
    sock: socket.socket, module: ProbeModule, deadline: Deadline, log: ProbeLog, result: ProbeResult
) -> Greeting:
    sock.setblocking(True)
    try:
        sock.settimeout(max(deadline.remaining(), 0.001))
        sock.sendall(our_greeting(module.mechanism)[: SIGNATURE_SIZE + 1])
    except OSError as err:  # the peer closed or reset before we could say anything
        raise ProbeFailed("not_zmtp", f"cannot send our greeting: {err}") from None
    log.debug("Sent our signature and version; waiting for the peer's greeting")
    data = b""
    half_closed = False
    nudge_at = time.monotonic() + deadline.remaining() / 2
    while len(data) < _wanted(data):
        if data and (data[0] != 0xFF or (len(data) >= SIGNATURE_SIZE and data[9] != 0x7F)):
            break  # decided: not ZMTP
        now = time.monotonic()
        if deadline.expired():
            if data:
                raise ProbeFailed("greeting_timeout", f"greeting incomplete: {len(data)} octets")
            raise ProbeFailed("greeting_timeout", "connected, but the peer sent nothing")
        wait = deadline.remaining() if half_closed or data else max(nudge_at - now, 0.0)
        sock.settimeout(max(wait, 0.001))
        try:
            chunk = sock.recv(GREETING_SIZE - len(data))
        except TimeoutError:
            if not data and not half_closed and time.monotonic() >= nudge_at:
                log.debug("Nothing received; shutting down our side to provoke an answer")
                half_closed = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            continue
        except OSError as err:  # ECONNRESET: closed with unread data
            raise ProbeFailed(
                "not_zmtp" if not data else "protocol",
                f"connection reset after {len(data)} octets: {err}",
            ) from None
        if not chunk:
            if not data:
                raise ProbeFailed("not_zmtp", "the peer closed the connection without a greeting")
            break
        data += chunk
    greeting = parse_greeting(data)
    result.greeting = greeting
    log.debug(
        "Received the peer's greeting",
        version=greeting.version,
        mechanism=greeting.mechanism,
        as_server=str(greeting.as_server).lower(),
    )
    if greeting.mechanism != module.mechanism:
        raise ProbeFailed(
            "mechanism_mismatch",
            f"the peer uses {greeting.mechanism}, the module expects {module.mechanism}",
        )
    return greeting
