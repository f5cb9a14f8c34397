"""Step 2: a raw TCP (or AF_UNIX) connect, timed, within the deadline. The connected
socket is handed to the greeting step; the caller closes it."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult


def connect(
    family: int,
    address: tuple[str, int] | str,
    deadline: Deadline,
    log: ProbeLog,
    result: ProbeResult,
) -> socket.socket:
    """`address`: (ip, port) for AF_INET/AF_INET6, a path for AF_UNIX ("@name": abstract)."""
    if isinstance(address, str) and address.startswith("@"):
        address = "\0" + address[1:]  # libzmq's spelling of the abstract namespace
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    log.debug("Connecting", address=_shown(address))
    started = time.monotonic()
    try:
        code = sock.connect_ex(address)
        if code == errno.EAGAIN:  # AF_UNIX: the listener's backlog is full; no retry here
            result.connect_seconds = time.monotonic() - started
            raise ProbeFailed("connect_timeout", "the listener's backlog is full (EAGAIN)")
        if code == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            while not poller.poll(deadline.remaining() * 1000) and not deadline.expired():
                pass
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0 and not _connected(sock):
                code = errno.ETIMEDOUT
        result.connect_seconds = time.monotonic() - started
        if code == errno.ETIMEDOUT:
            raise ProbeFailed("connect_timeout", "no connection before the deadline")
        if code != 0:
            name = errno.errorcode.get(code, str(code))
            raise ProbeFailed("connect_refused", f"connect failed: {name} ({os.strerror(code)})")
    except BaseException:
        result.connect_seconds = time.monotonic() - started
        sock.close()
        raise
    log.debug("Connected", seconds=f"{result.connect_seconds:.6f}")
    return sock


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def _shown(address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return "@" + address[1:] if address.startswith("\0") else address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
