"""Message counts through the relay: the wire format's optional `messages` extension
(docs/relay.md, "Message counts"): exact at the sidecar, also across a sidecar SIGKILL and
restart and in its OTLP push, and senders and daemons of either age keep working together."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
from test_otlp import Export, Receiver, base_env, point, prometheus_name

from exporter.core.endpoints import EndpointMap
from exporter.core.metrics import MESSAGE_FAMILIES
from exporter.core.state import SocketSnapshot, SocketState, snapshot_socket
from exporter.relay.wire import (
    MESSAGES_VERSION,
    RejectedMessage,
    RelayLimits,
    decode,
    encode,
    encode_socket,
)

from helpers import ROOT, Daemon, missing_tool, start_script, total, value, wait_until

LIMITS = RelayLimits()
COUNTS = (12, 3, 4096, 77, 2, 0.125)  # MessageCounts.values() order


def _sock() -> SocketSnapshot:
    state = SocketState(
        name="push", socket_type="PUSH", labels={"team": "t"}, endpoint_map=EndpointMap((), ())
    )
    return snapshot_socket(state)


def _state(socket: dict[str, object]) -> bytes:
    return encode("state", "app-1", "i1", 1, socket=socket)


def test_extension_round_trips_and_is_optional() -> None:
    sock = _sock()
    with_counts = decode(_state(encode_socket(sock, COUNTS)), LIMITS)
    assert with_counts.messages == COUNTS
    without = decode(_state(encode_socket(sock)), LIMITS)  # a sender before the extension
    assert without.messages is None
    assert with_counts.socket == without.socket  # the state itself is the same
    # A newer extension version: the state is taken, the counts are left out.
    raw = encode_socket(sock, COUNTS)
    raw["messages"] = {**raw["messages"], "v": MESSAGES_VERSION + 1, "new_field": [1]}
    newer = decode(_state(raw), LIMITS)
    assert newer.messages is None and newer.socket == without.socket


def test_a_daemon_before_the_extension_ignores_it(tmp_path: Path) -> None:
    """The decoder of a daemon before the extension (the wire module as it was committed
    before it, read with git show) takes a state that carries the extension."""
    old = subprocess.run(
        ["git", "show", "787e197:exporter/relay/wire.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if old.returncode != 0:
        missing_tool("a git checkout with the relay's history")
    (tmp_path / "old_wire.py").write_text(old.stdout)
    check = (
        "import sys; from old_wire import decode, RelayLimits; "
        "m = decode(sys.stdin.buffer.read(), RelayLimits()); "
        "print(m.type, m.socket.name, m.socket.labels['team'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check],
        input=_state(encode_socket(_sock(), COUNTS)),
        capture_output=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
    )
    assert proc.stdout.decode().split() == ["state", "push", "t"], proc.stderr.decode()


@pytest.mark.parametrize(
    "messages",
    [
        "counts",
        {"v": 1, "sent": -1, "received": 0, "bytes_sent": 0, "bytes_received": 0,
         "would_block": 0, "blocked_seconds": 0.0},
        {"v": 1, "sent": True, "received": 0, "bytes_sent": 0, "bytes_received": 0,
         "would_block": 0, "blocked_seconds": 0.0},
        {"v": 1, "sent": 1, "received": 0, "bytes_sent": 0, "bytes_received": 0,
         "would_block": 0},
        {"v": 1, "sent": 1, "received": 0, "bytes_sent": 0, "bytes_received": 0,
         "would_block": 0, "blocked_seconds": float("inf")},
    ],
)  # fmt: skip
def test_malformed_extension_is_refused(messages: object) -> None:
    raw = encode_socket(_sock())
    raw["messages"] = messages
    data = json.dumps(
        {"v": 1, "type": "state", "process": "p", "instance": "i", "seq": 1, "socket": raw}
    ).encode()
    with pytest.raises(RejectedMessage) as err:
        decode(data, LIMITS)
    assert err.value.reason == "invalid"


APP = textwrap.dedent(
    """\
    import sys, zmq, exporter
    endpoint = sys.argv[1]
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    exporter.instrument(pull, "pull", registry=None, relay=endpoint, relay_id="app-1",
                        messages=True)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    h = exporter.instrument(push, "push", registry=None, relay=endpoint, relay_id="app-1",
                            messages=True)
    h.connect(f"tcp://127.0.0.1:{port}")
    sent = nbytes = received = nbytes_received = 0
    for line in sys.stdin:
        n = int(line)
        for i in range(n):
            body = b"x" * (i % 200)
            if i % 3 == 0:
                push.send_multipart([b"head", body])
                nbytes += 4 + len(body)
            else:
                push.send(body)
                nbytes += len(body)
            sent += 1
            frames = pull.recv_multipart()
            received += 1
            nbytes_received += sum(map(len, frames))
        print("tally", sent, nbytes, received, nbytes_received, flush=True)
    """
)


class Tally(NamedTuple):
    """The application's own count so far (APP's `tally` line)."""

    sent: int  # by the PUSH socket `push`
    bytes_sent: int
    received: int  # by the PULL socket `pull`
    bytes_received: int


def _start_app(tmp_path: Path, endpoint: str) -> subprocess.Popen[str]:
    """APP, relaying to `endpoint` as process `app-1`; it sends what `_send` asks."""
    return start_script(tmp_path / "app.py", APP, endpoint)


def _send(app: subprocess.Popen[str], n: int) -> Tally:
    """Have APP send (and receive) `n` more messages; its tally after them."""
    assert app.stdin is not None and app.stdout is not None
    app.stdin.write(f"{n}\n")
    app.stdin.flush()
    word, *counts = app.stdout.readline().split()
    assert word == "tally"
    return Tally(*map(int, counts))


def _relay_config(endpoint: str) -> str:
    return f'relay:\n  listen: ["{endpoint}"]\n  ipc_mode: "0600"\n'


def _counts(daemon: Daemon) -> tuple[float | None, float | None]:
    try:
        samples = daemon.scrape()
    except OSError:
        return None, None
    labels = {"process": "app-1", "socket": "push"}
    return (
        value(samples, "zmq_messages_sent_total", **labels),
        value(samples, "zmq_message_bytes_sent_total", **labels),
    )


def test_sidecar_totals_equal_the_senders_across_a_sidecar_restart(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/relay.sock"
    first = Daemon(_relay_config(endpoint)).start()
    second: Daemon | None = None
    app = _start_app(tmp_path, endpoint)

    def phase(n: int) -> tuple[int, int]:
        tally = _send(app, n)
        return tally.sent, tally.bytes_sent

    try:
        truth = phase(3000)
        wait_until(lambda: _counts(first) == truth, timeout=15, what=f"relayed == {truth}")
        assert first.proc is not None
        first.proc.kill()  # SIGKILL: the sidecar forgets everything
        first.proc.wait(5)
        truth = phase(2000)  # counted meanwhile, with no sidecar
        second = Daemon(_relay_config(endpoint), port=first.port).start()
        wait_until(lambda: _counts(second) == truth, timeout=15, what=f"relayed == {truth}")
        truth = phase(1000)
        wait_until(lambda: _counts(second) == truth, timeout=15, what=f"relayed == {truth}")
        samples = second.scrape()
        labels = {"process": "app-1", "socket": "push"}
        assert value(samples, "zmq_messages_received_total", **labels) == 0
        assert value(samples, "zmq_send_would_block_total", **labels) == 0
        assert value(samples, "zmq_send_blocked_seconds_total", **labels) is not None
    finally:
        app.kill()
        app.wait(5)
        if first.proc is not None and first.proc.poll() is None:
            first.stop()
        if second is not None:
            second.stop()


def _pushed(rx: Receiver, want: dict[tuple[str, str], int]) -> Export | None:
    """The receiver's latest export if its points of process `app-1` have the values
    `want` gives by (instrument, socket)."""
    export = rx.last()
    if export is None:
        return None
    found = {
        (metric, sock): getattr(point(export, metric, process="app-1", socket=sock), "value", None)
        for metric, sock in want
    }
    return export if found == want else None


def test_sidecar_pushes_the_relayed_counts_over_otlp(tmp_path: Path) -> None:
    """A sidecar with a relay and OTLP push pushes its senders' message counts: the latest
    export's cumulative sums equal the application's own tally and /metrics, under the
    table's OTel names and units, one point per socket and family; the relay's
    self-metrics stay on /metrics."""
    endpoint = f"ipc://{tmp_path}/relay.sock"
    rx = Receiver("grpc").start()
    daemon = Daemon(_relay_config(endpoint), env=base_env("grpc", rx.endpoint)).start()
    app = _start_app(tmp_path, endpoint)
    families = {f.otel_name: f for f in MESSAGE_FAMILIES}
    try:
        for n in (700, 300):  # the second export's totals go on from the first's
            tally = _send(app, n)
            want = {
                ("zmq.messages_sent", "push"): tally.sent,
                ("zmq.message_bytes_sent", "push"): tally.bytes_sent,
                ("zmq.messages_received", "push"): 0,
                ("zmq.message_bytes_received", "push"): 0,
                ("zmq.messages_sent", "pull"): 0,
                ("zmq.message_bytes_sent", "pull"): 0,
                ("zmq.messages_received", "pull"): tally.received,
                ("zmq.message_bytes_received", "pull"): tally.bytes_received,
            }
            export = wait_until(
                functools.partial(_pushed, rx, want), timeout=15, what=f"pushed == {tally}"
            )
            assert export is not None
            scraped = daemon.scrape()
            ours = [q for q in export.points if q.metric in families]
            assert len(ours) == len(families) * 2  # each family once per socket
            for q in ours:
                family = families[q.metric]
                assert (q.kind, q.monotonic, q.temporality) == ("sum", True, 2)  # CUMULATIVE
                assert (q.unit, q.description) == (family.otel_unit, family.help)
                assert prometheus_name(q) == family.name
                attrs = dict(q.attrs)
                assert attrs["process"] == "app-1" and attrs["socket"] in ("push", "pull")
                assert 0 < q.start <= q.time
                assert q.value == value(scraped, family.name, **attrs)  # app idle: the same
            assert value(scraped, "zmq_exporter_relay_processes") == 1  # on /metrics only
            assert not any(prometheus_name(q).startswith("zmq_exporter_relay") for q in ours)
            assert not any(q.metric.startswith("zmq_exporter.relay") for q in export.points)
    finally:
        app.kill()
        app.wait(5)
        assert daemon.stop() == 0
        rx.stop()
    assert "Traceback" not in daemon.logs()


UNMODIFIED = textwrap.dedent(
    """\
    import os, sys, zmq
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    push = ctx.socket(zmq.PUSH)
    push.connect(pull.last_endpoint.decode())
    sent = nbytes = 0
    for i in range(500):
        if i % 5 == 0:
            push.send_multipart([b"k", b"v" * i])
            nbytes += 1 + i
        else:
            push.send_string("m" * i)
            nbytes += i
        pull.recv_multipart()
        sent += 1
    print(os.getpid(), sent, nbytes, type(push).__name__, flush=True)
    sys.stdin.readline()
    """
)


def test_launcher_counts_an_unmodified_program(tmp_path: Path) -> None:
    """ZMQ_EXPORTER_MESSAGES=1 under zmq-exporter-instrument: the sockets an unmodified
    program creates are counted, and the sidecar's totals are the program's own."""
    relay = f"ipc://{tmp_path}/relay.sock"
    script = tmp_path / "unmodified.py"
    script.write_text(UNMODIFIED)
    with Daemon(_relay_config(relay)) as daemon:
        app = subprocess.Popen(
            [sys.executable, "-m", "exporter.instrument.launcher", "--relay", relay,
             sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), "ZMQ_EXPORTER_MESSAGES": "1"},
        )  # fmt: skip
        try:
            assert app.stdout is not None and app.stdin is not None
            pid, sent, nbytes, class_name = app.stdout.readline().split()
            assert class_name == "Socket"  # the application sees its own class name
            process = f"{os.uname().nodename}/{pid}"

            def relayed() -> tuple[float, ...]:
                s = daemon.scrape()
                return tuple(
                    total(s, name, process=process)
                    for name in (
                        "zmq_messages_sent_total",
                        "zmq_messages_received_total",
                        "zmq_message_bytes_sent_total",
                        "zmq_message_bytes_received_total",
                    )
                )

            want = (int(sent), int(sent), int(nbytes), int(nbytes))
            wait_until(lambda: relayed() == want, timeout=20, what=f"relayed == {want}")
            app.stdin.write("\n")
            app.stdin.flush()
            assert app.wait(20) == 0
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
