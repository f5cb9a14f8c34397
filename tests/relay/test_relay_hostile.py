"""Relay senders are untrusted: what one hostile sender can send, and what the daemon does
with it (docs/relay.md, "A hostile sender"). Real sockets and a real daemon where the
behaviour is on the wire; the decoder and the server state directly where the point is
the whole space of messages (property tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_parse,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from exporter.core.endpoints import EndpointMap
from exporter.core.events import Event
from exporter.core.state import (
    EngineSnapshot,
    ReaderStats,
    SocketState,
    apply_event,
    snapshot_socket,
)
from exporter.relay.server import Peer, RelayServer
from exporter.relay.wire import (
    MAX_COUNT,
    RejectedMessage,
    RelayLimits,
    decode,
    encode,
    encode_socket,
)
from exporter.render.prometheus import StateCollector
from exporter.web.status import render_status

from helpers import Daemon, free_port, total, value, wait_until

LIMITS = RelayLimits(max_message_bytes=64 * 1024)


def _ipc(tmp: Path) -> str:
    return f"ipc://{tmp}/relay.sock"


def _body(name: str = "orders", accepted: int = 2, endpoint: str = "tcp://*:5555") -> Any:
    sock = SocketState(name, "ROUTER", {"team": "a"}, EndpointMap((endpoint,), ()))
    for n in range(accepted):
        apply_event(sock, int(Event.ACCEPTED), 10 + n, endpoint, 1.5)
    return encode_socket(snapshot_socket(sock))


def _state(process: str, instance: str, seq: int, **kw: Any) -> bytes:
    return encode("state", process, instance, seq, socket=_body(**kw))


# -- decode-time validation -----------------------------------------------------------------


def _with(path: tuple[str | int, ...], val: Any) -> bytes:
    msg = json.loads(_state("p", "i", 1))
    target = msg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = val
    return json.dumps(msg).encode()  # ensure_ascii: a lone surrogate travels as \ud800


@pytest.mark.parametrize(
    "data",
    [
        _with(("process",), "\ud800"),
        _with(("instance",), "a\udfffb"),
        _with(("socket", "name"), "x\ud83d"),
        _with(("socket", "labels", "team"), "\udc00"),
        _with(("socket", "endpoints", 0, "endpoint"), "tcp://\ud800:1"),
        _with(("socket", "name"), "line\nbreak"),
        _with(("socket", "labels", "team"), "nul\x00"),
        _with(("process",), "esc\x1b[2J"),
        _with(("socket", "endpoints", 0, "last_event_time"), 1e308),
        _with(("socket", "endpoints", 0, "last_event_time"), 253_402_300_800),
        _with(("socket", "endpoints", 0, "connections"), 2**53 + 1),
        _with(("seq",), 2**64),
        encode("gone", "p", "i", 2, socket="\ud800"),
    ],
)
def test_strings_and_numbers_the_renderers_cannot_take_are_refused(data: bytes) -> None:
    with pytest.raises(RejectedMessage) as err:
        decode(data, LIMITS)
    assert err.value.reason == "invalid"


def test_non_ascii_text_that_is_valid_unicode_is_accepted() -> None:
    msg = decode(_with(("socket", "labels", "team"), "päyments 🚀 \u2028"), LIMITS)
    assert msg.socket is not None and msg.socket.labels["team"] == "päyments 🚀 \u2028"


# -- property: whatever the decoder accepts, every output renders ---------------------------

_hostile_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
    st.sampled_from(["\ud800", "\udfff", "a\x00", "\n", "\\", '"', "}", "p", "q", "x" * 300]),
    st.text(max_size=300),
)
_hostile_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, MAX_COUNT, MAX_COUNT + 1, 1e308, 253_402_300_799, -0.0]),
)
# Mostly plausible values, so that many messages get through and reach the renderers.


def _mostly(benign: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    return st.integers(0, 9).flatmap(lambda k: benign if k < 8 else hostile)


_small = st.integers(0, 100)
_number = _mostly(st.one_of(_small, st.integers(0, MAX_COUNT)), _hostile_number)
_time = st.one_of(
    st.floats(0, 4e9), st.sampled_from([253_402_300_799, 1e20, 1e308]), _hostile_number
)
_text = _mostly(st.sampled_from(["a", "tcp://*:1", "é", "x" * 256]), _hostile_text)
_EVENTS = [e.name for e in Event]


@st.composite
def _endpoint(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "endpoint": draw(_text),
        "role": draw(st.sampled_from(["bind", "connect", None])),
        "counts": draw(st.dictionaries(st.sampled_from(_EVENTS), _number, max_size=4)),
        "errno_counts": draw(
            st.sampled_from([{}, {"BIND_FAILED": {"EADDRINUSE": 3}}, {"BIND_FAILED": {"x": 1}}])
        ),
        "handshake_failures": draw(
            st.sampled_from(
                [[], [{"reason": "auth", "error": "400", "count": 2}], [{"reason": "x"}]]
            )
        ),
        "connections": draw(_number),
        "listening": draw(st.booleans()),
        "ready": draw(st.booleans()),
        "reconnect_interval_ms": draw(_number),
        "last_event": draw(st.sampled_from([None, "ACCEPTED", "ACCEPTED", "NOPE"])),
        "last_event_time": draw(_time),
    }


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    # Identity games: a few process ids and instances, shared by a few connections.
    kind = draw(st.sampled_from(["state", "state", "state", "hello", "gone", "bye"]))
    msg: dict[str, Any] = {
        "v": 1,
        "type": kind,
        "process": draw(_mostly(st.sampled_from(["p", "q"]), _text)),
        "instance": draw(st.sampled_from(["i", "j"])),
        "seq": draw(_mostly(st.integers(0, 20), _number)),
    }
    if kind == "state":
        msg["socket"] = {
            "name": draw(st.one_of(st.sampled_from(["a", "b"]), _text)),
            "type": "ROUTER",
            "labels": draw(st.dictionaries(st.sampled_from(["team", "x_y", "le"]), _text)),
            "unknown_events": draw(st.sampled_from([{}, {"32768": 1}, {"1": MAX_COUNT}])),
            "endpoints": draw(st.lists(_endpoint(), max_size=2)),
        }
    elif kind == "gone":
        msg["socket"] = draw(_text)
    return json.dumps(msg, allow_nan=True).encode()


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _render_everything(server: RelayServer) -> None:
    snap = EngineSnapshot(server.snapshot_sockets(), ReaderStats(), True, None)
    state = StateCollector(lambda: snap, {"version": "test"})
    for openmetrics, encoder, parse in (
        (False, exposition.generate_latest, text_string_to_metric_families),
        (True, om_exposition.generate_latest, om_parse),
    ):
        pre = state.prerender(openmetrics)
        text = (pre.text + encoder(_Families(pre.families))).decode("utf-8")
        families = list(parse(text))
        assert families
        # The families path (OTLP, and /metrics with another escaping) says the same.
        slow = encoder(state).decode("utf-8")
        assert len(list(parse(slow))) == len(families)
    page = render_status(snap, "/metrics")
    page.encode("utf-8")


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.lists(st.tuples(_message(), st.sampled_from([b"c1", b"c2", b"c3"])), max_size=8))
def test_every_accepted_message_renders_in_every_output(
    messages: list[tuple[bytes, bytes]],
) -> None:
    server = RelayServer(("inproc://unused",), limits=RelayLimits(max_series=400))
    try:
        now = time.monotonic()
        for data, conn in messages:
            try:
                msg = decode(data, LIMITS)
            except RejectedMessage:
                continue
            server.apply(msg, Peer(conn, uid=os.getuid()), now)
            now += 0.01
        _render_everything(server)
        assert server._series <= 400
    finally:
        server.stop()


# -- identity -------------------------------------------------------------------------------


def test_identity_games_in_the_server_state() -> None:
    server = RelayServer(("inproc://unused",))
    owner, thief = Peer(b"c1", pid=10, uid=1000), Peer(b"c2", pid=11, uid=1000)
    now = time.monotonic()
    try:
        assert (
            server.apply(decode(_state("victim", "i", 1, accepted=100), LIMITS), owner, now) is None
        )
        # Another connection: a new instance, the victim's own instance, bye, gone, seq 2^53.
        for data in (
            _state("victim", "evil", 1, accepted=999_999),
            _state("victim", "i", MAX_COUNT, accepted=999_999),
            encode("bye", "victim", "i", 2),
            encode("gone", "victim", "i", 3, socket="orders"),
        ):
            assert server.apply(decode(data, LIMITS), thief, now) == "identity"
        (sock,) = server.snapshot_sockets()
        assert sum(ep.counts.get(Event.ACCEPTED, 0) for ep in sock.endpoints) == 100
        assert server.processes() == {"victim": True}
        # The same peer process on a new connection (same pid and uid) may go on.
        again = Peer(b"c3", pid=10, uid=1000)
        assert (
            server.apply(decode(encode("heartbeat", "victim", "i", 4), LIMITS), again, now) is None
        )
        # Its connection ended (bye here; DISCONNECTED on the wire): a restarted process of
        # the same user takes over at once; another user waits for the expiry.
        assert server.apply(decode(encode("bye", "victim", "i", 5), LIMITS), again, now) is None
        stranger = Peer(b"c4", pid=12, uid=1001)
        assert server.apply(decode(_state("victim", "k", 1), LIMITS), stranger, now) == "identity"
        assert server.apply(decode(_state("victim", "k", 1), LIMITS), thief, now) is None
    finally:
        server.stop()


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    return dealer


def _accepted(server: RelayServer) -> list[int]:
    return [
        sum(ep.counts.get(Event.ACCEPTED, 0) for ep in s.endpoints)
        for s in server.snapshot_sockets()
    ]


_THIEF = """
import sys, zmq
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 5000)  # close() returns once every message went
dealer.connect(sys.argv[1])
for line in sys.stdin.buffer.read().splitlines():
    dealer.send(line)
dealer.close()
ctx.term()
"""


def _send_from_another_process(endpoint: str, messages: list[bytes]) -> None:
    """Another process (its own pid) sends `messages` on a connection of its own."""
    done = subprocess.run(
        [sys.executable, "-c", _THIEF, endpoint],
        input=b"\n".join(messages),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_second_connection_cannot_take_a_live_process_id(tmp_path: Path, transport: str) -> None:
    endpoint = _ipc(tmp_path) if transport == "ipc" else "tcp://127.0.0.1:*"
    server = RelayServer((endpoint,), limits=LIMITS)
    server.start()
    endpoint = server.bound[0]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        victim = _dealer(ctx, endpoint)
        # A long heartbeat: the victim stays live (not silent) while the thief starts.
        victim.send(encode("hello", "victim", "i", 0, heartbeat_ms=60_000))
        victim.send(_state("victim", "i", 1, accepted=100))
        wait_until(lambda: _accepted(server) == [100], timeout=5, what="victim's state")
        thieving = [
            _state("victim", "evil", 1, accepted=999_999),
            _state("victim", "i", MAX_COUNT, accepted=999_999),
            encode("bye", "victim", "i", 3),
        ]
        if transport == "ipc":  # SO_PEERCRED: another pid, the same uid
            _send_from_another_process(endpoint, thieving)
        else:  # no credentials on plain tcp: the connection alone
            thief = _dealer(ctx, endpoint)
            for data in thieving:
                thief.send(data)
        wait_until(
            lambda: server.stats.rejected["identity"] == 3,
            timeout=5,
            what=f"identity counted {server.stats}",
        )
        assert _accepted(server) == [100] and server.processes() == {"victim": True}
        # The victim restarts: its old connection ends (DISCONNECTED), a new one takes the
        # id over at once (same uid).
        victim.close(0)
        wait_until(lambda: server.processes() == {"victim": False}, timeout=5, what="down")
        restarted = _dealer(ctx, endpoint)
        restarted.send(_state("victim", "new", 1, accepted=3))
        wait_until(lambda: _accepted(server) == [3], timeout=5, what="takeover")
        assert server.stats.rejected["identity"] == 3
    finally:
        server.stop()
        ctx.destroy(linger=0)


# -- counters backwards ---------------------------------------------------------------------


def test_a_counter_going_back_within_an_instance_is_refused(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    server = RelayServer((endpoint,), limits=LIMITS)
    server.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        dealer = _dealer(ctx, endpoint)
        dealer.send(_state("p", "i", 1, accepted=100))
        dealer.send(_state("p", "i", 2, accepted=3))
        wait_until(
            lambda: server.stats.rejected["backwards"] == 1, timeout=5, what="backwards counted"
        )
        assert _accepted(server) == [100]
        dealer.send(_state("p", "i", 3, accepted=101))  # forwards again: taken
        wait_until(lambda: _accepted(server) == [101], timeout=5, what="forwards")
        dealer.send(_state("p", "j", 1, accepted=3))  # a new instance (restart): a reset
        wait_until(lambda: _accepted(server) == [3], timeout=5, what="restart")
    finally:
        server.stop()
        ctx.destroy(linger=0)


# -- a real daemon: one hostile message must not take /metrics down -------------------------


def _get(url: str, accept: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_hostile_messages_leave_every_page_serving(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    config = textwrap.dedent(
        f"""\
        relay:
          listen: ["{endpoint}"]
          ipc_mode: "0600"
          max_message_bytes: 65536
        """
    )
    with Daemon(config) as daemon:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            dealer = _dealer(ctx, endpoint)
            dealer.send(_state("good", "i", 1, accepted=7))
            for bad in (
                _with(("process",), "\ud800"),
                _with(("socket", "endpoints", 0, "last_event_time"), 1e308),
                _with(("socket", "labels", "team"), "\udfff"),
            ):
                dealer.send(bad)
            wait_until(
                lambda: total(daemon.scrape(), "zmq_exporter_relay_messages_rejected_total") >= 3,
                timeout=10,
                what="3 rejections",
            )
            samples = daemon.scrape()
            assert (
                value(samples, "zmq_exporter_relay_messages_rejected_total", reason="invalid") == 3
            )
            assert value(samples, "zmq_accepted_total", socket="orders", process="good") == 7
            status, text = _get(daemon.url + "/metrics", "application/openmetrics-text")
            assert status == 200 and list(om_parse(text))
            status, page = _get(daemon.url + "/")
            assert status == 200 and "orders" in page
        finally:
            ctx.destroy(linger=0)


# -- unbounded series -----------------------------------------------------------------------


def test_relayed_series_count_against_max_series_with_a_share_per_process(
    tmp_path: Path,
) -> None:
    from exporter.config.cardinality import FIXED_SERIES
    from exporter.core.metrics import RELAY_FAMILIES

    endpoint = _ipc(tmp_path)
    own = FIXED_SERIES + sum(f.series for f in RELAY_FAMILIES)
    config = textwrap.dedent(
        f"""\
        limits:
          max_series: {own + 400}
        relay:
          listen: ["{endpoint}"]
          ipc_mode: "0600"
          max_series_per_process: 150
        """
    )
    with Daemon(config) as daemon:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            read = 0
            dealers = []  # kept: a collected DEALER would close its connection
            for process, sockets in (("hog", 60), ("small", 1), ("hog2", 60), ("hog3", 60)):
                dealers.append(dealer := _dealer(ctx, endpoint))
                for i in range(sockets):
                    dealer.send(_state(process, "i", i + 1, name=f"s{i}"))
                read += sockets
                wait_until(_reached(daemon, read), timeout=10, what=f"{process} read")
            samples = daemon.scrape()
            shown = [dict(labels) for name, labels in samples if name == "zmq_socket_info"]
            per = {p: sum(1 for x in shown if x["process"] == p) for p in ("hog", "hog2", "hog3")}
            # Each hog within its share, the small process in, the third hog gets the rest.
            assert 0 < per["hog"] < 60 and per["hog"] == per["hog2"], per
            assert per["hog3"] < per["hog"], per
            assert any(x["process"] == "small" for x in shown)
            refused = value(
                samples, "zmq_exporter_relay_messages_rejected_total", reason="max_series"
            )
            assert refused == 180 - sum(per.values())
            # Refused whole: every shown socket has all its rows.
            for x in shown:
                where = {"socket": x["socket"], "process": x["process"]}
                assert total(samples, "zmq_accepted_total", **where) == 2, x
            # The scrape stays within the limit (the next scrape reports this one's count).
            series = value(daemon.scrape(), "zmq_exporter_series")
            assert series is not None and series <= own + 400, (series, own + 400)
        finally:
            ctx.destroy(linger=0)


def _reached(daemon: Daemon, n: int) -> Callable[[], bool]:
    return lambda: _read(daemon.scrape()) >= n


def _read(samples: dict[Any, float]) -> float:
    return (value(samples, "zmq_exporter_relay_messages_received_total") or 0) + total(
        samples, "zmq_exporter_relay_messages_rejected_total"
    )


# -- CURVE allow-list -----------------------------------------------------------------------


def _curve_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, server_key: bytes, pair: tuple[bytes, bytes]
) -> zmq.Socket[bytes]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.curve_serverkey = server_key
    dealer.curve_publickey, dealer.curve_secretkey = pair
    dealer.connect(endpoint)
    return dealer


def _curve_config(endpoint: str, secret_file: Path, allowed: Path) -> str:
    return textwrap.dedent(
        f"""\
        relay:
          listen: ["{endpoint}"]
          curve_secretkey_file: {secret_file}
          curve_allowed_clients: {allowed}
        """
    )


def test_curve_allow_list_admits_listed_keys_only_and_reloads(tmp_path: Path) -> None:
    server_public, server_secret = zmq.curve_keypair()
    secret_file = tmp_path / "relay.key_secret"
    secret_file.write_text(server_secret.decode())
    alice, mallory, bob = zmq.curve_keypair(), zmq.curve_keypair(), zmq.curve_keypair()
    allowed = tmp_path / "allowed"
    allowed.write_text(f"# who may send\n{alice[0].decode()}\n\n")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Daemon(_curve_config(endpoint, secret_file, allowed)) as daemon:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            a = _curve_dealer(ctx, endpoint, server_public, alice)
            a.send(_state("alice", "i", 1, accepted=5))
            m = _curve_dealer(ctx, endpoint, server_public, mallory)
            m.send(_state("mallory", "i", 1, accepted=5))
            wait_until(
                lambda: (
                    value(daemon.scrape(), "zmq_exporter_relay_messages_rejected_total",
                          reason="unauthorized") or 0
                ) >= 1,
                timeout=10,
                what="mallory's handshake refused and counted",
            )  # fmt: skip
            wait_until(
                lambda: total(daemon.scrape(), "zmq_accepted_total", process="alice") == 5,
                timeout=10,
                what="alice's state",
            )
            assert total(daemon.scrape(), "zmq_accepted_total", process="mallory") == 0
            # Reload with a bad line: refused, the old list kept (bob still out).
            assert daemon.proc is not None and daemon.config_path is not None
            allowed.write_text(f"{alice[0].decode()}\n{bob[0].decode()}\nnot-a-key\n")
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: f"{allowed}:3: not a Z85" in daemon.logs(), timeout=10)
            before = value(daemon.scrape(), "zmq_exporter_relay_messages_rejected_total",
                           reason="unauthorized")  # fmt: skip
            b = _curve_dealer(ctx, endpoint, server_public, bob)
            b.send(_state("bob", "i", 1, accepted=4))
            wait_until(
                lambda: value(daemon.scrape(), "zmq_exporter_relay_messages_rejected_total",
                              reason="unauthorized") != before,
                timeout=10,
                what="bob refused while the bad list is in the file",
            )  # fmt: skip
            b.close(0)
            # A good list with bob: read on reload, bob gets in.
            allowed.write_text(f"{alice[0].decode()}\n{bob[0].decode()}\n")
            reloads = daemon.logs().count("config reloaded")
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: daemon.logs().count("config reloaded") > reloads, timeout=10, what="reload"
            )
            b = _curve_dealer(ctx, endpoint, server_public, bob)
            b.send(_state("bob", "i", 1, accepted=4))
            wait_until(
                lambda: total(daemon.scrape(), "zmq_accepted_total", process="bob") == 4,
                timeout=15,
                what="bob admitted after the reload",
            )
            # Identity on CURVE: another key cannot send as alice while she is live.
            b.send(_state("alice", "evil", 1, accepted=999))
            wait_until(
                lambda: value(daemon.scrape(), "zmq_exporter_relay_messages_rejected_total",
                              reason="identity") == 1,
                timeout=10,
                what="bob sending as alice refused",
            )  # fmt: skip
            assert total(daemon.scrape(), "zmq_accepted_total", process="alice") == 5
        finally:
            ctx.destroy(linger=0)


def test_allow_list_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from exporter.config import ConfigError
    from exporter.config.load import parse_config

    secret_file = tmp_path / "relay.key_secret"
    secret_file.write_text(zmq.curve_keypair()[1].decode())
    keys = tmp_path / "keys"
    keys.mkdir()
    # A directory: plain key files and zmq.auth certificates; *_secret files are skipped.
    zmq.auth.create_certificates(str(keys), "client")
    (keys / "more.txt").write_text(zmq.curve_keypair()[0].decode() + "\n")
    text = _curve_config("tcp://127.0.0.1:5999", secret_file, keys)
    settings_ = parse_config(text, str(tmp_path / "c.yml"))
    assert settings_.relay is not None and settings_.relay.curve_allowed_clients is not None
    assert len(settings_.relay.curve_allowed_clients) == 2
    (keys / "zz-bad.txt").write_text("# ok\n\nshort\n")
    with pytest.raises(ConfigError, match=rf"{keys / 'zz-bad.txt'}:3: not a Z85"):
        parse_config(text, str(tmp_path / "c.yml"))
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(_curve_config("tcp://127.0.0.1:5999", secret_file, tmp_path / "no"), "c")
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="no CURVE public key"):
        parse_config(_curve_config("tcp://127.0.0.1:5999", secret_file, empty), "c")
    no_curve = f'relay:\n  listen: ["tcp://127.0.0.1:5999"]\n  curve_allowed_clients: {empty}\n'
    with pytest.raises(ConfigError, match="needs curve_secretkey_file"):
        parse_config(no_curve, "c")


def test_a_holder_whose_end_is_not_seen_keeps_its_id_for_three_heartbeats() -> None:
    server = RelayServer(("tcp://127.0.0.1:*",), limits=LIMITS)
    server.start()
    endpoint = server.bound[0]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        holder = _dealer(ctx, endpoint)  # goes silent, its connection stays open
        holder.send(encode("hello", "p", "i", 1, heartbeat_ms=2000))
        holder.send(_state("p", "i", 2, accepted=5))
        wait_until(lambda: _accepted(server) == [5], timeout=5, what="holder's state")
        claimant = _dealer(ctx, endpoint)
        claimant.send(_state("p", "new", 1, accepted=1))
        wait_until(lambda: server.stats.rejected["identity"] == 1, timeout=5, what="refused")
        assert _accepted(server) == [5]
        # After 3 x 2 s of the holder's silence the id is free to the same credentials
        # (none, on plain tcp): the claimant's next state takes it.
        wait_until(lambda: server.processes() == {"p": False}, timeout=20, what="holder down")
        claimant.send(_state("p", "new", 2, accepted=1))
        wait_until(lambda: _accepted(server) == [1], timeout=5, what="taken over")
    finally:
        server.stop()
        ctx.destroy(linger=0)
