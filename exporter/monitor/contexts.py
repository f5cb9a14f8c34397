"""Keeping DNS off the threads that serve every socket.

libzmq 4.3.5 resolves host names with a blocking getaddrinfo():
- for connect() on the I/O thread of the socket's context, at every (re)connect attempt.
  One context's I/O thread serves all its sockets, so a name whose DNS answer is slow or
  never comes (10 s per attempt with glibc's defaults) froze every other socket's
  accepts, handshakes and monitor events, and ctx.term() at shutdown waited for it.
  `ContextPool` therefore gives sockets whose connect endpoints name a host their own
  context, one per distinct set of names (sockets that resolve the same names share it:
  a hung name would stall them all anyway). Numeric addresses, ipc and inproc stay in the
  shared context. The monitor PAIR lives in the socket's context (inproc needs that);
  the engine reads it through its fd whatever the context.
- for bind() in the calling thread, and pyzmq 27 holds the GIL through zmq_bind(), so a
  bind to a dead name froze the whole process, web server included. `BindNames` resolves
  such a name on a worker thread and the engine binds the numeric address it found.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import zmq

from exporter.config import SocketSpec
from exporter.core.endpoints import parse_endpoint
from exporter.monitor.sockets import MonitoredSocket, close_socket, open_socket

log = logging.getLogger("zmq_exporter.contexts")

Context = zmq.Context[zmq.Socket[bytes]]

# A context keeps libzmq's default MAX_SOCKETS (1023; raising it costs ~12 bytes per slot
# up front) and holds at most this many monitored sockets, 3 zmq sockets each.
SOCKETS_PER_CONTEXT = 256
# At shutdown, how long to wait for the own contexts to terminate. One whose I/O thread
# is stuck in getaddrinfo() cannot terminate before the lookup returns; the process exits
# without it (its threads end with the process).
TERM_WAIT = 0.1
# Descriptors of an own context beyond its sockets' (measured, libzmq 4.3.5): mailbox and
# epoll of its I/O thread and of its reaper, and its term mailbox. Also 2 threads.
CONTEXT_FDS = 5
# A finished bind lookup not used within this long is stale (its socket went away).
LOOKUP_FRESH = 5.0


def dns_names(spec: SocketSpec) -> frozenset[str]:
    """Host names that libzmq resolves through DNS for this socket's connects: not numeric
    addresses, not ipc/inproc. (The source part of `src;dst` is never looked up: libzmq
    resolves it numerically or as an interface name.)"""
    names = set()
    for text in spec.connects:
        endpoint = parse_endpoint(text, "connect")
        if endpoint.transport == "tcp" and not is_numeric_host(endpoint.host):
            names.add(endpoint.host.lower())
    return frozenset(names)


def context_key(spec: SocketSpec) -> frozenset[str] | None:
    """The names whose context the socket belongs to; None for the shared context."""
    names = dns_names(spec)
    # inproc reaches only sockets of the same context: such a socket stays shared.
    inproc = any(e.startswith("inproc://") for e in (*spec.binds, *spec.connects))
    return names if names and not inproc else None


def context_fds(specs: Iterable[SocketSpec]) -> int:
    """Descriptors the own contexts of `specs` need on top of their sockets' (an upper
    bound for a reload: contexts that exist already cost nothing new)."""
    users = Counter(key for key in map(context_key, specs) if key is not None)
    return CONTEXT_FDS * sum(math.ceil(n / SOCKETS_PER_CONTEXT) for n in users.values())


def is_numeric_host(host: str) -> bool:
    if host == "*":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)  # accepts an IPv6 zone, fe80::1%eth0
    except ValueError:
        return False
    return True


@dataclass
class _Slot:
    ctx: Context
    names: frozenset[str]
    users: int = 0


class ContextPool:
    """Hands out the context for each socket and terminates contexts nobody uses.

    Engine thread only, except `terminate`, which runs after the engine thread ended."""

    def __init__(self, shared: Context) -> None:
        self.shared = shared
        self._slots: dict[frozenset[str], list[_Slot]] = {}
        self._by_ctx: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._terminating: dict[int, tuple[threading.Thread, frozenset[str]]] = {}

    @property
    def count(self) -> int:
        """Own contexts in use (the shared one not counted)."""
        return len(self._by_ctx)

    def open_socket(
        self,
        spec: SocketSpec,
        opener: Callable[[Context, SocketSpec], MonitoredSocket] = open_socket,
    ) -> MonitoredSocket:
        """`opener` creates it in the context chosen (the engine passes its module's
        `open_socket`, which a test may replace to inject a failure)."""
        ctx = self._acquire(spec)
        try:
            return opener(ctx, spec)
        except BaseException:
            self._release(ctx)
            raise

    def close_socket(self, managed: MonitoredSocket) -> None:
        if managed.closed:
            return
        ctx = managed.socket.context
        close_socket(managed)
        self._release(ctx)

    def _acquire(self, spec: SocketSpec) -> Context:
        names = context_key(spec)
        if names is None:
            return self.shared
        slots = self._slots.setdefault(names, [])
        slot = next((s for s in slots if s.users < SOCKETS_PER_CONTEXT), None)
        if slot is None:
            slot = _Slot(zmq.Context(), names)
            slots.append(slot)
            self._by_ctx[id(slot.ctx)] = slot
            log.debug("new ZeroMQ context for host names", extra={"names": sorted(names)})
        slot.users += 1
        return slot.ctx

    def _release(self, ctx: Context) -> None:
        slot = self._by_ctx.get(id(ctx))
        if slot is None or slot.ctx is not ctx:  # the shared context
            return
        slot.users -= 1
        if slot.users > 0:
            return
        del self._by_ctx[id(ctx)]
        slots = self._slots[slot.names]
        slots.remove(slot)
        if not slots:
            del self._slots[slot.names]
        self._term_in_background(slot)

    def _term_in_background(self, slot: _Slot, destroy: bool = False) -> None:
        # Its sockets are closed (linger 0), so term() waits only for the I/O thread,
        # which may be inside a getaddrinfo() that takes seconds: never on this thread.
        # The thread's frame keeps the Context alive, so pyzmq's Context.__del__ can
        # never run a second, blocking term() on whatever thread collects it.
        key = id(slot.ctx)

        def term() -> None:
            try:
                if destroy:
                    slot.ctx.destroy(linger=0)
                else:
                    slot.ctx.term()
            finally:
                with self._lock:
                    self._terminating.pop(key, None)

        thread = threading.Thread(target=term, name="zmq-exporter-ctx-term", daemon=True)
        with self._lock:
            self._terminating[key] = (thread, slot.names)
        thread.start()

    def terminate(self, timeout: float = TERM_WAIT) -> list[frozenset[str]]:
        """Terminate every own context, waiting at most `timeout` seconds in all; call it
        once the engine thread has ended. Returns the name sets of those still stuck."""
        # Sockets the engine did not close (its thread died): closed here, which is safe
        # only because no other thread uses them any more.
        for slots in list(self._slots.values()):
            for slot in slots:
                del self._by_ctx[id(slot.ctx)]
                self._term_in_background(slot, destroy=True)
        self._slots.clear()
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._terminating.values())
        for thread, _names in pending:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [names for thread, names in pending if thread.is_alive()]
        if stuck:
            log.warning(
                "exiting without waiting for ZeroMQ contexts stuck resolving host names",
                extra={"names": sorted(n for names in stuck for n in names)},
            )
        return stuck


class BindNames:
    """Resolves host names of bind endpoints on worker threads.

    libzmq would resolve them inside zmq_bind() (interface name first, then
    getaddrinfo()), under pyzmq's GIL. `target` returns the endpoint to pass to bind():
    unchanged when libzmq needs no DNS for it, else with the host replaced by the address
    resolved as libzmq would (first result, AF_INET or AF_INET6 per the ipv6 option).
    While a lookup runs, it raises ZMQError(EAGAIN) after waiting at most `wait` seconds
    (enough for /etc/hosts), and the engine retries with its bind backoff."""

    def __init__(self, wait: float = 0.02) -> None:
        self._wait = wait
        self._pending: dict[tuple[str, bool], _Lookup] = {}

    def target(self, endpoint: str, ipv6: bool | None) -> str:
        try:
            parsed = parse_endpoint(endpoint, "bind")
        except ValueError:  # the config checked it; if not, libzmq gives the error
            return endpoint
        host = parsed.host
        if parsed.transport != "tcp" or is_numeric_host(host) or _is_interface(host):
            return endpoint
        key = (host, bool(ipv6))
        lookup = self._pending.get(key)
        if lookup is not None and time.monotonic() - lookup.finished > LOOKUP_FRESH:
            lookup = None  # finished long ago for a socket that went away: ask again
        if lookup is None:
            lookup = self._pending[key] = _resolve_in_thread(host, bool(ipv6))
            wait = self._wait
        else:
            wait = 0.0
        try:
            address = lookup.future.result(wait)
        except TimeoutError:
            raise zmq.ZMQError(errno.EAGAIN, f"still resolving host {host!r}") from None
        except OSError as err:
            del self._pending[key]
            raise zmq.ZMQError(errno.ENODEV, f"cannot resolve host {host!r}: {err}") from None
        del self._pending[key]  # the next bind resolves again: DNS answers change
        if ":" in address:
            address = f"[{address}]"
        return f"tcp://{address}:{parsed.port}"


def _is_interface(name: str) -> bool:
    # libzmq tries an interface name before DNS (ip_resolver.cpp, resolve_nic_name).
    try:
        return any(ifname == name for _index, ifname in socket.if_nameindex())
    except OSError:
        return False


@dataclass
class _Lookup:
    future: Future[str] = field(default_factory=Future)
    finished: float = math.inf  # time.monotonic() when it ended


def _resolve_in_thread(host: str, ipv6: bool) -> _Lookup:
    lookup = _Lookup()
    future = lookup.future

    def resolve() -> None:
        # As ip_resolver.cpp does for a bind: AI_PASSIVE, SOCK_STREAM, first result.
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        flags = socket.AI_PASSIVE | (socket.AI_V4MAPPED if ipv6 else 0)
        try:
            infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM, 0, flags)
            sockaddr = infos[0][4]
            address = str(sockaddr[0])
            if ipv6 and len(sockaddr) == 4 and sockaddr[3] and "%" not in address:
                address = f"{address}%{sockaddr[3]}"  # scope id of a link-local address
        except OSError as err:
            lookup.finished = time.monotonic()
            future.set_exception(err)
            return
        lookup.finished = time.monotonic()
        future.set_result(address)

    threading.Thread(target=resolve, name="zmq-exporter-resolve", daemon=True).start()
    return lookup
