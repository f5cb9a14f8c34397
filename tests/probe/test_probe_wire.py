"""The prober's own ZMTP 3.x handshake (exporter/prober/wire.py) against real peers: a
NULL probe is one TCP connection and a real handshake to libzmq (the peer's own monitor
reports HANDSHAKE_SUCCEEDED), socket types are checked as libzmq does, PLAIN with right and
wrong credentials and without a ZAP handler, a NULL server whose ZAP refuses, and scripted
raw peers that send a valid greeting and then junk, an ERROR, or nothing.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from exporter.config.modules import ProbeModule, default_modules
from exporter.monitor.sockets import attach_monitor
from exporter.prober import Prober
from exporter.prober.greeting import our_greeting
from exporter.prober.wire import MAX_COMMAND_SIZE, command, encode_property, parse_properties

from helpers import parse_metrics, value
from testkit import wait_until

Ctx = zmq.Context[zmq.Socket[bytes]]
USER, PASSWORD = b"probe", b"s3cret"


def outcome(prober: Prober, target: str, module: str = "zmtp", timeout: str = "2.5") -> str:
    """ "ok" or the failure reason, with the debug log on a surprise."""
    query = {"target": [target], "module": [module], "debug": ["true"]}
    status, _, body = prober.handle_probe(query, {"X-Prometheus-Scrape-Timeout-Seconds": timeout})
    assert status == 200, body
    text = body.decode()
    metrics_text = text.split("Metrics that would have been returned:\n")[1]
    samples = parse_metrics(metrics_text.split("\n\n\nModule configuration:")[0])
    if value(samples, "probe_success") == 1.0:
        assert value(samples, "probe_zmtp_handshake_duration_seconds") is not None
        return "ok"
    reasons = [dict(ls)["reason"] for name, ls in samples if name == "probe_zmtp_failure_info"]
    assert len(reasons) == 1, text
    return reasons[0]


@pytest.fixture
def prober() -> Prober:
    modules = default_modules()
    modules["sub"] = ProbeModule("sub", socket_type="SUB")
    modules["plain"] = ProbeModule(
        "plain", mechanism="PLAIN", plain_username=USER, plain_password=PASSWORD
    )
    modules["plain_wrong"] = ProbeModule(
        "plain_wrong", mechanism="PLAIN", plain_username=USER, plain_password=b"guess"
    )
    modules["plain_sub"] = ProbeModule(
        "plain_sub",
        socket_type="SUB",
        mechanism="PLAIN",
        plain_username=USER,
        plain_password=PASSWORD,
    )
    return Prober(lambda: modules)


def bound(ctx: Ctx, kind: int, **options: object) -> tuple[zmq.Socket[bytes], str]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, option in options.items():
        setattr(sock, name, option)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


class PeerEvents:
    """The events a bound peer's own monitor reports, counted by name."""

    def __init__(self, ctx: Ctx, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.monitor = attach_monitor(ctx, sock, zmq.EVENT_ALL)
        self.counts: dict[str, int] = {}

    def close(self) -> None:
        # The monitor's PAIR is unlisted by the context: ctx.destroy() would wait for it.
        self.sock.disable_monitor()
        self.monitor.close(linger=0)

    def drain(self) -> dict[str, int]:
        while self.monitor.poll(0):
            frames = self.monitor.recv_multipart()
            event, _ = struct.unpack_from("=HI", frames[0])
            name = str(zmq.Event(event).name)
            self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts

    def saw(self, name: str, count: int) -> bool:
        return self.drain().get(name, 0) >= count


@pytest.fixture
def watch(ctx: Ctx) -> Iterator[Callable[[zmq.Socket[bytes]], PeerEvents]]:
    """PeerEvents for a peer socket, closed before the context is."""
    opened: list[PeerEvents] = []

    def open_for(sock: zmq.Socket[bytes]) -> PeerEvents:
        opened.append(PeerEvents(ctx, sock))
        return opened[-1]

    yield open_for
    for events in opened:
        events.close()


Watch = Callable[[zmq.Socket[bytes]], PeerEvents]


def test_null_probe_is_one_connection_and_a_real_handshake(
    ctx: Ctx, prober: Prober, watch: Watch
) -> None:
    router, target = bound(ctx, zmq.ROUTER)
    events = watch(router)
    assert outcome(prober, target) == "ok"
    # The peer's libzmq accepted one connection, finished its handshake with us (so our
    # READY is one libzmq accepts), and saw it end when the probe closed it.
    wait_until(lambda: events.saw("DISCONNECTED", 1), timeout=5, what="the probe's disconnect")
    counts = events.drain()
    assert counts.get("ACCEPTED") == 1, counts
    assert counts.get("HANDSHAKE_SUCCEEDED") == 1, counts
    assert not any(name.startswith("HANDSHAKE_FAILED") for name in counts), counts


def test_incompatible_type_is_protocol_and_compatible_succeeds(
    ctx: Ctx, prober: Prober, watch: Watch
) -> None:
    pub, target = bound(ctx, zmq.PUB)  # libzmq: a DEALER may not talk to a PUB
    events = watch(pub)
    assert outcome(prober, target) == "protocol"
    assert outcome(prober, target, "sub") == "ok"
    wait_until(
        lambda: events.saw("HANDSHAKE_SUCCEEDED", 1) and events.saw("DISCONNECTED", 2),
        timeout=5,
        what="the PUB's handshake with the SUB probe",
    )
    assert events.drain()["ACCEPTED"] == 2  # one connection per probe


@pytest.fixture
def authenticator(ctx: Ctx) -> Iterator[ThreadAuthenticator]:
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        yield auth
    finally:
        auth.stop()


def test_plain_right_and_wrong_credentials(
    ctx: Ctx, prober: Prober, authenticator: ThreadAuthenticator, watch: Watch
) -> None:
    authenticator.configure_plain(domain="*", passwords={USER.decode(): PASSWORD.decode()})
    router, target = bound(ctx, zmq.ROUTER, plain_server=True)
    events = watch(router)
    assert outcome(prober, target, "plain") == "ok"
    wait_until(lambda: events.saw("HANDSHAKE_SUCCEEDED", 1), timeout=5, what="PLAIN handshake")
    assert outcome(prober, target, "plain_wrong") == "auth"
    wait_until(lambda: events.saw("HANDSHAKE_FAILED_AUTH", 1), timeout=5, what="ZAP refusal")
    # PLAIN against the right credentials but a type the peer refuses (after INITIATE).
    assert outcome(prober, target, "plain_sub") == "protocol"
    assert outcome(prober, target) == "mechanism_mismatch"  # NULL against PLAIN


def test_plain_server_without_zap_handler_is_auth(ctx: Ctx, prober: Prober) -> None:
    # libzmq's PLAIN server closes on a HELLO when no ZAP handler can check it.
    _router, target = bound(ctx, zmq.ROUTER, plain_server=True)
    assert outcome(prober, target, "plain") == "auth"


def test_null_server_whose_zap_refuses_is_auth(
    ctx: Ctx, prober: Prober, authenticator: ThreadAuthenticator, watch: Watch
) -> None:
    authenticator.deny("127.0.0.1")
    # NULL asks ZAP only when the socket has a ZAP domain (mechanism_base_t::zap_required).
    router, target = bound(ctx, zmq.ROUTER, zap_domain=b"probed")
    events = watch(router)
    assert outcome(prober, target) == "auth"
    wait_until(lambda: events.saw("HANDSHAKE_FAILED_AUTH", 1), timeout=5, what="ZAP refusal")


# What a NULL DEALER probe sends: libzmq's greeting and READY, octet for octet.
PROBER_SENDS = our_greeting("NULL") + command(
    b"READY", encode_property("Socket-Type", b"DEALER") + encode_property("Identity", b"")
)


class ScriptedPeer:
    """A raw TCP listener that answers each connection with a valid ZMTP 3.1 NULL greeting
    (all 64 octets at once), reads what the prober sends after it, then sends `then`
    and keeps the connection open until the test ends."""

    def __init__(self, then: bytes, close_after: bool = False) -> None:
        self.then = then
        self.close_after = close_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self.received = bytearray()
        self.accepted = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        held = []
        greeting = our_greeting("NULL")  # a ZMTP 3.1 NULL peer's greeting is the same
        deadline = time.monotonic() + 30
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            held.append(conn)
            conn.settimeout(5)
            conn.sendall(greeting)
            while len(self.received) < len(PROBER_SENDS):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.received += chunk
            conn.sendall(self.then)
            if self.close_after:
                conn.close()
        for conn in held:
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedPeer]]:
    peers: list[ScriptedPeer] = []
    yield peers
    for peer in peers:
        peer.close()


def ready(socket_type: bytes) -> bytes:
    return command(b"READY", encode_property("Socket-Type", socket_type))


@pytest.mark.parametrize(
    ("then", "reason"),
    [
        (ready(b"ROUTER") + command(b"READY"), "ok"),  # what follows READY is not read
        (ready(b"PUB"), "protocol"),  # a DEALER may not talk to a PUB
        (b"\x06" + struct.pack(">Q", 1 << 40), "protocol"),  # a 1 TiB frame, refused unread
        (b"\x06" + struct.pack(">Q", MAX_COMMAND_SIZE + 1), "protocol"),
        (command(b"HELLO", b"\x00\x00"), "protocol"),  # not a NULL command
        (bytes([0x04, 3, 10]) + b"RE", "protocol"),  # a name longer than its frame
        (command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x10ROUTER"), "protocol"),  # truncated
        (command(b"READY", encode_property("Socket-Type", b"ROUTER") + b"\x00"), "protocol"),
        (command(b"ERROR", b"\x03400"), "auth"),  # a ZAP status
        (command(b"ERROR", b"\x05weird"), "protocol"),
        (command(b"ERROR", b"\x09400"), "protocol"),  # a reason longer than the command
    ],
)
def test_scripted_peer(
    prober: Prober, scripted: list[ScriptedPeer], then: bytes, reason: str
) -> None:
    peer = ScriptedPeer(then)
    scripted.append(peer)
    assert outcome(prober, peer.target) == reason
    assert peer.accepted == 1
    assert bytes(peer.received) == PROBER_SENDS


def test_peer_silent_after_our_ready_is_handshake_timeout(
    prober: Prober, scripted: list[ScriptedPeer]
) -> None:
    peer = ScriptedPeer(b"")
    scripted.append(peer)
    started = time.monotonic()
    assert outcome(prober, peer.target, timeout="1.5") == "handshake_timeout"
    took = time.monotonic() - started
    assert 0.9 <= took < 1.5, took  # the whole budget (1.5 s - 0.5 s offset), not more


def test_peer_that_closes_after_our_ready_is_protocol(
    prober: Prober, scripted: list[ScriptedPeer]
) -> None:
    peer = ScriptedPeer(b"", close_after=True)
    scripted.append(peer)
    assert outcome(prober, peer.target) == "protocol"


def test_zmtp2_peer_greeting_is_its_handshake(prober: Prober) -> None:
    # A ZMTP/2.0 peer (libzmq 3.x): signature, revision 1, its socket type (6: ROUTER). It
    # has no security handshake; libzmq 4.3.5 would never report one as succeeded.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        accepted: list[socket.socket] = []

        def serve() -> None:
            for _ in range(2):  # one connection per probe
                with contextlib.suppress(TimeoutError):
                    conn, _ = listener.accept()
                    accepted.append(conn)
                    conn.sendall(b"\xff" + bytes(7) + b"\x01\x7f" + b"\x01\x06")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            target = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
            assert outcome(prober, target) == "ok"
            assert outcome(prober, target, "plain") == "mechanism_mismatch"
        finally:
            thread.join(5)
            for conn in accepted:
                conn.close()
        assert len(accepted) == 2


def test_properties_parse_as_libzmq() -> None:
    props = encode_property("Socket-Type", b"ROUTER") + encode_property("Identity", b"")
    assert parse_properties(props) == {"Socket-Type": b"ROUTER", "Identity": b""}
    assert parse_properties(b"") == {}
    for bad in (props + b"\x00", props[:-1], b"\x05Sock"):
        with pytest.raises(Exception) as err:
            parse_properties(bad)
        assert getattr(err.value, "reason", None) == "protocol", bad


def test_long_command_uses_the_large_frame() -> None:
    short, long = command(b"READY", bytes(249)), command(b"READY", bytes(250))
    assert short[:2] == bytes([0x04, 255]) and len(short) == 257
    assert long[:9] == b"\x06" + struct.pack(">Q", 256) and len(long) == 265


def test_debug_log_shows_the_handshake_steps(
    ctx: Ctx, prober: Prober, authenticator: ThreadAuthenticator
) -> None:
    authenticator.configure_plain(domain="*", passwords={USER.decode(): PASSWORD.decode()})
    _router, target = bound(ctx, zmq.ROUTER)
    _plain, plain_target = bound(ctx, zmq.ROUTER, plain_server=True)

    def logs(target: str, module: str) -> str:
        query = {"target": [target], "module": [module], "debug": ["true"]}
        _, _, body = prober.handle_probe(query, {})
        return body.decode().split("\n\n\nMetrics that would have been returned:\n")[0]

    null = logs(target, "zmtp")
    for step in (
        "Received the peer's greeting",
        "Sent the rest of our greeting and READY",
        "Received the peer's READY",
        "Handshake succeeded",
    ):
        assert f'msg="{step}"' in null, (step, null)
    assert "socket_type=ROUTER" in null and "libzmq handshake started" not in null
    plain = logs(plain_target, "plain")
    for step in ("Sent the rest of our greeting and HELLO", "Sent INITIATE", "Handshake succeeded"):
        assert f'msg="{step}"' in plain, (step, plain)
    assert "command=WELCOME" in plain and "command=READY" in plain
