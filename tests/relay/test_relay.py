"""Relay (issue 16): application processes send their sockets' cumulative state to a
sidecar daemon (exporter/relay/: wire, sender, server; docs/relay.md). Real daemons, real
senders, real SIGKILLs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import SocketSnapshot, SocketState, apply_event, snapshot_socket
from exporter.relay.sender import RelaySender
from exporter.relay.server import Peer, RelayServer
from exporter.relay.wire import (
    REJECT_REASONS,
    RejectedMessage,
    RelayLimits,
    decode,
    encode,
    encode_socket,
)

from helpers import (
    ROOT,
    Daemon,
    established_in,
    free_port,
    run_cli,
    start_script,
    total,
    value,
    wait_until,
)

LIMITS = RelayLimits(max_message_bytes=64 * 1024)


def _relay_config(endpoint: str, expire: str = "5m") -> str:
    return textwrap.dedent(
        f"""\
        relay:
          listen: ["{endpoint}"]
          expire: {expire}
          ipc_mode: "0600"
          max_message_bytes: 65536
        """
    )


def _ipc(tmp: Path) -> str:
    return f"ipc://{tmp}/relay.sock"


# -- the codec ------------------------------------------------------------------------------


def _state() -> SocketState:
    sock = SocketState("backend", "ROUTER", {"team": "a"}, EndpointMap(("tcp://*:5555",), ()))
    sock.endpoint_map.add_resolved("tcp://0.0.0.0:5555", "tcp://*:5555")
    for event, val in [
        (Event.LISTENING, 9),
        (Event.ACCEPTED, 10),
        (Event.ACCEPTED, 11),
        (Event.DISCONNECTED, 10),
        (Event.HANDSHAKE_FAILED_PROTOCOL, 0x11000001),
        (Event.BIND_FAILED, 98),
    ]:
        apply_event(sock, int(event), val, "tcp://0.0.0.0:5555", 1.5)
    apply_event(sock, 0x8000, 0, "", 2.0)  # an event id this exporter does not know
    return sock


def test_state_round_trips_with_process_label() -> None:
    snap = snapshot_socket(_state())
    data = encode("state", "host/1", "abc", 3, socket=encode_socket(snap))
    msg = decode(data, LIMITS)
    assert (msg.type, msg.process, msg.instance, msg.seq) == ("state", "host/1", "abc", 3)
    assert msg.socket is not None
    assert msg.socket.labels == {"team": "a", "process": "host/1"}
    # Everything a relayed series shows travels; the sender's own fds and addresses do not
    # (a relayed socket has no rows in /api/v1/connections).
    local = [dataclasses.replace(ep, live=(), address="") for ep in snap.endpoints]
    assert list(msg.socket.endpoints) == local
    assert msg.socket.unknown_events == {0x8000: 1}


def test_sender_labels_never_override_reserved_ones() -> None:
    snap = snapshot_socket(_state())
    body = encode_socket(snap)
    body["labels"] = {"socket": "x", "endpoint": "y", "process": "z", "job": "j", "ok": "1"}
    msg = decode(encode("state", "p", "i", 1, socket=body), LIMITS)
    assert msg.socket is not None and msg.socket.labels == {"ok": "1", "process": "p"}


def _unknown_events(value: dict[str, int]) -> bytes:
    body = encode_socket(snapshot_socket(_state()))
    body["unknown_events"] = value
    return encode("state", "p", "i", 1, socket=body)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "malformed"),
        (b"[1,2]", "malformed"),
        (b'{"v":2,"type":"hello","process":"p","instance":"i","seq":1}', "version"),
        (b'{"v":true,"type":"hello","process":"p","instance":"i","seq":1}', "version"),
        (b'{"v":1,"type":"nope","process":"p","instance":"i","seq":1}', "invalid"),
        (b'{"v":1,"type":"hello","process":"","instance":"i","seq":1}', "invalid"),
        (b'{"v":1,"type":"hello","process":"p","instance":"i","seq":-1}', "invalid"),
        (b'{"v":1,"type":"state","process":"p","instance":"i","seq":1,"socket":[]}', "invalid"),
        (b"x" * (64 * 1024 + 1), "too_large"),
        (_unknown_events({"\u00b2": 1}), "invalid"),  # a digit to isdigit(), not to int()
        (_unknown_events({"99999": 1}), "invalid"),
        (_unknown_events({"1" * 5000: 1}), "invalid"),
        (b"[" * 100_000 + b"]" * 100_000, "too_large"),
    ],
)
def test_rejections_have_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RejectedMessage) as err:
        decode(data, LIMITS)
    assert err.value.reason == reason


def test_unbounded_label_values_are_refused() -> None:
    body = encode_socket(snapshot_socket(_state()))
    body["endpoints"][0]["handshake_failures"] = [
        {"reason": "no_detail", "error": "zmtp_cryptographic", "count": 1}
    ]
    with pytest.raises(RejectedMessage, match="invalid"):
        decode(encode("state", "p", "i", 1, socket=body), LIMITS)
    body = encode_socket(snapshot_socket(_state()))
    body["endpoints"][0]["errno_counts"] = {"BIND_FAILED": {"ENOTANERRNO": 1}}
    with pytest.raises(RejectedMessage, match="invalid"):
        decode(encode("state", "p", "i", 1, socket=body), LIMITS)


# Any text, lone surrogates and control characters included; any number, huge and
# non-finite ones included (Python's json writes and reads NaN and Infinity).
_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from([2**53, 2**53 + 1, 2**64, 1e308, -1e308, "\ud800", "a\x00"])
    | _any_text
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5)
    ),
    max_leaves=30,
)


def _mutated(draw: st.DrawFn) -> bytes:
    # A valid state message with one field replaced by arbitrary JSON.
    body = encode_socket(snapshot_socket(_state()))
    msg = json.loads(encode("state", "p", "i", 1, socket=body))
    paths = [("socket",), ("socket", "endpoints"), ("socket", "labels"), ("seq",), ("v",)]
    paths += [("process",), ("instance",), ("socket", "labels", "team")]
    paths += [("socket", "unknown_events"), ("socket", "type"), ("socket", "name")]
    ep_keys = list(body["endpoints"][0])
    path = draw(st.sampled_from(paths + [("socket", "endpoints", 0, k) for k in ep_keys]))
    target = msg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(_json)
    return json.dumps(msg).encode()


@settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    st.one_of(
        st.binary(max_size=300),
        _json.map(lambda v: json.dumps(v).encode()),
        st.composite(lambda draw: _mutated(draw))(),
    )
)
def test_decoder_fuzz_never_crashes(data: bytes) -> None:
    start = time.monotonic()
    try:
        msg = decode(data, LIMITS)
    except RejectedMessage as err:
        assert err.reason in REJECT_REASONS
    else:
        assert msg.type in ("hello", "state", "gone", "heartbeat", "bye")
        # What gets through can be written: UTF-8 text, finite bounded numbers.
        texts = [msg.process, msg.instance, msg.name]
        if msg.socket is not None:
            texts += [msg.socket.name, *msg.socket.labels.values()]
            for ep in msg.socket.endpoints:
                texts.append(ep.endpoint)
                assert 0 <= ep.last_event_time <= 253_402_300_799
                assert 0 <= ep.connections <= 2**53
        for text in texts:
            text.encode("utf-8")
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
        # Identity games: the message from one of two connections.
        peer = Peer(b"c1" if len(data) % 2 else b"c2")
        assert _FUZZ_SERVER.apply(msg, peer, time.monotonic()) in (None, *REJECT_REASONS)
    assert time.monotonic() - start < 0.5


_FUZZ_SERVER = RelayServer(("inproc://fuzz-unused",))


# -- against a real daemon ------------------------------------------------------------------


def test_plain_pyzmq_sender_following_the_doc(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    with Daemon(_relay_config(endpoint)) as daemon:
        assert os.stat(endpoint.removeprefix("ipc://")).st_mode & 0o777 == 0o600
        sender = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "relay_plain_sender.py"), endpoint, "plain/1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert sender.stdout is not None and sender.stdout.readline().strip() == "sent"
            labels = {"socket": "orders", "process": "plain/1", "endpoint": "tcp://*:5555"}

            def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
                s = daemon.scrape()
                ok = value(s, "zmq_accepted_total", **labels) == 7
                ok = (
                    ok
                    and value(s, "zmq_exporter_relay_messages_rejected_total", reason="too_large")
                    == 1
                )
                return s if ok else None

            found = wait_until(scraped, timeout=10, what="the plain sender's state on /metrics")
            assert found is not None
            s = found
            assert value(s, "zmq_connections", **labels) == 2
            assert value(s, "zmq_listening", **labels) == 1
            assert value(s, "zmq_accepted_total", team="payments", process="plain/1") == 7
            failed = value(
                s,
                "zmq_handshake_failed_total",
                reason="protocol",
                error="zmtp_cryptographic",
                **labels,
            )
            assert failed == 2
            # A sender's `socket` label never replaces the daemon's.
            assert total(s, "zmq_accepted_total", socket="not-allowed") == 0
            for reason in ("malformed", "version", "too_large"):
                assert value(s, "zmq_exporter_relay_messages_rejected_total", reason=reason) == 1
            assert value(s, "zmq_exporter_relay_processes") == 1
            assert value(s, "zmq_socket_info", process="plain/1", type="ROUTER") == 1
        finally:
            assert sender.stdin is not None
            sender.stdin.close()
            sender.wait(10)
        # bye: a process that said goodbye holds no connections.
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", process="plain/1") == 0,
            timeout=5,
            what="gauges at 0 after bye",
        )


APP = textwrap.dedent(
    """\
    import socket, sys, time, zmq, exporter
    relay, mode, n = sys.argv[1] or None, sys.argv[2], int(sys.argv[3])  # "": from env
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(router, "backend", labels={"team": "t"}, relay=relay,
                                 relay_id="app-1", registry=None)
    handle.bind("tcp://127.0.0.1:*")
    port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    print("port", port, flush=True)
    def accepted():
        snap = handle.snapshot()
        return sum(ep.counts.get(zmq.EVENT_ACCEPTED, 0) for ep in snap.endpoints)
    if mode == "storm":
        sys.stdin.readline()  # go
        for i in range(n):  # raw TCP connects: each is exactly one ACCEPTED
            s = socket.create_connection(("127.0.0.1", port))
            s.close()
            if i % 100 == 99:
                time.sleep(0.02)
        deadline = time.monotonic() + 20
        while accepted() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        print("done", accepted(), flush=True)
    else:
        other = zmq.Context()
        peers = [other.socket(zmq.DEALER) for _ in range(n)]
        for p in peers:
            p.connect(f"tcp://127.0.0.1:{port}")
        print("connected", flush=True)
    sys.stdin.readline()  # hold until told, or killed
    """
)


def _app(
    tmp: Path, endpoint: str, mode: str, n: int, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return start_script(tmp / "app.py", APP, endpoint, mode, str(n), env=env)


def _line(proc: subprocess.Popen[str], word: str, timeout: float = 20) -> list[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"app exited ({proc.poll()}) before {word!r}")
        if line.startswith(word):
            return line.split()
    raise AssertionError(f"no {word!r} within {timeout}s")


def _accepted(daemon: Daemon) -> float:
    try:
        return total(daemon.scrape(), "zmq_accepted_total", process="app-1", socket="backend")
    except OSError:
        return -1


def test_exact_across_sidecar_sigkill_and_restart(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    first = Daemon(_relay_config(endpoint)).start()
    app = _app(tmp_path, endpoint, "storm", 4000)
    second: Daemon | None = None
    try:
        port = int(_line(app, "port")[1])
        assert app.stdin is not None
        app.stdin.write("go\n")
        app.stdin.flush()
        wait_until(lambda: _accepted(first) > 0, timeout=10, what="relayed counts")
        assert first.proc is not None
        first.proc.kill()  # SIGKILL mid-storm
        first.proc.wait(5)
        time.sleep(0.3)  # down for a while: the sender's state keeps moving meanwhile
        second = Daemon(_relay_config(endpoint), port=first.port).start()
        truth = int(_line(app, "done", timeout=60)[1])
        assert truth == 4000  # the app's own count equals the connects it made
        got = wait_until(
            lambda: (v := _accepted(second)) == truth and v,
            timeout=15,
            what=f"relayed zmq_accepted_total == {truth}",
        )
        assert got == truth
        s = second.scrape()
        assert value(s, "zmq_exporter_relay_processes") == 1
        # Gauges: the kernel's count of the sender's connections on that port (once the
        # last disconnects of the storm reached the sender's monitor and the relay).
        wait_until(
            lambda: (
                total(second.scrape(), "zmq_connections", process="app-1")
                == established_in(app.pid, local_port=port)
            ),
            timeout=10,
            what="relayed zmq_connections == the sender's ESTABLISHED count",
        )
    finally:
        app.kill()
        app.wait(5)
        if first.proc is not None and first.proc.poll() is None:
            first.stop()
        if second is not None:
            second.stop()


def test_sender_sigkill_zeroes_gauges_then_expires(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    with Daemon(_relay_config(endpoint, expire="2s")) as daemon:
        # The endpoint from ZMQ_EXPORTER_RELAY: no code change per deployment.
        app = _app(tmp_path, "", "hold", 3, env={"ZMQ_EXPORTER_RELAY": endpoint})
        try:
            port = int(_line(app, "port")[1])
            _line(app, "connected")
            wait_until(
                lambda: total(daemon.scrape(), "zmq_connections", process="app-1") == 3,
                timeout=10,
                what="3 relayed connections",
            )
            # The relayed gauge is the kernel's count of the sender's connections.
            assert established_in(app.pid, local_port=port) == 3
            app.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            wait_until(
                lambda: total(daemon.scrape(), "zmq_connections", process="app-1") == 0,
                timeout=1.0,
                interval=0.02,
                what="gauges at 0 within 1 s of SIGKILL",
            )
            zeroed = time.monotonic() - killed
            assert zeroed < 1.0
            s = daemon.scrape()
            assert total(s, "zmq_accepted_total", process="app-1") == 3  # counters stay
            assert value(s, "zmq_exporter_relay_processes") == 0
            wait_until(
                lambda: not any(("process", "app-1") in ls for (_, ls) in daemon.scrape()),
                timeout=6,
                what="series gone after expire",
            )
        finally:
            app.kill()
            app.wait(5)


def test_relay_config_requires_curve_off_loopback(tmp_path: Path) -> None:
    from exporter.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="needs CURVE"):
        parse_config(_relay_config("tcp://0.0.0.0:5999"), str(tmp_path / "c.yml"))
    settings_ = parse_config(_relay_config("tcp://127.0.0.1:5999"), str(tmp_path / "c.yml"))
    assert settings_.relay is not None and settings_.relay.listen == ("tcp://127.0.0.1:5999",)
    key = tmp_path / "server.key"
    key.write_text(zmq.curve_keypair()[1].decode())
    text = _relay_config("tcp://0.0.0.0:5999") + f"  curve_secretkey_file: {key}\n"
    settings_ = parse_config(text, str(tmp_path / "c.yml"))
    assert settings_.relay is not None and settings_.relay.curve_secretkey is not None


# -- docs ------------------------------------------------------------------------------------


def test_docs_example_message_is_valid() -> None:
    text = (ROOT / "docs" / "relay.md").read_text()
    block = text.split("```json\n", 1)[1].split("```", 1)[0]
    msg = decode(block.encode(), LIMITS)
    assert msg.type == "state" and msg.socket is not None
    assert msg.socket.labels == {"team": "payments", "process": "web-7/4242"}


def _relay_usage() -> str:
    """docs/relay.md before its wire format: the `relay:` section and the relay's metrics."""
    return (ROOT / "docs" / "relay.md").read_text().split("\n## Wire format", 1)[0]


def test_docs_relay_table_is_generated() -> None:
    from exporter.core.metrics import markdown

    assert markdown("relay") in _relay_usage()


def test_docs_relay_config_loads(tmp_path: Path) -> None:
    from exporter.config import parse_config

    section = _relay_usage()
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    relay = parse_config(block, str(tmp_path / "c.yml")).relay
    assert relay is not None and relay.expire == 300 and relay.ipc_mode == 0o660


# -- in-process: the sender and the server alone ----------------------------------------------


def _snap(name: str = "backend", accepted: int = 2) -> SocketSnapshot:
    sock = _state()  # 2 accepted already
    sock.name = name
    for _ in range(accepted - 2):
        apply_event(sock, int(Event.ACCEPTED), 99, "tcp://0.0.0.0:5555", 3.0)
    return snapshot_socket(sock)


def _accepted_of(sock: SocketSnapshot) -> int:
    return sum(ep.counts.get(Event.ACCEPTED, 0) for ep in sock.endpoints)


def _raw_dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    return dealer


def test_curve_relay_and_unauthenticated_senders_rejected() -> None:
    public, secret = zmq.curve_keypair()
    server = RelayServer(("tcp://127.0.0.1:*",), curve_secret_key=secret)
    server.start()
    endpoint = server.bound[0]
    snap = _snap(accepted=5)
    sender = RelaySender(endpoint, lambda: (snap,), "curve/1", curve_server_key=public)
    sender.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        got = wait_until(server.snapshot_sockets, timeout=5, what="state over CURVE")
        assert [_accepted_of(s) for s in got] == [5]
        # A NULL sender against the CURVE server: its handshake fails, nothing gets in.
        plain = _raw_dealer(ctx, endpoint)
        plain.send(encode("hello", "intruder/1", "x", 1), zmq.NOBLOCK)
        wait_until(lambda: server.stats.rejected["handshake"] >= 1, timeout=5, what="counted")
        assert set(server.processes()) == {"curve/1"}
    finally:
        sender.stop()
        server.stop()
        ctx.destroy(linger=0)


def test_limits_gone_and_multiframe_are_enforced(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    server = RelayServer((endpoint,), limits=RelayLimits(2, 2, 64 * 1024))
    server.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        dealer = _raw_dealer(ctx, endpoint)
        for n, process in enumerate(("a", "b", "c")):  # 3 processes, the limit is 2
            dealer.send(encode("hello", process, "i", n + 1))
        for n, name in enumerate(("s1", "s2", "s3")):  # 3 sockets of "a", the limit is 2
            body = encode_socket(_snap(name))
            dealer.send(encode("state", "a", "i", 10 + n, socket=body))
        dealer.send_multipart([b"{}", b"{}"])
        wait_until(
            lambda: (
                server.stats.rejected["max_sockets"] == 1
                and server.stats.rejected["max_processes"] == 1
                and server.stats.rejected["malformed"] == 1
            ),
            timeout=5,
            what="rejections counted",
        )
        assert set(server.processes()) == {"a", "b"}
        assert sorted(s.name for s in server.snapshot_sockets()) == ["s1", "s2"]
        # An older state never replaces a newer one; gone removes the socket at once.
        old = encode_socket(_snap("s1", accepted=9))
        dealer.send(encode("state", "a", "i", 5, socket=old))
        dealer.send(encode("gone", "a", "i", 20, socket="s2"))
        wait_until(
            lambda: [s.name for s in server.snapshot_sockets()] == ["s1"], timeout=5, what="gone"
        )
        assert [_accepted_of(s) for s in server.snapshot_sockets()] == [2]
        # A restarted process (new instance) starts afresh.
        dealer.send(encode("state", "a", "j", 1, socket=encode_socket(_snap("s9"))))
        wait_until(
            lambda: [s.name for s in server.snapshot_sockets()] == ["s9"], timeout=5, what="new"
        )
    finally:
        server.stop()
        ctx.destroy(linger=0)


def test_sender_without_sidecar_never_blocks_then_catches_up(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    calls = 0

    def source() -> tuple[SocketSnapshot, ...]:
        nonlocal calls
        calls += 1
        return (_snap(accepted=2 + calls),)  # a new state on every tick

    sender = RelaySender(endpoint, source, "late/1", coalesce=0.01)
    sender.start()
    server: RelayServer | None = None
    try:
        # No connection: with IMMEDIATE every send fails at once (EAGAIN), nothing queues.
        wait_until(lambda: sender.deferred > 50, timeout=5, what="ticks with no sidecar")
        assert sender.sent == 0
        server = RelayServer((endpoint,))
        server.start()
        got = wait_until(server.snapshot_sockets, timeout=5, what="state after the sidecar came")
        assert _accepted_of(got[0]) > 2  # a state made after the sidecar came
    finally:
        start = time.monotonic()
        sender.stop()
        assert time.monotonic() - start < 1.0
        if server is not None:
            server.stop()


def test_unbindable_relay_endpoint_exits_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(_relay_config(f"ipc://{tmp_path}/no/such/dir/relay.sock"))
    done = run_cli(f"--config.file={config}", "--web.listen-address=127.0.0.1:0", timeout=30)
    assert done.returncode != 0
    assert "cannot start" in done.stderr and "Traceback" not in done.stderr


def test_live_server_survives_garbage(tmp_path: Path) -> None:
    # Every kind of bad message at a running server, then a good one still gets in.
    endpoint = _ipc(tmp_path)
    server = RelayServer((endpoint,), limits=LIMITS)
    server.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sent = 0

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode())))
    def blast(data: bytes) -> None:
        nonlocal sent
        dealer.send(data)
        sent += 1

    try:
        dealer = _raw_dealer(ctx, endpoint)
        blast()
        dealer.send_multipart([b"a", b"b", b"c"])
        dealer.send(encode("state", "good/1", "i", 1, socket=encode_socket(_snap())))
        wait_until(
            lambda: [s.labels["process"] for s in server.snapshot_sockets()] == ["good/1"],
            timeout=10,
            what="the good message after the garbage",
        )
        with server._lock:
            rejected = sum(server.stats.rejected.values())
            received = server.stats.received
        assert rejected + received == sent + 2  # every message accounted for
        assert server._thread.is_alive()
    finally:
        server.stop()
        ctx.destroy(linger=0)


GONE_APP = textwrap.dedent(
    """\
    import sys, zmq, exporter
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    ha = exporter.instrument(a, "a", relay=sys.argv[1], relay_id="lib/1", registry=None)
    try:
        exporter.instrument(b, "b", relay=sys.argv[1], relay_id="other", registry=None)
    except exporter.InstrumentError as err:
        print("refused", err, flush=True)
    hb = exporter.instrument(b, "b", relay=sys.argv[1], registry=None)  # not left attached
    print("both", flush=True)
    sys.stdin.readline()
    hb.close()
    print("closed", flush=True)
    sys.stdin.readline()
    """
)


def test_library_relay_id_conflict_and_close_sends_gone(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    server = RelayServer((endpoint,))
    server.start()
    app = start_script(tmp_path / "gone_app.py", GONE_APP, endpoint)
    try:
        assert "lib/1" in " ".join(_line(app, "refused"))
        _line(app, "both")

        def names() -> list[str]:
            return sorted(s.name for s in server.snapshot_sockets())

        wait_until(lambda: names() == ["a", "b"], timeout=5, what="both relayed as lib/1")
        assert set(server.processes()) == {"lib/1"}
        assert app.stdin is not None
        app.stdin.write("\n")
        app.stdin.flush()
        _line(app, "closed")
        wait_until(lambda: names() == ["a"], timeout=5, what="b gone after close()")
    finally:
        app.kill()
        app.wait(5)
        server.stop()


def _const(socks: tuple[SocketSnapshot, ...]) -> Callable[[], tuple[SocketSnapshot, ...]]:
    return lambda: socks


def test_fifty_senders_twenty_sockets_each_totals_exact(tmp_path: Path) -> None:
    # 50 senders (in this process: each with its own context, DEALER and thread, as in 50
    # processes) x 20 sockets, every socket with its own count, into a real daemon.
    endpoint = _ipc(tmp_path)
    with Daemon(_relay_config(endpoint)) as daemon:
        senders = []
        truth = 0
        for p in range(50):
            socks = tuple(_snap(f"s{n}", accepted=2 + p * 20 + n) for n in range(20))
            truth += sum(_accepted_of(s) for s in socks)
            sender = RelaySender(endpoint, _const(socks), f"proc-{p}")
            senders.append(sender)
            sender.start()
        try:

            def relayed() -> bool:
                s = daemon.scrape()
                return (
                    total(s, "zmq_accepted_total") == truth
                    and value(s, "zmq_exporter_relay_processes") == 50
                    and value(s, "zmq_exporter_relay_sockets") == 1000
                )

            wait_until(relayed, timeout=30, interval=0.2, what=f"{truth} accepted in total")
        finally:
            for sender in senders:
                sender.stop()


def test_relay_series_gauge_is_the_budget_check_and_drops_when_a_process_expires(
    tmp_path: Path,
) -> None:
    # K senders with known sockets: zmq_exporter_relay_series is the count the server
    # checks states against (series_of each socket), which is also what the relayed
    # series on /metrics number; zmq_exporter_relay_series_limit is limits.max_series less
    # the config's own estimate, as a reload recomputes it. A sender that leaves (bye)
    # keeps its series (zeroed gauges) until it expires, then the gauge drops by them.
    from exporter.config.cardinality import FIXED_SERIES
    from exporter.core.metrics import RELAY_FAMILIES
    from exporter.relay.server import series_of

    endpoint = _ipc(tmp_path)
    own = FIXED_SERIES + sum(f.series for f in RELAY_FAMILIES)

    def config(max_series: int) -> str:
        return f"limits: {{max_series: {max_series}}}\n" + _relay_config(endpoint, expire="3s")

    with Daemon(config(own + 5000)) as daemon:
        assert daemon.config_path is not None and daemon.proc is not None
        socket_counts = {"p-0": 2, "p-1": 5, "p-2": 1}
        senders: dict[str, RelaySender] = {}
        budget: dict[str, int] = {}
        try:
            for process, count in socket_counts.items():
                socks = tuple(_snap(f"s{n}", accepted=2 + n) for n in range(count))
                budget[process] = sum(series_of(s) for s in socks)
                senders[process] = RelaySender(endpoint, _const(socks), process)
                senders[process].start()
            held = sum(budget.values())

            def relayed_rows(samples: dict[Any, float]) -> int:
                return sum(1 for _, labels in samples if any(k == "process" for k, _ in labels))

            def shows(series: int) -> bool:
                s = daemon.scrape()
                return value(s, "zmq_exporter_relay_series") == series and value(
                    s, "zmq_exporter_relay_sockets"
                ) == sum(socket_counts.values())

            wait_until(lambda: shows(held), timeout=10, what=f"{held} relayed series")
            print(f"\nrelayed series per process: {budget}")
            samples = daemon.scrape()
            assert relayed_rows(samples) == held, (relayed_rows(samples), held)
            assert value(samples, "zmq_exporter_relay_series_limit") == 5000
            assert value(samples, "zmq_exporter_relay_processes") == len(socket_counts)

            # p-1 leaves: held (its gauges at 0) until `expire`, then its series go.
            senders.pop("p-1").stop()
            wait_until(
                lambda: value(daemon.scrape(), "zmq_exporter_relay_processes") == 2,
                timeout=5,
                what="p-1 down",
            )
            assert value(daemon.scrape(), "zmq_exporter_relay_series") == held
            socket_counts.pop("p-1")
            held -= budget["p-1"]
            wait_until(lambda: shows(held), timeout=10, what=f"{held} series after p-1 expired")
            assert relayed_rows(daemon.scrape()) == held

            # A reload with another limits.max_series: a new budget, the series held stay.
            daemon.config_path.write_text(config(own + 300))
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: value(daemon.scrape(), "zmq_exporter_relay_series_limit") == 300,
                timeout=10,
                what="the budget after a reload",
            )
            assert value(daemon.scrape(), "zmq_exporter_relay_series") == held
        finally:
            for sender in senders.values():
                sender.stop()


def test_silent_sender_gauges_zero_after_three_heartbeats(tmp_path: Path) -> None:
    # A sender that stops talking but keeps its connection (hung, SIGSTOPped): after 3
    # heartbeats of silence its gauges are 0; a message makes it live again.
    endpoint = _ipc(tmp_path)
    server = RelayServer((endpoint,))
    server.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        dealer = _raw_dealer(ctx, endpoint)
        dealer.send(encode("hello", "quiet/1", "i", 1, heartbeat_ms=200))
        body = encode_socket(_snap())
        body["endpoints"][0]["connections"] = 4
        dealer.send(encode("state", "quiet/1", "i", 2, socket=body))

        def connections() -> int:
            return sum(ep.connections for s in server.snapshot_sockets() for ep in s.endpoints)

        wait_until(lambda: connections() == 4, timeout=5, what="4 connections relayed")
        start = time.monotonic()
        wait_until(lambda: connections() == 0, timeout=3, what="gauges 0 after silence")
        assert time.monotonic() - start < 2.0  # 3 x 200 ms, checked every 100 ms, + slack
        assert server.processes() == {"quiet/1": False}
        dealer.send(encode("heartbeat", "quiet/1", "i", 3, heartbeat_ms=200))
        wait_until(lambda: connections() == 4, timeout=5, what="live again")
    finally:
        server.stop()
        ctx.destroy(linger=0)


def test_library_sender_over_curve_tcp_from_the_environment(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    key = tmp_path / "relay.key_secret"
    key.write_text(secret.decode())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = _relay_config(endpoint) + f"  curve_secretkey_file: {key}\n"
    with Daemon(config) as daemon:
        env = {"ZMQ_EXPORTER_RELAY": endpoint, "ZMQ_EXPORTER_RELAY_SERVER_KEY": public.decode()}
        app = _app(tmp_path, "", "hold", 2, env=env)
        try:
            _line(app, "connected")
            wait_until(
                lambda: total(daemon.scrape(), "zmq_connections", process="app-1") == 2,
                timeout=10,
                what="2 connections relayed over CURVE",
            )
            s = daemon.scrape()
            assert value(s, "zmq_exporter_relay_messages_rejected_total", reason="handshake") == 0
        finally:
            app.kill()
            app.wait(5)


def test_reload_keeps_the_relay_and_says_a_change_needs_a_restart(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    with Daemon(_relay_config(endpoint)) as daemon:
        assert daemon.config_path is not None and daemon.proc is not None
        daemon.config_path.write_text(_relay_config(endpoint, expire="1m"))
        daemon.proc.send_signal(signal.SIGHUP)
        try:
            wait_until(lambda: "restart to apply" in daemon.logs(), timeout=10, what="warning")
        except AssertionError:
            raise AssertionError(daemon.logs()) from None
        sender = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "relay_plain_sender.py"), endpoint, "r/1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(
                lambda: value(daemon.scrape(), "zmq_accepted_total", process="r/1") == 7,
                timeout=10,
                what="the relay still serving after the reload",
            )
        finally:
            assert sender.stdin is not None
            sender.stdin.close()
            sender.wait(10)


_ABSENT_SIDECAR_APP = textwrap.dedent(
    """\
    # An application in library mode whose relay has no sidecar: a ROUTER churned from
    # outside and a REQ/REP ping-pong, all three instrumented with relay=, in one context.
    import json, sys, time
    import zmq
    import exporter
    from exporter import library
    from testkit import free_port

    endpoint, seconds = sys.argv[1], float(sys.argv[2])
    ctx = zmq.Context()
    router, rep, req = ctx.socket(zmq.ROUTER), ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    handles = []
    for sock, name in ((router, "churned"), (rep, "rep"), (req, "req")):
        sock.setsockopt(zmq.LINGER, 0)
        handles.append(exporter.instrument(sock, name, registry=None, relay=endpoint))
    port, ping = free_port(), free_port()
    router.bind(f"tcp://127.0.0.1:{port}")
    rep.bind(f"tcp://127.0.0.1:{ping}")
    req.connect(f"tcp://127.0.0.1:{ping}")
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.readline()  # the churn has started
    reader = library.reader()
    events0 = reader.snapshot().stats.events
    worst, trips = 0.0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        req.send(b"ping")
        if not rep.poll(5000):
            break
        rep.send(rep.recv())
        if not req.poll(5000):
            break
        req.recv()
        worst = max(worst, time.monotonic() - t0)
        trips += 1
    sender = library._process.relays[endpoint]
    print(json.dumps({"worst": worst, "trips": trips, "sent": sender.sent,
                      "deferred": sender.deferred,
                      "events": reader.snapshot().stats.events - events0}), flush=True)
    for h in handles:
        h.close()
    for s in (router, rep, req):
        s.close()
    ctx.term()
    """
)


def test_application_never_stalls_while_its_sidecar_is_absent(tmp_path: Path) -> None:
    """A subprocess application relays to an ipc endpoint nobody binds while its ROUTER is
    churned at 500 connections/s: its ping-pong in the same context never takes 200 ms,
    and the sender sent nothing (no sidecar) while the churn's events were read."""
    from testkit import LoadGen

    endpoint = _ipc(tmp_path)
    app = subprocess.Popen(
        [sys.executable, "-c", _ABSENT_SIDECAR_APP, endpoint, "3"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    load: LoadGen | None = None
    try:
        assert app.stdin is not None and app.stdout is not None
        port = json.loads(app.stdout.readline())["port"]
        load = LoadGen(port, 2000, 4.0, rate=500)
        app.stdin.write("go\n")
        app.stdin.flush()
        line = app.stdout.readline()
        assert line, "the application died"
        result = json.loads(line)
        tally = load.tally()
        assert app.wait(30) == 0
    finally:
        if load is not None:
            load.kill()
        if app.poll() is None:
            app.kill()
            app.wait()
    assert tally.completed > 500, tally
    assert result["events"] > 1000, result  # the churn was read while it relayed
    assert result["sent"] == 0 and result["deferred"] > 10, result  # no sidecar, ticks on
    assert result["trips"] > 100, result
    assert result["worst"] < 0.2, result
