"""The relay's application side: library mode sends its sockets' cumulative state to a
sidecar daemon (exporter.relay.server) in the wire format of exporter.relay.wire.

Public names: `RelaySender` (a thread with its own context and DEALER),
`default_relay_id()`, the sender's default intervals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket as _socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from exporter._version import __version__
from exporter.core import native
from exporter.core.events import Event
from exporter.core.state import SocketSnapshot
from exporter.relay.wire import HEARTBEAT_SECONDS, encode, encode_socket

log = logging.getLogger("zmq_exporter.relay")

# Sender defaults (docs/relay.md).
COALESCE_SECONDS = 0.25  # at most one state message per socket per 250 ms
REFRESH_SECONDS = 10.0  # every socket's state again, whatever happened
SENDER_HWM = 16  # messages queued towards the daemon; beyond, send() fails and we retry


def default_relay_id() -> str:
    return f"{_socket.gethostname()}/{os.getpid()}"


class RelaySender:
    """Sends the changed sockets of `source()` to the daemon at `endpoint`, from a thread
    with its own context: never on the application's thread, never blocking it.

    A DEALER with IMMEDIATE (messages go only to a live connection) and a small SNDHWM,
    sending with NOBLOCK: a message that cannot go now is not queued anywhere; its socket
    stays "changed" and its latest state is sent on a later tick. Memory is bounded by the
    number of sockets, whatever the number of events. Each new connection (the DEALER's
    own monitor: HANDSHAKE_SUCCEEDED) makes it send hello and every socket again, so a
    restarted daemon gets exact totals at once; a full resend every REFRESH_SECONDS covers
    anything else."""

    def __init__(
        self,
        endpoint: str,
        source: Callable[[], tuple[SocketSnapshot, ...]],
        relay_id: str | None = None,
        *,
        coalesce: float = COALESCE_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        refresh: float = REFRESH_SECONDS,
        curve_server_key: bytes | None = None,
        messages: Callable[[], Mapping[str, tuple[float, ...]]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.relay_id = relay_id or default_relay_id()
        self.instance = secrets.token_hex(8)
        self._source = source
        # Socket name -> its message counts (library mode's `messages=True`), sent in the
        # wire format's optional `messages` extension.
        self._messages = messages
        self._coalesce = coalesce
        self._heartbeat = heartbeat
        self._refresh = refresh
        self._curve_server_key = curve_server_key
        self._seq = 0
        # What the daemon has, as far as we know: the state and message counts last sent.
        self._sent: dict[str, tuple[SocketSnapshot, tuple[float, ...] | None]] = {}
        self._gone: set[str] = set()  # sockets removed, "gone" not sent yet
        self._hello = True
        self._stop = native.Event()
        self.sent = 0  # messages handed to libzmq
        self.deferred = 0  # messages that could not go now (will be resent)
        self._thread = native.Thread(target=self._run, name="zmq-exporter-relay", daemon=True)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(1)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Sends bye (best effort) and ends the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _send(self, dealer: zmq.Socket[bytes], kind: str, **body: Any) -> bool:
        self._seq += 1
        data = encode(kind, self.relay_id, self.instance, self._seq, **body)
        try:
            dealer.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.deferred += 1
            return False
        self.sent += 1
        return True

    def _run(self) -> None:
        ctx = self._ctx
        dealer: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, SENDER_HWM)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._curve_server_key is not None:
            public, secret = zmq.curve_keypair()
            dealer.curve_serverkey = self._curve_server_key
            dealer.curve_publickey = public
            dealer.curve_secretkey = secret
        addr = f"inproc://zmq-exporter.relay-monitor.{id(self)}"
        dealer.monitor(addr, int(Event.HANDSHAKE_SUCCEEDED))
        mon: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.RCVHWM, 0)
        mon.connect(addr)
        dealer.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(mon, zmq.POLLIN)
        next_tick = next_beat = time.monotonic()
        next_refresh = next_beat + self._refresh
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(next_tick, next_beat) - time.monotonic())
                if poller.poll(int(timeout * 1000)):
                    while True:
                        try:
                            mon.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                    # A new connection (a restarted daemon): everything again.
                    self._hello = True
                    self._sent.clear()
                now = time.monotonic()
                if now >= next_refresh:
                    self._sent.clear()
                    next_refresh = now + self._refresh
                if now >= next_tick:
                    self._tick(dealer)
                    next_tick = now + self._coalesce
                if now >= next_beat:
                    self._send(dealer, "heartbeat", heartbeat_ms=int(self._heartbeat * 1000))
                    next_beat = now + self._heartbeat
            self._send(dealer, "bye")
        except Exception:
            log.exception("relay sender failed; the application is unaffected")
        finally:
            dealer.setsockopt(zmq.LINGER, 100)  # give bye a moment
            with contextlib.suppress(zmq.ZMQError):
                dealer.disable_monitor()
            mon.close(0)
            dealer.close()
            ctx.term()

    def _tick(self, dealer: zmq.Socket[bytes]) -> None:
        if self._hello:
            if not self._send(dealer, "hello", heartbeat_ms=int(self._heartbeat * 1000),
                              sender=f"zmq-exporter/{__version__}"):  # fmt: skip
                return
            self._hello = False
        current = {s.name: s for s in self._source()}
        counted = self._messages() if self._messages is not None else {}
        self._gone |= set(self._sent) - set(current)
        for name in list(self._gone):
            if name in current:
                self._gone.discard(name)
            elif self._send(dealer, "gone", socket=name):
                self._gone.discard(name)
                self._sent.pop(name, None)
        for name, sock in current.items():
            messages = counted.get(name)
            held = self._sent.get(name)
            if held is None or held[0] is not sock or held[1] != messages:
                if not self._send(dealer, "state", socket=encode_socket(sock, messages)):
                    return  # the queue is full or no daemon: the rest on a later tick
                self._sent[name] = (sock, messages)
