"""Instrument at creation: every socket a context (or every context) creates is watched
from its first bind/connect on, without touching the code that creates it.

    exporter.instrument_sockets()                      # every pyzmq context
    exporter.instrument_sockets(ctx, name="{type}@{endpoint}", relay="ipc:///run/zx.sock")

How: `zmq.Socket.__init__` (which every socket class runs: zmq.green's, zmq.asyncio's, an
application's subclass; whether made by `ctx.socket(type)` or `zmq.Socket(ctx, type)`) marks
each new socket whose context a hook applies to; a shadow (`Socket.shadow(address)`,
`Socket(shadow=...)`, `Socket(other)`, zmq.asyncio's internal `_shadow_sock`) is another
handle on a socket, never marked itself. `zmq.Socket.bind`/`connect` instrument a marked
socket on its first call, before libzmq sees the endpoint, so the monitor sees the
LISTENING/CONNECTED events of every connection. The name is known then: by default the
socket type and its first endpoint as given (`ROUTER@tcp://*:5555`), `#2`, `#3`... for
further open sockets of the same type and endpoint (an ordinal among those open at the time,
so the names of a program that creates its sockets in the same order are the same after a
restart, and their number is bounded by the sockets open at once, and by `max_sockets`). A
socket never bound or connected is never instrumented (it has nothing to watch). Later binds
and connects of an instrumented socket go through its `Instrumentation` (labelled as given).

Sockets the exporter creates for itself (the relay sender's, the monitors' PAIRs) are left
alone: the hook skips sockets whose first caller outside pyzmq is one of the exporter's own
modules.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import zmq
from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

from exporter import library

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = ["DEFAULT_NAME", "SocketHook", "instrument_sockets", "socket_name"]

log = logging.getLogger("zmq_exporter.instrument")

DEFAULT_NAME = "{type}@{endpoint}"
DEFAULT_MAX_SOCKETS = 1000

# A rule: a format string with {type} (ROUTER), {role} (bind/connect), {endpoint} (as given),
# or a callable (socket, role, endpoint) -> name, or None to leave that socket alone.
NameRule = str | Callable[[zmq.Socket[Any], str, str], str | None]


@dataclass(eq=False)
class SocketHook:
    """One `instrument_sockets()` call: which contexts, how sockets are named, and the
    `instrument()` arguments. `close()` stops it instrumenting new sockets (those already
    instrumented stay so until they are closed)."""

    context: zmq.Context[Any] | None
    name: NameRule
    kwargs: dict[str, Any]
    heartbeat: float | None = None
    max_sockets: int = DEFAULT_MAX_SOCKETS
    instrumented: int = 0
    refused: int = 0  # sockets left alone for max_sockets
    closed: bool = False
    _context_ref: Any = field(default=None, repr=False)

    def applies_to(self, ctx: zmq.Context[Any]) -> bool:
        if self.closed:
            return False
        if self._context_ref is None:
            return True
        target = self._context_ref()
        return target is not None and target is ctx

    def close(self) -> None:
        with _lock:
            self.closed = True
            if self in _hooks:
                _hooks.remove(self)


_lock = threading.RLock()
_hooks: list[SocketHook] = []
# Sockets created by a hooked context, not yet bound or connected: the hook that owns them.
_pending: weakref.WeakKeyDictionary[zmq.Socket[Any], SocketHook] = weakref.WeakKeyDictionary()
# Sockets instrumented by a hook: their Instrumentation.
_handles: weakref.WeakKeyDictionary[zmq.Socket[Any], library.Instrumentation] = (
    weakref.WeakKeyDictionary()
)
# Sockets inside their Instrumentation's bind/connect (the real call goes through) and what
# that call returned.
_busy: dict[int, Any] = {}
_originals: dict[str, Any] = {}


def socket_name(rule: NameRule, sock: zmq.Socket[Any], role: str, endpoint: str) -> str | None:
    """The base name `rule` gives `sock` at its first `role` ("bind"/"connect") of
    `endpoint`."""
    if callable(rule):
        return rule(sock, role, endpoint)
    kind = zmq.SocketType(int(sock.getsockopt(zmq.TYPE))).name
    return rule.format(type=kind, role=role, endpoint=endpoint)


def _free_name(base: str) -> str:
    """`base`, or `base#2`, `#3`... the first not used by an open instrumented socket."""
    handles = library._process.handles
    for n in range(1, 1_000_000):
        name = base if n == 1 else f"{base}#{n}"
        other = handles.get(name)
        if other is None or not other._live():
            return name
    raise library.InstrumentError(f"no free name for {base!r}")


# Frames looked at to find who creates a socket (pyzmq's own and our wrappers are skipped).
_MAX_CALLER_DEPTH = 64


def _from_exporter() -> bool:
    """The socket being created is created by the exporter's own modules: the first caller
    that is neither pyzmq (`Context.socket`, zmq.asyncio's and zmq.green's `__init__`s) nor
    exporter.instrument (these wrappers, the launcher's) is one of them."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_MAX_CALLER_DEPTH):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__", "")
        if not isinstance(module, str):
            return False
        if module == "zmq" or module.startswith(("zmq.", "exporter.instrument.")):
            frame = frame.f_back
            continue
        return module.startswith("exporter.")
    return False


def _is_shadow(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether `zmq.Socket(*args, **kwargs)` makes a shadow, as pyzmq's `__init__` decides
    from its public parameters: `shadow=` given, or another socket in place of the context
    (`Socket(other)`; zmq.asyncio's sockets and `Socket.shadow()` pass `shadow=`)."""
    return bool(kwargs.get("shadow")) or (bool(args) and isinstance(args[0], zmq.Socket))


def _hooked_init(self: zmq.Socket[Any], *args: Any, **kwargs: Any) -> None:
    _originals["init"](self, *args, **kwargs)
    if not _hooks or _is_shadow(args, kwargs):
        return  # a shadow: the socket it shadows is the one marked (or not)
    try:
        if _from_exporter():
            return
        context = self.context
        for hook in list(_hooks):
            if hook.applies_to(context):
                _pending[self] = hook
                if hook.heartbeat:
                    _set_heartbeat(self, hook.heartbeat)
                break
    except Exception:
        # Never break the application's socket for its instrumentation.
        log.exception("instrument_sockets: could not look at a new socket")


def _set_heartbeat(sock: zmq.Socket[Any], seconds: float) -> None:
    """ZMTP heartbeats (they act only on connections made after they are set): a PING
    every `seconds`, the connection dropped when nothing came back for twice that. Set at
    creation, so an option the application or its context's defaults (`ctx.sockopts`, applied
    after `__init__` by `Context.socket`) set afterwards wins."""
    ivl = max(1, round(seconds * 1000))
    for option, value in ((zmq.HEARTBEAT_IVL, ivl), (zmq.HEARTBEAT_TIMEOUT, 2 * ivl)):
        try:
            # pyzmq's own setter: called from inside `__init__`, before a subclass's
            # `__init__` has set up what its own `setsockopt` may need.
            zmq.Socket.setsockopt(sock, option, value)
        except zmq.ZMQError:
            return  # a type without connections (none in libzmq 4.3) or a closed socket


def _first_use(sock: zmq.Socket[Any], role: str, endpoint: str) -> library.Instrumentation | None:
    handle = _handles.get(sock)
    if handle is not None:
        return handle if not handle.closed else None
    hook = _pending.pop(sock, None)
    if hook is None or hook.closed:
        return None
    with _lock:
        if hook.instrumented >= hook.max_sockets:
            hook.refused += 1
            if hook.refused == 1:
                log.warning(
                    "instrument_sockets: max_sockets=%d reached; further sockets are not "
                    "instrumented",
                    hook.max_sockets,
                )
            return None
        try:
            base = socket_name(hook.name, sock, role, endpoint)
            if base is None:
                return None
            handle = library.instrument(sock, _free_name(base), **hook.kwargs)
        except Exception:
            # Never break the application's bind/connect for its instrumentation.
            log.exception("instrument_sockets: could not instrument a socket")
            return None
        hook.instrumented += 1
        _handles[sock] = handle
        return handle


def _through(role: str) -> Callable[..., Any]:
    def call(self: zmq.Socket[Any], addr: str | bytes, *args: Any, **kwargs: Any) -> Any:
        if isinstance(addr, bytes):  # pyzmq takes bytes too (ipykernel connects with them)
            addr = addr.decode()
        key = id(self)
        if key in _busy:  # the Instrumentation's own call: the real one
            result = _originals[role](self, addr, *args, **kwargs)
            _busy[key] = result
            return result
        handle = _first_use(self, role, addr) if (_pending or _handles) else None
        if handle is None or args or kwargs or not isinstance(addr, str):
            return _originals[role](self, addr, *args, **kwargs)
        _busy[key] = None
        try:
            handle._attach(role, addr)
            return _busy[key]
        finally:
            del _busy[key]

    call.__name__ = role
    call.__doc__ = _originals[role].__doc__
    return call


def _install() -> None:
    """Patch pyzmq's classes once per process (idempotent)."""
    if _originals:
        return
    _originals["init"] = zmq.Socket.__init__
    _originals["bind"] = zmq.Socket.bind
    _originals["connect"] = zmq.Socket.connect
    zmq.Socket.__init__ = _hooked_init  # type: ignore[method-assign]
    zmq.Socket.bind = _through("bind")  # type: ignore[method-assign]
    zmq.Socket.connect = _through("connect")  # type: ignore[method-assign]


def _after_fork() -> None:
    # The parent's sockets must not be used in a child (libzmq's rule), and the child's
    # library state starts empty: so do the hooks' tables (the hooks themselves stay).
    global _lock
    _lock = threading.RLock()
    _pending.clear()
    _handles.clear()
    _busy.clear()


os.register_at_fork(after_in_child=_after_fork)


def instrument_sockets(
    context: zmq.Context[Any] | None = None,
    name: NameRule = DEFAULT_NAME,
    *,
    labels: Mapping[str, str] | None = None,
    registry: CollectorRegistry | None = REGISTRY,
    meter_provider: MeterProvider | None = None,
    relay: str | None = None,
    relay_id: str | None = None,
    relay_server_key: str | None = None,
    heartbeat: float | None = None,
    max_sockets: int = DEFAULT_MAX_SOCKETS,
    **instrument_kwargs: Any,
) -> SocketHook:
    """Instrument every socket of `context` (None: every pyzmq context, including
    zmq.green's and zmq.asyncio's), created by `ctx.socket(type)` or `zmq.Socket(ctx, type)`
    (or any subclass's constructor) after this call, from its first bind/connect on, as
    `exporter.instrument(socket, name, ...)` would.

    `name`: a format string with `{type}`, `{role}` and `{endpoint}` (the first endpoint,
    as given to bind/connect), or a callable `(socket, role, endpoint) -> str | None` (None:
    leave that socket alone). A name in use by an open socket gets `#2`, `#3`...
    `heartbeat`: seconds; set ZMTP heartbeats (HEARTBEAT_IVL, and HEARTBEAT_TIMEOUT twice
    that) on each socket at creation, so a frozen peer is dropped (off by default).
    `max_sockets`: at most that many sockets instrumented by this hook (the rest are left
    alone, with one warning). Other keyword arguments (`events`, `messages`...) go to
    `instrument()`. Sockets created before this call, and shadows (`Socket.shadow()`: another
    handle on a socket), are not affected."""
    if name is None or (not callable(name) and not isinstance(name, str)):
        raise library.InstrumentError("name must be a format string or a callable")
    if max_sockets < 1:
        raise library.InstrumentError(f"max_sockets must be at least 1, got {max_sockets}")
    if heartbeat is not None and not 0 < heartbeat <= 3600:
        raise library.InstrumentError(f"heartbeat must be in (0, 3600] s, got {heartbeat}")
    kwargs = dict(instrument_kwargs)
    kwargs.update(
        labels=labels,
        registry=registry,
        meter_provider=meter_provider,
        relay=relay,
        relay_id=relay_id,
        relay_server_key=relay_server_key,
    )
    hook = SocketHook(context, name, kwargs, heartbeat, max_sockets)
    if context is not None:
        hook._context_ref = weakref.ref(context)
    with _lock:
        _install()
        # A hook for one context is looked at before one for every context.
        _hooks.insert(0 if context is not None else len(_hooks), hook)
    return hook


_from_env: SocketHook | None = None


def start_from_environment() -> SocketHook | None:
    """`instrument_sockets(None, ...)` as the launcher's environment variables say
    (exporter/instrument/env.py), once per process; None when ZMQ_EXPORTER_DISABLED."""
    global _from_env
    from exporter.instrument import env

    with _lock:
        if _from_env is not None:
            return _from_env
        config = env.load()
        if config.disabled:
            return None
        _from_env = instrument_sockets(None, **config.hook_kwargs())
        return _from_env
