"""Step 4 for CURVE modules (NULL and PLAIN: `wire`): a real libzmq handshake, timed: a
socket of the module's type connects to the address the DNS step chose, with the module's
security, and its monitor says how the handshake ended. One attempt (no reconnect),
bounded by the deadline, and the socket and its monitor are closed in the safe order
whatever happens.

How monitor events map to reasons (measured against real peers, libzmq 4.3.5):
- HANDSHAKE_SUCCEEDED: success.
- HANDSHAKE_FAILED_AUTH (ZAP status, e.g. 400): `auth`.
- HANDSHAKE_FAILED_PROTOCOL: ZMTP_MECHANISM_MISMATCH -> `mechanism_mismatch`;
  ZMTP_CRYPTOGRAPHIC and ZAP_* -> `auth`; any other ZMTP error -> `protocol`.
- HANDSHAKE_FAILED_NO_DETAIL with EAGAIN: libzmq's handshake timer -> `handshake_timeout`.
- HANDSHAKE_FAILED_NO_DETAIL otherwise, or DISCONNECTED before any handshake event: the
  peer dropped the connection during the handshake. With CURVE or PLAIN that is the server
  refusing our HELLO (a wrong server key: the server cannot decrypt it; a PLAIN server
  without credentials it accepts) -> `auth`; with NULL it is a peer refusing the exchange
  (an incompatible socket type drops the connection without an event) -> `protocol`.
- CLOSED or CONNECT_RETRIED: the connection itself failed -> `connect_refused`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time

import zmq

from exporter.config.modules import ProbeModule
from exporter.monitor.sockets import attach_monitor
from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult

_ctx: zmq.Context[zmq.Socket[bytes]] | None = None
MAX_SOCKETS = 16384
_ctx_lock = threading.Lock()
E = zmq.Event


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """The prober's own context: a probe never shares an I/O thread with the monitored
    sockets, so a stuck probe cannot slow them (and the reverse)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None or _ctx.closed:
            _ctx = zmq.Context(io_threads=1)
            # libzmq's default of 1,023 sockets per context counts closed sockets until its
            # reaper has freed them: many probes at once on a busy machine hit it (EMFILE).
            # The process's file limit is the real bound.
            _ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
        return _ctx


def close_context() -> None:
    global _ctx
    with _ctx_lock:
        if _ctx is not None:
            _ctx.destroy(linger=0)
            _ctx = None


# The events that decide a handshake (one on success, as for a bare connect + handshake):
# CLOSED and CONNECT_RETRIED come only from a failed connect attempt, never from an
# established connection (that one ends with DISCONNECTED).
WATCHED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_CONNECT_RETRIED
)
_PROTOCOL_AUTH = (zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC,)


def _protocol_reason(code: int) -> str:
    if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "mechanism_mismatch"
    if code in _PROTOCOL_AUTH or code & 0xF0000000 == zmq.PROTOCOL_ERROR_ZAP_UNSPECIFIED:
        return "auth"
    return "protocol"


def endpoint(family: int, address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return f"ipc://{address}"
    host, port = address
    return f"tcp://[{host}]:{port}" if family == socket.AF_INET6 else f"tcp://{host}:{port}"


class Handshake:
    """One libzmq connect + handshake. `start` connects at once (libzmq's I/O thread does
    the work), so the probe reads the greeting over its raw connection meanwhile; `wait`
    decides the outcome; `close` tears down in the safe order, whatever happened."""

    def __init__(
        self,
        family: int,
        address: tuple[str, int] | str,
        module: ProbeModule,
        deadline: Deadline,
        log: ProbeLog,
    ) -> None:
        self.module = module
        ctx = context()
        self.sock: zmq.Socket[bytes] = ctx.socket(getattr(zmq, module.socket_type))
        self.monitor: zmq.Socket[bytes] | None = None
        try:
            _options(self.sock, module, family, deadline)
            self.monitor = attach_monitor(ctx, self.sock, WATCHED)
            url = endpoint(family, address)
            log.debug(
                "libzmq handshake started",
                endpoint=url,
                socket_type=module.socket_type,
                mechanism=module.mechanism,
            )
            self.started = time.monotonic()
            self.sock.connect(url)
        except BaseException:
            self.close()
            raise

    def wait(self, deadline: Deadline, log: ProbeLog, result: ProbeResult) -> None:
        """Until the handshake ends; ProbeFailed unless it succeeded. Its duration ends
        when the prober reads HANDSHAKE_SUCCEEDED (the greeting, read meanwhile, normally
        takes less time than the handshake)."""
        assert self.monitor is not None
        try:
            _wait(self.monitor, self.module, deadline, log)
        finally:
            result.handshake_seconds = time.monotonic() - self.started
        log.debug("Handshake succeeded", seconds=f"{result.handshake_seconds:.6f}")

    def close(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)


def handshake(
    family: int,
    address: tuple[str, int] | str,
    module: ProbeModule,
    deadline: Deadline,
    log: ProbeLog,
    result: ProbeResult,
) -> None:
    """The step on its own: start, wait, close."""
    pending = Handshake(family, address, module, deadline, log)
    try:
        pending.wait(deadline, log, result)
    finally:
        pending.close()


def _options(sock: zmq.Socket[bytes], module: ProbeModule, family: int, deadline: Deadline) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one attempt: a probe must not retry for ever
    sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(deadline.remaining() * 1000)))
    if family == socket.AF_INET6:
        sock.setsockopt(zmq.IPV6, 1)
    if module.mechanism == "CURVE":
        assert module.curve_serverkey is not None  # checked by the config loader
        if module.curve_secretkey is not None:
            secret = module.curve_secretkey
            public = zmq.curve_public(secret)
        else:  # no client key configured: a pair of our own (servers without ZAP accept it)
            public, secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, module.curve_serverkey)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    elif module.mechanism == "PLAIN":
        assert module.plain_username is not None and module.plain_password is not None
        sock.setsockopt(zmq.PLAIN_USERNAME, module.plain_username)
        sock.setsockopt(zmq.PLAIN_PASSWORD, module.plain_password)


def _wait(
    monitor: zmq.Socket[bytes], module: ProbeModule, deadline: Deadline, log: ProbeLog
) -> None:
    secured = module.mechanism != "NULL"
    while True:
        remaining = deadline.remaining()
        if remaining <= 0 or not monitor.poll(int(remaining * 1000) + 1):
            raise ProbeFailed("handshake_timeout", "the handshake did not finish in time")
        head = monitor.recv_multipart()[0]
        event, value = struct.unpack_from("=HI", head)  # host byte order (libzmq)
        try:
            name = E(event).name
        except ValueError:  # an id this pyzmq does not know (pyzmq #1180)
            name = str(event)
        log.debug("Monitor event", event=name, value=value)
        if event == E.HANDSHAKE_SUCCEEDED:
            return
        if event == E.HANDSHAKE_FAILED_AUTH:
            raise ProbeFailed("auth", f"the peer refused us (ZAP status {value})")
        elif event == E.HANDSHAKE_FAILED_PROTOCOL:
            raise ProbeFailed(_protocol_reason(value), f"ZMTP protocol error {value:#x}")
        elif event == E.HANDSHAKE_FAILED_NO_DETAIL:
            if value == errno.EAGAIN:
                raise ProbeFailed("handshake_timeout", "libzmq's handshake timer expired")
            code = errno.errorcode.get(value, str(value))
            raise ProbeFailed(
                "auth" if secured else "protocol",
                f"the peer dropped the connection during the {module.mechanism} handshake ({code})",
            )
        elif event == E.DISCONNECTED:
            raise ProbeFailed(
                "auth" if secured else "protocol",
                f"the peer dropped the connection during the {module.mechanism} handshake "
                "(for NULL: often an incompatible socket type)",
            )
        elif event in (E.CLOSED, E.CONNECT_RETRIED):  # only a connect attempt closes
            raise ProbeFailed("connect_refused", "the handshake connection failed")
