"""Message counting for library mode: how many messages and bytes an application's socket
sends and receives, and how often and how long its sends meet backpressure.

libzmq's monitor says nothing about messages, and pyzmq's wheels lack the draft
`ZMQ_EVENT_PIPES_STATS`; but library mode runs inside the application, so it can count
exactly what the application's own calls move.

`count(sock)` changes the socket object's class to a subclass made for that one socket,
named like its own class, whose `send`, `recv` and `recv_into` count and then return what
the original methods return (or raise what they raise). Every other path of pyzmq goes
through those three: `send_multipart`/`recv_multipart`, the `_string`/`_json`/`_pyobj`/
`_serialized` variants, `zmq.green` sockets (their cooperative send/recv sit below ours)
and `zmq.asyncio` sockets (all their I/O is done, non-blocking, by a plain `_shadow_sock`
of the same libzmq socket, which is counted; their own `send`/`send_multipart` are
wrapped for the backpressure figures, taken when the returned future completes). So
`isinstance`, `repr`, option attributes and the errors (pickling included) are the
socket's own. `uncount(sock)` gives the object its class back; a socket never counted is
never touched, so counting off costs nothing.

What is counted (`MessageCounts`):
- `sent`, `received`: whole messages: a frame sent without SNDMORE, a frame received with
  RCVMORE false (a multipart message is one message);
- `bytes_sent`, `bytes_received`: payload bytes of every frame (`bytes`, `Frame`,
  `copy=False`, any buffer such as `memoryview`; `recv_into`: the frame's size as libzmq
  reports it, also when the buffer truncated it);
- `would_block`: sends that raised `zmq.Again` (NOBLOCK with the queue full or no peer,
  or SNDTIMEO expired);
- `blocked_seconds`: time spent inside sends that could not complete at once. A blocking
  send first tries without waiting; only if that meets backpressure is the wait timed, so
  the usual send reads no clock.

Two implementations of the same wrapper: `exporter/messages/_counting.c` (built at install when a
C compiler and Python's headers are there; ~20x cheaper per message: no Python frames, and
RCVMORE read from libzmq itself) and the Python functions below, used when the extension is
missing, when it found no single libzmq in the process, or when a socket's handle is not
that libzmq's. They count the same (tests/library/test_library_messages.py runs each path
on both); `IMPLEMENTATION` says which one this process uses.

Counts are written by the socket's own thread (sockets are not thread-safe) and read by
scrapes from others: plain integer and float fields, each read whole under the GIL.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import zmq
import zmq.backend
from prometheus_client.metrics_core import Metric

from exporter.core import metrics

__all__ = [
    "ENV_MESSAGES",
    "IMPLEMENTATION",
    "MessageCounts",
    "count",
    "counts",
    "enabled_by_env",
    "families",
    "uncount",
]

# instrument()'s `messages` when not given (and so the launcher's): "1", "true", "yes", "on".
ENV_MESSAGES = "ZMQ_EXPORTER_MESSAGES"

# Plain ints: pyzmq's constants are enums, whose `|` and `&` cost a microsecond.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_Again = zmq.Again
_perf = time.perf_counter
# Marks the classes made here: `_COUNTS` holds the socket's counts, `_ORIGINAL` the class
# to restore.
_SUGAR_SEND = zmq.Socket.send
_COMPILED_SEND = zmq.backend.Socket.send  # the compiled Socket below pyzmq's own
_COUNTS = "_zmq_exporter_message_counts"
_ORIGINAL = "_zmq_exporter_original_class"


def _load_compiled() -> ModuleType | None:
    """exporter.messages._counting if it was built and found the process's one libzmq."""
    try:
        import exporter.messages._counting as _counting
    except ImportError:  # installed without a C compiler: the Python wrapper counts
        return None
    return _counting if _counting.libzmq is not None else None


_compiled = _load_compiled()
# "compiled" or "python": which wrapper new counted sockets get (see the module docstring).
IMPLEMENTATION = "compiled" if _compiled is not None else "python"

_FIELDS = ("sent", "received", "bytes_sent", "bytes_received", "would_block", "blocked_seconds")

if TYPE_CHECKING or _compiled is None:

    class _Storage:
        """The counts' fields (the compiled module's `Counts` when built: C integers)."""

        __slots__ = _FIELDS

        def __init__(self) -> None:
            self.sent = 0
            self.received = 0
            self.bytes_sent = 0
            self.bytes_received = 0
            self.would_block = 0
            self.blocked_seconds = 0.0

else:
    _Storage = _compiled.Counts


class MessageCounts(_Storage):
    """One socket's message counts since `count()` (monotonic, never reset)."""

    __slots__ = ()

    def values(self) -> tuple[int, int, int, int, int, float]:
        """(sent, received, bytes_sent, bytes_received, would_block, blocked_seconds),
        the order of `metrics.MESSAGE_FAMILIES`."""
        return (
            self.sent,
            self.received,
            self.bytes_sent,
            self.bytes_received,
            self.would_block,
            self.blocked_seconds,
        )

    def __repr__(self) -> str:
        return "MessageCounts(" + ", ".join(f"{k}={getattr(self, k)}" for k in _FIELDS) + ")"


def _nbytes(data: Any) -> int:
    """Payload bytes of what `send` accepted: bytes, a Frame, any buffer."""
    if isinstance(data, bytes | bytearray | zmq.Frame):
        return len(data)
    try:
        return memoryview(data).nbytes
    except TypeError:  # sent, but not a buffer we can size (a subclass's own type)
        return 0


# A send's `data` not given (pyzmq's own send will say so).
_MISSING: Any = object()
_SEND_PARAMETERS = ("data", "flags", "copy", "track")
# Defaults of send's and recv's (flags, copy, track).
_DEFAULTS: tuple[Any, ...] = (0, True, False)


def _send_arguments(args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, Any, Any, Any, bool]:
    """(data, flags, copy, track, other) of a send call, read as pyzmq's send binds them;
    `other`: the call has what pyzmq's own send handles (routing_id, group) or refuses.
    `data` is `_MISSING` when not given."""
    slots = [*args[:4], *(_MISSING,) * max(0, 4 - len(args))]
    other = len(args) > 4
    for key, value in kw.items():
        i = _SEND_PARAMETERS.index(key) if key in _SEND_PARAMETERS else -1
        if i < 0 or slots[i] is not _MISSING:
            other = True
        else:
            slots[i] = value
    for i, default in enumerate(_DEFAULTS, start=1):
        if slots[i] is _MISSING:
            slots[i] = default
    return slots[0], slots[1], slots[2], slots[3], other or slots[0] is _MISSING


def _as(wrapper: Callable[..., Any], wrapped: Callable[..., Any]) -> None:
    """`wrapper` shows `wrapped`'s name, doc and signature (`__wrapped__`), and its errors
    about arguments name it as pyzmq's (they read the code's qualified name)."""
    functools.update_wrapper(wrapper, wrapped)
    code = getattr(wrapper, "__code__", None)
    if code is not None:
        wrapper.__code__ = code.replace(co_qualname=wrapped.__qualname__)


def _looks(cls: type) -> dict[str, Any]:
    """What pyzmq reads from a socket's exact class, not inherited (`_repr_cls`: the name
    `repr()` shows, e.g. `zmq.Socket`)."""
    return {k: cls.__dict__[k] for k in ("_repr_cls",) if k in cls.__dict__}


def _namespace(cls: type, c: MessageCounts) -> dict[str, Any]:
    """What a counting subclass of `cls` starts from: named and documented as `cls`, no
    instance dict, its counts and the class to restore."""
    return {
        "__slots__": (),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        _COUNTS: c,
        _ORIGINAL: cls,
        **_looks(cls),
    }


def _sync_class(cls: type[zmq.Socket[Any]], c: MessageCounts, waits: bool, compiled: bool) -> type:
    """A subclass of `cls` counting into `c`. `waits`: time blocking sends and count
    `zmq.Again` (False for an asyncio socket's shadow, whose sends never wait and whose
    `Again` are the asyncio layer's own attempts, not the application's). `compiled`: the
    compiled wrapper counts (else the Python functions below)."""
    base_send = cls.send
    # pyzmq's own Socket.send only handles routing_id/group (keywords, which go through
    # `base_send`) before calling the compiled send: call that directly, one Python frame
    # less per message. A class with its own send (zmq.green) keeps it.
    direct_send = _COMPILED_SEND if base_send is _SUGAR_SEND else base_send
    base_recv = cls.recv
    base_get = cls.get
    base_recv_into: Callable[..., int] | None = getattr(cls, "recv_into", None)
    namespace = _namespace(cls, c)
    if compiled and _compiled is not None:
        namespace["send"] = _compiled.Sender(c, base_send, direct_send, _Again, waits)
        namespace["recv"] = _compiled.Receiver(c, base_recv)
        if base_recv_into is not None:
            namespace["recv_into"] = _compiled.Receiver(c, base_recv_into)
        return type(cls.__name__, (cls,), namespace)

    def waiting(self: Any, args: tuple[Any, ...], kw: dict[str, Any], flags: int | None) -> Any:
        """The send as the application asked it, timed unless NOBLOCK (it may wait for
        room). `flags`: None when they are not an int (pyzmq will say what it thinks)."""
        if not waits:
            return base_send(self, *args, **kw)
        if flags is not None and flags & _NOBLOCK:
            try:
                return base_send(self, *args, **kw)
            except _Again:
                c.would_block += 1
                raise
        start = _perf()
        try:
            return base_send(self, *args, **kw)
        except _Again:  # SNDTIMEO expired
            c.would_block += 1
            raise
        finally:
            c.blocked_seconds += _perf() - start

    # `*args, **kw`, as given: pyzmq's own method binds them (so it refuses what it
    # refuses, in its words); the usual calls are read here without binding.
    def send(self: Any, *args: Any, **kw: Any) -> Any:
        n = len(args)
        if not kw and n == 1:  # send(data): the usual call
            data, flags, copy, track, other = args[0], 0, True, False, False
        elif not kw and n == 2:  # send(data, flags): send_multipart's frames
            data, flags, copy, track, other = args[0], args[1], True, False, False
        else:
            data, flags, copy, track, other = _send_arguments(args, kw)
        # An int, never an enum: IntFlag's `&` costs a microsecond. None: not a number.
        known = flags if type(flags) is int else int(flags) if isinstance(flags, int) else None
        if other or known is None or not waits or known & _NOBLOCK:
            result = waiting(self, args, kw, known)
        else:
            # Without waiting first: only a send that meets backpressure reads the clock.
            try:
                result = direct_send(self, data, known | _NOBLOCK, copy, track)
            except _Again:
                result = waiting(self, args, kw, known)
        # After the send: what pyzmq refuses (a str) raises its own error first.
        if data is not _MISSING:
            c.bytes_sent += len(data) if type(data) is bytes else _nbytes(data)
        if known is None or not known & _SNDMORE:
            c.sent += 1
        return result

    def received(self: Any, size: int) -> None:
        """A frame taken: its bytes, and a message unless more frames follow (RCVMORE
        asked of the socket)."""
        c.bytes_received += size
        if not base_get(self, _RCVMORE):
            c.received += 1

    def recv(self: Any, *args: Any, **kw: Any) -> Any:
        if kw or len(args) > 3:  # as given
            got = base_recv(self, *args, **kw)
            received(self, len(got))
            return got
        if args:
            flags, copy, track = args + _DEFAULTS[len(args) :]
        else:  # recv(): the usual call
            flags, copy, track = 0, True, False
        # As a Frame: its `more` is read from the message itself, where asking the socket
        # for RCVMORE costs twice a small recv (pyzmq maps the option to its type through
        # an enum lookup). copy=True returns the Frame's bytes, as pyzmq would.
        frame = base_recv(self, flags, False, track)
        c.bytes_received += len(frame)
        if not frame.more:
            c.received += 1
        return frame.bytes if copy else frame

    namespace["send"] = send
    namespace["recv"] = recv
    if base_recv_into is not None:
        original_recv_into = base_recv_into

        def recv_into(self: Any, *args: Any, **kw: Any) -> int:
            size = original_recv_into(self, *args, **kw)
            received(self, size)
            return size

        namespace["recv_into"] = recv_into
    for name in ("send", "recv", "recv_into"):
        if name in namespace:
            _as(namespace[name], getattr(cls, name))
    return type(cls.__name__, (cls,), namespace)


def _async_class(cls: type[zmq.Socket[Any]], c: MessageCounts) -> type:
    """A subclass of an asyncio socket class taking the backpressure figures of its
    sends when their futures complete (the shadow socket counts messages and bytes)."""
    base_send = cls.send
    base_send_multipart = cls.send_multipart

    def watch(future: Any, start: float) -> Any:
        if future.done():
            if not future.cancelled() and isinstance(future.exception(), _Again):
                c.would_block += 1  # NOBLOCK asked: it failed at once
            return future

        def done(f: Any) -> None:
            c.blocked_seconds += _perf() - start
            if not f.cancelled() and isinstance(f.exception(), _Again):
                c.would_block += 1  # SNDTIMEO expired

        future.add_done_callback(done)
        return future

    def send(
        self: Any, data: Any, flags: int = 0, copy: bool = True, track: bool = False, **kw: Any
    ) -> Any:
        return watch(base_send(self, data, flags, copy, track, **kw), _perf())

    def send_multipart(
        self: Any, msg_parts: Any, flags: int = 0, copy: bool = True, track: bool = False, **kw: Any
    ) -> Any:
        return watch(base_send_multipart(self, msg_parts, flags, copy, track, **kw), _perf())

    _as(send, base_send)
    _as(send_multipart, base_send_multipart)
    namespace = {**_namespace(cls, c), "send": send, "send_multipart": send_multipart}
    return type(cls.__name__, (cls,), namespace)


def counts(sock: zmq.Socket[Any]) -> MessageCounts | None:
    """The counts of a socket being counted, else None."""
    found: MessageCounts | None = type(sock).__dict__.get(_COUNTS)
    return found


def count(sock: zmq.Socket[Any]) -> MessageCounts:
    """Count `sock`'s messages from now on (from the socket's thread); its counts if it
    is counted already. If its class cannot be subclassed (or its objects cannot change
    class), that error, the socket untouched."""
    existing = counts(sock)
    if existing is not None:
        return existing
    c = MessageCounts()
    shadow = getattr(sock, "_shadow_sock", None)
    if isinstance(shadow, zmq.Socket) and shadow is not sock:
        # zmq.asyncio (and other _AsyncSocket flavours): the shadow does the I/O.
        shadow.__class__ = _sync_class(type(shadow), c, False, _compiled_can_count(shadow))
        try:
            sock.__class__ = _async_class(type(sock), c)
        except BaseException:
            uncount(shadow)
            raise
    else:
        sock.__class__ = _sync_class(type(sock), c, True, _compiled_can_count(sock))
    return c


def _compiled_can_count(sock: zmq.Socket[Any]) -> bool:
    """Whether the compiled wrapper can count `sock`: the libzmq the extension found is
    the one that made this socket (it reads the socket's own type through it)."""
    if _compiled is None:
        return False
    try:
        seen: int = _compiled.socket_type(sock.underlying)
        return seen == int(sock.type)
    except zmq.ZMQError:  # closed: the Python wrapper (it will count nothing)
        return False


def uncount(sock: zmq.Socket[Any]) -> None:
    """Stop counting: `sock` (and an asyncio socket's shadow) get their own class back."""
    for target in (sock, getattr(sock, "_shadow_sock", None)):
        if target is None:
            continue
        original = type(target).__dict__.get(_ORIGINAL)
        if original is not None:
            target.__class__ = original


def enabled_by_env() -> bool:
    """Whether $ZMQ_EXPORTER_MESSAGES turns counting on for instrument() calls that do
    not say."""
    return os.environ.get(ENV_MESSAGES, "").strip().lower() in ("1", "true", "yes", "on")


# (socket name, its configured labels, its counts' `values()`)
Counted = tuple[str, Mapping[str, str], tuple[float, ...]]


def families(sockets: Iterable[Counted]) -> list[Metric]:
    """The message families (`metrics.MESSAGE_FAMILIES`) of the counted sockets, one
    sample per socket, labelled `socket` and its configured labels."""
    out = [Metric(f.metric_name, f.help, f.type, f.unit or "") for f in metrics.MESSAGE_FAMILIES]
    for name, labels, values in sockets:
        sample_labels = {"socket": name, **labels}
        for family, spec, value in zip(out, metrics.MESSAGE_FAMILIES, values, strict=True):
            family.add_sample(spec.name, sample_labels, value)
    return out
