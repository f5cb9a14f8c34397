"""Who is connected: read one live connection's kernel state from the fd that
libzmq reported in a CONNECTED/ACCEPTED monitor event, without disturbing it.

The fd belongs to libzmq's I/O thread, which may close it at any moment; the number can then
be reused by any other file this process opens (an HTTP client, another connection). So:

- Everything is read from a dup, never from the number itself. A dup refers to the open file
  description, not the number: once `os.dup(fd)` succeeded, every later read of this call is
  about that one socket, even if libzmq closes `fd` and the number is reused meanwhile. The
  check "is this still the connection the event named?" and the reads it guards are therefore
  about the same object; there is no window between them.
- The dup is verified before anything is reported: a stream socket of the transport's family
  (tcp: AF_INET/AF_INET6, ipc: AF_UNIX), connected (getpeername succeeds, so not a listener),
  with addresses that fit the endpoint (bind side: our local port/path; connect side: the
  peer's port/path), and, once the caller pinned it, the same socket inode as at the first
  read (`os.fstat(dup).st_ino`, unique among live sockets). Anything else is `Gone`.
- The original fd is never closed, shut down or modified here: closing a dup only drops a
  reference, and no option is set (Python's socket() on a fileno only probes SO_DOMAIN,
  SO_TYPE and SO_PROTOCOL; it would set O_NONBLOCK only under socket.setdefaulttimeout(), and
  libzmq's fds are non-blocking already).

Work per call is bounded: a fixed sequence of about a dozen syscalls, no loop, no allocation
that grows with the connection. This module imports no zmq; the reducer, engine, web and
metrics layers build on it (docs/connections.md).
"""

from __future__ import annotations

import _socket
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import termios
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

from exporter.core.endpoints import Role

Transport = Literal["tcp", "ipc"]
K = TypeVar("K")

# <linux/sockios.h>: SIOCINQ is FIONREAD, SIOCOUTQ is TIOCOUTQ.
SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
_INT = struct.Struct("=i")
_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_ZERO_INT = bytes(_INT.size)

# struct tcp_info as in <linux/tcp.h> (Linux 6.x: 232 bytes). The kernel copies
# min(its size, the length asked for), so an older kernel answers shorter: every field is
# parsed only if the answer covers it, else it is None.
TCP_INFO_LEN = 232
_TCP_STATES = {
    1: "established",
    2: "syn_sent",
    3: "syn_recv",
    4: "fin_wait1",
    5: "fin_wait2",
    6: "time_wait",
    7: "close",
    8: "close_wait",
    9: "last_ack",
    10: "listen",
    11: "closing",
}
# tcpi_ca_state: enum tcp_ca_state in <linux/tcp.h>.
CA_OPEN, CA_DISORDER, CA_CWR, CA_RECOVERY, CA_LOSS = range(5)
_CA_STATES = {0: "open", 1: "disorder", 2: "cwr", 3: "recovery", 4: "loss"}

# (name, byte offset, struct format) of the fields read; offsets checked against
# offsetof() on linux/tcp.h.
_TCP_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("state", 0, "B"),
    ("ca_state", 1, "B"),
    ("retransmits", 2, "B"),
    ("probes", 3, "B"),
    ("backoff", 4, "B"),
    ("rto_us", 8, "I"),
    ("unacked", 24, "I"),
    ("sacked", 28, "I"),
    ("lost", 32, "I"),
    ("retrans", 36, "I"),
    ("rtt_us", 68, "I"),
    ("rttvar_us", 72, "I"),
    ("snd_cwnd", 80, "I"),
    ("total_retrans", 100, "I"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("notsent_bytes", 144, "I"),
    ("min_rtt_us", 148, "I"),
    ("bytes_sent", 200, "Q"),
    ("bytes_retrans", 208, "Q"),
)
_TCP_STRUCTS = tuple((name, off, struct.Struct("=" + fmt)) for name, off, fmt in _TCP_FIELDS)


class TcpInfo(NamedTuple):
    """The fields of struct tcp_info this exporter uses; None where the kernel's answer was
    too short to hold the field. Times in microseconds, as the kernel gives them.

    A NamedTuple, like ConnectionInfo: immutable (rows are shared between snapshots) and
    built at tuple speed; a frozen dataclass's __init__ cost 7 us of a 15 us read."""

    state: int | None = None
    ca_state: int | None = None
    retransmits: int | None = None  # consecutive RTO retransmissions of the oldest segment
    probes: int | None = None
    backoff: int | None = None
    rto_us: int | None = None
    unacked: int | None = None
    sacked: int | None = None
    lost: int | None = None  # segments the kernel currently thinks lost (not a total)
    retrans: int | None = None  # segments currently retransmitted and unacked
    rtt_us: int | None = None  # smoothed RTT
    rttvar_us: int | None = None
    snd_cwnd: int | None = None
    total_retrans: int | None = None  # retransmitted segments over the connection's life
    bytes_acked: int | None = None
    bytes_received: int | None = None
    notsent_bytes: int | None = None
    min_rtt_us: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None

    @property
    def state_name(self) -> str | None:
        return None if self.state is None else _TCP_STATES.get(self.state, str(self.state))

    @property
    def ca_state_name(self) -> str | None:
        if self.ca_state is None:
            return None
        return _CA_STATES.get(self.ca_state, str(self.ca_state))

    @property
    def retransmitting(self) -> bool:
        """Retransmitting now: an RTO retransmission is outstanding (tcpi_retransmits > 0),
        or the congestion state is Recovery (fast retransmit after SACK/dupACKs) or Loss
        (after an RTO). Disorder (reordering seen, nothing resent) and CWR (window cut by
        ECN, nothing resent) do not count: no segment is being sent again in those."""
        return bool(self.retransmits) or (self.ca_state or 0) >= CA_RECOVERY


def _whole_struct() -> struct.Struct:
    # All fields in one unpack, with pad bytes between them: one call instead of twenty.
    fmt, pos = "=", 0
    for _name, off, s in _TCP_STRUCTS:
        fmt += "x" * (off - pos) + s.format[1:]
        pos = off + s.size
    return struct.Struct(fmt)


_TCP_WHOLE = _whole_struct()


def parse_tcp_info(buf: bytes) -> TcpInfo:
    """struct tcp_info from getsockopt(TCP_INFO): the fields the answer covers."""
    n = len(buf)
    if n >= _TCP_WHOLE.size:
        return TcpInfo(*_TCP_WHOLE.unpack_from(buf))
    values = {
        name: s.unpack_from(buf, off)[0] for name, off, s in _TCP_STRUCTS if off + s.size <= n
    }
    return TcpInfo(**values)


@dataclass(frozen=True, slots=True)
class Expected:
    """What the monitor event named: the transport and, from the endpoint, the address the
    connection must have on our side (bind) or the peer's side (connect). `inode` pins the
    socket seen at the first read: later reads must find the same one."""

    transport: Transport
    local_host: str | None = None  # an IP literal, or None for any (wildcard, hostname)
    local_port: int | None = None
    peer_host: str | None = None
    peer_port: int | None = None
    local_path: str | None = None  # ipc
    peer_path: str | None = None
    inode: int | None = None
    local_address: str | None = None  # with inode: the pinned socket's addresses
    peer_address: str | None = None

    @classmethod
    def for_endpoint(cls, endpoint: str, role: Role, inode: int | None = None) -> Expected:
        """From a ZeroMQ endpoint as bound/connected (`tcp://host:port`, `tcp://src;host:port`,
        `tcp://[::1]:port`, `ipc://path`, `ipc://@abstract`). A host that is not an IP
        literal (a name, an interface, `*`) is not checked: resolving it here would be I/O at
        scrape time; the port and the inode pin still are. Unknown transports raise
        ValueError: only tcp and ipc connections have an fd worth reading."""
        scheme, sep, rest = endpoint.partition("://")
        if not sep:
            raise ValueError(f"not an endpoint: {endpoint!r}")
        if scheme == "ipc":
            if role == "bind":
                return cls("ipc", local_path=rest, inode=inode)
            return cls("ipc", peer_path=rest, inode=inode)
        if scheme != "tcp":
            raise ValueError(f"no connection table for {scheme}:// endpoints")
        target = rest.rpartition(";")[2]  # connect with a source address: "src;host:port"
        host, _, port_s = target.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_s)
        except ValueError:
            port = None  # "*": an ephemeral bind; the caller should pass the resolved one
        ip = _ip_literal(host)
        if ip is not None and ip.is_unspecified:
            ip = None
        literal = None if ip is None else str(ip)
        if role == "bind":
            return cls("tcp", local_host=literal, local_port=port, inode=inode)
        return cls("tcp", peer_host=literal, peer_port=port, inode=inode)

    def pinned(self, info: ConnectionInfo) -> Expected:
        """This expectation, pinned to the socket `info` was read from: a later read must
        find that very socket (inode), and takes its addresses from here instead of asking
        the kernel again (a connected socket's addresses never change)."""
        return dataclasses.replace(
            self, inode=info.inode, local_address=info.local_address, peer_address=info.peer_address
        )


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


GoneReason = Literal[
    "closed",  # EBADF: the fd number is not open
    "not_socket",  # ENOTSOCK: reused by a file that is not a socket
    "wrong_kind",  # a socket, but not a stream socket of the transport's family
    "not_connected",  # no peer (a listener, or a connection already torn down)
    "address_mismatch",  # a connection, but not one of this endpoint
    "reused",  # the socket is not the one pinned at the first read
    "error",  # any other OSError
]


@dataclass(frozen=True, slots=True)
class Gone:
    """The fd no longer is the connection the event named; nothing was reported from it."""

    fd: int
    reason: GoneReason
    errno: int | None = None


class ConnectionInfo(NamedTuple):
    """One live connection as the kernel sees it now. `to_json()` gives the fields of
    GET /api/v1/connections that come from the kernel (docs/connections.md)."""

    fd: int
    transport: Transport
    family: Literal["ipv4", "ipv6", "unix"]
    inode: int  # identity of the socket: pin it (Expected.pinned) for later reads
    local_address: str
    peer_address: str
    # Bytes the kernel holds: tcp - SIOCOUTQ is sent but unacknowledged plus not yet sent,
    # SIOCINQ received but not read by libzmq; ipc - SIOCOUTQ is the kernel memory charged
    # to our sends not yet read by the peer (skb truesize, so more than the payload),
    # SIOCINQ the payload bytes waiting for us.
    send_queue_bytes: int | None
    recv_queue_bytes: int | None
    tcp: TcpInfo | None = None
    peer_pid: int | None = None  # ipc: SO_PEERCRED, as of the peer's connect()/listen()
    peer_uid: int | None = None
    peer_gid: int | None = None

    @property
    def rtt_seconds(self) -> float | None:
        t = self.tcp
        return None if t is None or t.rtt_us is None else t.rtt_us / 1e6

    @property
    def rtt_var_seconds(self) -> float | None:
        t = self.tcp
        return None if t is None or t.rttvar_us is None else t.rttvar_us / 1e6

    @property
    def retransmitting(self) -> bool:
        return self.tcp is not None and self.tcp.retransmitting

    def to_json(self) -> dict[str, object]:
        row: dict[str, object] = {
            "fd": self.fd,
            "transport": self.transport,
            "family": self.family,
            "local_address": self.local_address,
            "peer_address": self.peer_address,
            "send_queue_bytes": self.send_queue_bytes,
            "recv_queue_bytes": self.recv_queue_bytes,
        }
        t = self.tcp
        if t is not None:
            row.update(
                tcp_state=t.state_name,
                congestion_state=t.ca_state_name,
                rtt_seconds=self.rtt_seconds,
                rtt_var_seconds=self.rtt_var_seconds,
                retransmits=t.total_retrans,
                retransmitting=t.retransmitting,
                lost=t.lost,
            )
        else:
            row.update(peer_pid=self.peer_pid, peer_uid=self.peer_uid, peer_gid=self.peer_gid)
        return row


def format_address(family: int, addr: object) -> str:
    """`1.2.3.4:5`, `[::1]:5`, a path, `@name` for an abstract unix name, `""` unnamed."""
    if family == socket.AF_UNIX:
        if isinstance(addr, bytes):  # Python gives abstract names as bytes with a NUL first
            if addr.startswith(b"\0"):
                return "@" + addr[1:].decode("utf-8", "backslashreplace")
            return addr.decode("utf-8", "backslashreplace")
        return str(addr)
    if isinstance(addr, tuple):
        if family == socket.AF_INET6:
            return f"[{addr[0]}]:{addr[1]}"
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def _reason(e: OSError) -> GoneReason:
    if e.errno == errno.EBADF:
        return "closed"
    if e.errno == errno.ENOTSOCK:
        return "not_socket"
    if e.errno in (errno.ENOTCONN, errno.EINVAL):
        return "not_connected"
    return "error"


def _queue(fd: int, request: int) -> int | None:
    try:
        return int(_INT.unpack(fcntl.ioctl(fd, request, _ZERO_INT))[0])
    except OSError:
        return None  # e.g. EINVAL on a socket state that has no queue: unknown, not 0


def read_connection(fd: int, expected: Expected) -> ConnectionInfo | Gone:
    """Read the connection behind `fd` (from a CONNECTED/ACCEPTED event) if it still is one
    of `expected`'s; `Gone` otherwise. Never raises OSError, never closes or alters `fd`."""
    try:
        dup = os.dup(fd)
    except OSError as e:
        return Gone(fd, _reason(e), e.errno)
    try:
        # Probes SO_DOMAIN/SO_TYPE/SO_PROTOCOL; ENOTSOCK for a pipe, file, eventfd... The C
        # type that socket.socket wraps: 1.8 us against 6.6 us for the wrapper (measured),
        # whose only extras here are enum conversions and a Python-level close().
        sock = _socket.socket(fileno=dup)
    except OSError as e:
        os.close(dup)  # the constructor failed before owning the dup
        return Gone(fd, _reason(e), e.errno)
    try:
        return _read(fd, sock, expected)
    except OSError as e:
        return Gone(fd, _reason(e), e.errno)
    finally:
        sock.close()  # the dup only


def _read(fd: int, sock: _socket.socket, expected: Expected) -> ConnectionInfo | Gone:
    fam = sock.family
    if sock.type != socket.SOCK_STREAM:
        return Gone(fd, "wrong_kind")
    if expected.transport == "tcp":
        if fam not in (socket.AF_INET, socket.AF_INET6):
            return Gone(fd, "wrong_kind")
    elif fam != socket.AF_UNIX:
        return Gone(fd, "wrong_kind")
    dup = sock.fileno()
    # The constructor proved a socket, and all sockets live in one filesystem (sockfs), so
    # the inode alone names the socket while it is open.
    inode = os.fstat(dup).st_ino
    if expected.inode is not None:
        if inode != expected.inode:
            return Gone(fd, "reused")
        if expected.local_address is not None and expected.peer_address is not None:
            return _read_pinned(fd, sock, fam, expected, inode)
    local = sock.getsockname()
    peer = sock.getpeername()  # ENOTCONN for a listener or a torn-down connection
    if fam == socket.AF_UNIX:
        return _read_unix(fd, sock, expected, inode, format_address(fam, local),
                          format_address(fam, peer))  # fmt: skip
    if not (_host_port_fits(local, expected.local_host, expected.local_port)
            and _host_port_fits(peer, expected.peer_host, expected.peer_port)):  # fmt: skip
        return Gone(fd, "address_mismatch")
    return _read_tcp(fd, sock, fam, inode, format_address(fam, local), format_address(fam, peer))


# TCP states in which a socket has no live peer: a listener, a connect in progress, or a
# connection that is fully closed.
_NO_PEER = frozenset({2, 7, 10})  # syn_sent, close, listen


def _read_pinned(
    fd: int, sock: _socket.socket, fam: int, expected: Expected, inode: int
) -> ConnectionInfo | Gone:
    # The same socket as at the first read: no address syscalls (about 2.5 us saved).
    local, peer = expected.local_address or "", expected.peer_address or ""
    if fam == socket.AF_UNIX:
        return _read_unix(fd, sock, expected, inode, local, peer)
    return _read_tcp(fd, sock, fam, inode, local, peer)


def _read_tcp(
    fd: int, sock: _socket.socket, fam: int, inode: int, local: str, peer: str
) -> ConnectionInfo | Gone:
    tcp = parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))
    if tcp.state in _NO_PEER:
        return Gone(fd, "not_connected")
    dup = sock.fileno()
    return ConnectionInfo(
        fd=fd,
        transport="tcp",
        family="ipv6" if fam == socket.AF_INET6 else "ipv4",
        inode=inode,
        local_address=local,
        peer_address=peer,
        send_queue_bytes=_queue(dup, SIOCOUTQ),
        recv_queue_bytes=_queue(dup, SIOCINQ),
        tcp=tcp,
    )


def _host_port_fits(addr: object, host: str | None, port: int | None) -> bool:
    if not isinstance(addr, tuple):
        return False
    if port is not None and addr[1] != port:
        return False
    if host is None:
        return True
    # Both sides are canonical text (inet_ntop, and str() of ipaddress in for_endpoint), so
    # a string comparison is exact; ipaddress parsing here cost ~8 us per read. An IPv4
    # endpoint reached over an AF_INET6 socket shows as ::ffff:a.b.c.d.
    got = addr[0]
    return bool(got == host or (got.startswith("::ffff:") and got[7:] == host))


def _read_unix(
    fd: int, sock: _socket.socket, expected: Expected, inode: int, local: str, peer: str
) -> ConnectionInfo | Gone:
    if expected.local_path is not None and local != expected.local_path:
        return Gone(fd, "address_mismatch")
    if expected.peer_path is not None and peer != expected.peer_path:
        return Gone(fd, "address_mismatch")
    dup = sock.fileno()
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    # Credentials unknown on error: the queues are still worth reporting.
    with contextlib.suppress(OSError):
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    return ConnectionInfo(
        fd=fd,
        transport="ipc",
        family="unix",
        inode=inode,
        local_address=local,
        peer_address=peer,
        send_queue_bytes=_queue(dup, SIOCOUTQ),
        recv_queue_bytes=_queue(dup, SIOCINQ),
        peer_pid=pid if pid else None,  # 0: the peer's credentials are not known
        peer_uid=uid,
        peer_gid=gid,
    )


@dataclass(frozen=True, slots=True)
class EndpointConnections:
    """Per-endpoint aggregate of the live connections, computed per connection sample
    (exporter/connections/sampler.py; the families are `metrics.CONNECTION_FAMILIES`).

    RTT figures cover tcp connections only and are None when there are none (the metric
    then has no sample for the endpoint: 0 would read as a perfect network)."""

    connections: int
    rtt_max_seconds: float | None
    rtt_avg_seconds: float | None
    retransmitting: int
    send_queue_bytes: int
    recv_queue_bytes: int
    send_queue_max_bytes: int


EMPTY = EndpointConnections(0, None, None, 0, 0, 0, 0)


def summarize(conns: Iterable[ConnectionInfo]) -> EndpointConnections:
    """One pass over an endpoint's connections. A queue the kernel did not answer for
    (None) adds nothing; a Gone is not passed in (the caller drops it)."""
    n = rtt_n = retrans = sendq = recvq = sendq_max = 0
    rtt_sum = 0.0
    rtt_max: float | None = None
    for c in conns:
        n += 1
        t = c.tcp
        if t is not None:
            if t.rtt_us is not None:
                rtt = t.rtt_us / 1e6
                rtt_n += 1
                rtt_sum += rtt
                if rtt_max is None or rtt > rtt_max:
                    rtt_max = rtt
            if t.retransmitting:
                retrans += 1
        sq = c.send_queue_bytes or 0
        sendq += sq
        if sq > sendq_max:
            sendq_max = sq
        recvq += c.recv_queue_bytes or 0
    return EndpointConnections(
        connections=n,
        rtt_max_seconds=rtt_max,
        rtt_avg_seconds=rtt_sum / rtt_n if rtt_n else None,
        retransmitting=retrans,
        send_queue_bytes=sendq,
        recv_queue_bytes=recvq,
        send_queue_max_bytes=sendq_max,
    )


def summarize_by(rows: Iterable[tuple[K, ConnectionInfo]]) -> dict[K, EndpointConnections]:
    """summarize() per key (e.g. (socket, endpoint)), in one pass over the rows."""
    groups: dict[K, list[ConnectionInfo]] = {}
    for key, conn in rows:
        groups.setdefault(key, []).append(conn)
    return {key: summarize(conns) for key, conns in groups.items()}
