"""Creating configured sockets, attaching monitors that can never stall the context,
and tearing both down in the one safe order.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from exporter._version import __version__
from exporter.config import SocketSpec
from exporter.config.durations import to_millis
from exporter.config.model import SocketOptions

_monitor_ids = itertools.count(1)

# Socket types whose inbound messages we can read and drop without a send/recv state
# machine. Draining keeps a peer that sends to the sidecar from filling queues.
DRAINABLE = frozenset({"ROUTER", "DEALER", "SUB", "XSUB", "XPUB", "PULL", "PAIR", "STREAM"})


@dataclass
class MonitoredSocket:
    spec: SocketSpec
    socket: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]  # our end of the monitor PAIR
    monitor_fd: int
    socket_fd: int | None  # set when inbound messages are drained
    closed: bool = False


def build_labels() -> dict[str, str]:
    """The labels of `zmq_exporter_build_info`: this package's version and those of what
    it runs on. Read here, at the zmq edge, so the renderers need not import zmq."""
    return {
        "version": __version__,
        "pyzmq_version": zmq.pyzmq_version(),
        "libzmq_version": zmq.zmq_version(),
        "python_version": platform.python_version(),
    }


def open_socket(ctx: zmq.Context[zmq.Socket[bytes]], spec: SocketSpec) -> MonitoredSocket:
    """Create the socket, set its options and attach its monitor. No bind/connect yet:
    the monitor must be connected before the first event or the event is lost."""
    sock = ctx.socket(getattr(zmq, spec.socket_type))
    try:
        _set_options(sock, spec.options, spec.curve_secretkey)
        monitor = attach_monitor(ctx, sock, spec.events_mask)
    except BaseException:
        sock.close(linger=0)
        raise
    drain = spec.socket_type in DRAINABLE
    return MonitoredSocket(
        spec=spec,
        socket=sock,
        monitor=monitor,
        monitor_fd=int(monitor.getsockopt(zmq.FD)),
        socket_fd=int(sock.getsockopt(zmq.FD)) if drain else None,
    )


def attach_monitor(ctx: zmq.Context[Any], sock: zmq.Socket[Any], mask: int) -> zmq.Socket[bytes]:
    """Start `sock`'s monitor and connect our end of it, a PAIR in `ctx` (the socket's own
    context: inproc). Call it on the thread that owns `sock`."""
    # A unique address on every attach: reusing an inproc monitor address hangs
    # (libzmq #1315); the pid keeps a forked child's addresses apart from the parent's.
    # RCVHWM=0 before connect makes the monitor pipe unbounded, so an event burst queues
    # in memory instead of blocking the context's I/O thread (get_monitor_socket() keeps
    # the default HWM and stalls every socket after ~2,300).
    addr = f"inproc://zmq-exporter.monitor.{os.getpid()}.{next(_monitor_ids)}"
    sock.monitor(addr, mask)
    # A plain socket even for zmq.asyncio (only our reader reads it), made directly rather
    # than by ctx.socket(): the context does not list it, so an application's
    # ctx.destroy() leaves it to the reader instead of closing it under the reader's feet.
    pair: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.PAIR)
    try:
        pair.setsockopt(zmq.RCVHWM, 0)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(addr)
    except BaseException:
        pair.close(linger=0)
        sock.disable_monitor()
        raise
    return pair


def close_socket(managed: MonitoredSocket) -> None:
    """disable_monitor, close the monitor PAIR, close the socket - in that order, or the
    I/O thread can block for ever (libzmq #3575, pyzmq #1554)."""
    if managed.closed:
        return
    managed.closed = True
    with contextlib.suppress(zmq.ZMQError):
        managed.socket.disable_monitor()
    managed.monitor.close(linger=0)
    # The socket's own LINGER option: the configured `linger`, 0 when none is configured.
    managed.socket.close()


def _whole_seconds(seconds: float) -> int:
    return max(1, round(seconds))


# Integer socket options: (config key, ZMQ option, conversion of the validated value).
_INT_OPTIONS: tuple[tuple[str, int, Callable[[Any], int]], ...] = (
    ("reconnect_ivl", zmq.RECONNECT_IVL, to_millis),
    ("reconnect_ivl_max", zmq.RECONNECT_IVL_MAX, to_millis),
    ("heartbeat_ivl", zmq.HEARTBEAT_IVL, to_millis),
    ("heartbeat_timeout", zmq.HEARTBEAT_TIMEOUT, to_millis),
    ("heartbeat_ttl", zmq.HEARTBEAT_TTL, to_millis),
    ("handshake_ivl", zmq.HANDSHAKE_IVL, to_millis),
    ("tcp_keepalive_idle", zmq.TCP_KEEPALIVE_IDLE, _whole_seconds),
    ("tcp_keepalive_intvl", zmq.TCP_KEEPALIVE_INTVL, _whole_seconds),
    ("tcp_keepalive", zmq.TCP_KEEPALIVE, int),
    ("tcp_keepalive_cnt", zmq.TCP_KEEPALIVE_CNT, int),
    ("sndhwm", zmq.SNDHWM, int),
    ("rcvhwm", zmq.RCVHWM, int),
    ("backlog", zmq.BACKLOG, int),
    ("ipv6", zmq.IPV6, int),
    ("immediate", zmq.IMMEDIATE, int),
)


def _set_options(sock: zmq.Socket[bytes], o: SocketOptions, secret: bytes | None) -> None:
    for key, option, convert in _INT_OPTIONS:
        value = getattr(o, key)
        if value is not None:
            sock.setsockopt(option, convert(value))
    # Linger defaults to 0 here (libzmq's default, infinite, would hold shutdown).
    sock.setsockopt(zmq.LINGER, to_millis(o.linger) if o.linger is not None else 0)
    if o.routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, o.routing_id.encode())
    for prefix in o.subscribe or ():
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    if secret is not None:
        _set_curve(sock, o, secret)


def _set_curve(sock: zmq.Socket[bytes], o: SocketOptions, secret: bytes) -> None:
    set_bytes: Callable[[int, bytes], None] = sock.setsockopt
    if o.curve_server:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        set_bytes(zmq.CURVE_SECRETKEY, secret)
        return
    public = o.curve_publickey.encode() if o.curve_publickey else zmq.curve_public(secret)
    assert o.curve_serverkey is not None  # checked by the config loader
    set_bytes(zmq.CURVE_SERVERKEY, o.curve_serverkey.encode())
    set_bytes(zmq.CURVE_PUBLICKEY, public)
    set_bytes(zmq.CURVE_SECRETKEY, secret)
