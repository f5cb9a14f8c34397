"""Instrument at creation (`exporter.instrument_sockets`) and the zero-code launcher
(`zmq-exporter-instrument`): real sockets, real processes (forked and spawned children), a
real sidecar daemon, the kernel's count of connections as the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT, Daemon, established_in, parse_metrics, total, value, wait_until

LAUNCHER = [sys.executable, "-m", "exporter.instrument.launcher"]

HOOKED = textwrap.dedent(
    """\
    import json, os, sys, time, zmq, exporter
    from prometheus_client import generate_latest
    ctx, other = zmq.Context(), zmq.Context()
    hook = exporter.instrument_sockets(ctx)
    skip = exporter.instrument_sockets(
        other, name=lambda s, role, ep: None if role == "connect" else "srv-" + ep)
    router = ctx.socket(zmq.ROUTER)             # created and bound inside "a library"
    router.bind("tcp://127.0.0.1:*")
    ep = router.last_endpoint.decode()
    dealers = [ctx.socket(zmq.DEALER) for _ in range(3)]
    for d in dealers:
        d.connect(ep)
    lone = other.socket(zmq.DEALER)              # left alone by the callable
    lone.connect(ep)
    pub = other.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = generate_latest().decode()
        if ('socket="ROUTER@tcp://127.0.0.1:*"} 4.0' in text
                and 'zmq_listening{endpoint="tcp://127.0.0.1:*",socket="srv-tcp://127.0.0.1:*"} 1.0'
                in text):
            break
        time.sleep(0.05)
    print(json.dumps({"ep": ep, "text": text, "pid": os.getpid(),
                      "count": hook.instrumented}), flush=True)
    sys.stdin.readline()
    """
)


def test_instrument_sockets_names_and_counts_from_creation() -> None:
    app = subprocess.Popen(
        [sys.executable, "-c", HOOKED],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert app.stdout is not None and app.stdin is not None
        report = json.loads(app.stdout.readline())
        s = parse_metrics(report["text"])
        port = int(report["ep"].rsplit(":", 1)[1])
        router = {"socket": "ROUTER@tcp://127.0.0.1:*", "endpoint": "tcp://127.0.0.1:*"}
        # 3 DEALERs of ctx and one of the other context: the ROUTER's 4 peers, as the kernel.
        assert value(s, "zmq_connections", **router) == 4
        assert established_in(report["pid"], local_port=port) == 4
        assert value(s, "zmq_listening", **router) == 1
        names = {"DEALER@" + report["ep"] + suffix for suffix in ("", "#2", "#3")}
        for name in names:
            assert value(s, "zmq_connections", socket=name, endpoint=report["ep"]) == 1
        assert report["count"] == 4
        # The callable's names; its None left the other context's DEALER alone.
        assert value(s, "zmq_listening", socket="srv-tcp://127.0.0.1:*") == 1
        dealers = {
            dict(lbl)["socket"]
            for (name, lbl) in s
            if name == "zmq_connections" and dict(lbl)["socket"].startswith("DEALER")
        }
        assert dealers == names
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.wait(15) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()


DIRECT = textwrap.dedent(
    """\
    import json, sys, zmq, zmq.asyncio, exporter
    from prometheus_client import generate_latest

    class AppSocket(zmq.Socket):                 # an application's own socket class
        received = 0
        def __init__(self, ctx, kind):
            super().__init__(ctx, kind)
            self.received = 0

    ctx, actx, plain = zmq.Context(), zmq.asyncio.Context(), zmq.Context()
    hook = exporter.instrument_sockets(ctx, heartbeat=5)
    ahook = exporter.instrument_sockets(actx, heartbeat=5)
    router = zmq.Socket(ctx, zmq.ROUTER)         # not through ctx.socket()
    twins = [zmq.Socket.shadow(router), zmq.Socket(shadow=router.underlying), zmq.Socket(router)]
    router.bind("tcp://127.0.0.1:*")
    pull = AppSocket(ctx, zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    pub = zmq.asyncio.Socket(actx, zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    adealer = zmq.asyncio.Socket(actx, zmq.DEALER)
    ep = {"router": router.last_endpoint.decode(), "pull": pull.last_endpoint.decode(),
          "pub": pub.last_endpoint.decode()}
    adealer.connect(ep["router"])
    twins.append(zmq.Socket.shadow(pull))        # shadows of instrumented sockets
    twins.append(zmq.asyncio.Socket.from_socket(pull))
    # Peers from a context no hook applies to, made both ways: left alone.
    peers = [zmq.Socket(plain, zmq.DEALER), plain.socket(zmq.DEALER)]
    for peer in peers:
        peer.connect(ep["router"])
    push = zmq.Socket(plain, zmq.PUSH)
    push.connect(ep["pull"])
    sub = zmq.Socket(plain, zmq.SUB)
    sub.connect(ep["pub"])
    ivl = {name: s.getsockopt(zmq.HEARTBEAT_IVL) for name, s in
           (("router", router), ("pull", pull), ("pub", pub), ("adealer", adealer),
            ("peer", peers[0]), ("push", push))}
    print(json.dumps({"ep": ep, "ivl": ivl}), flush=True)
    for line in sys.stdin:                        # one scrape per line
        print(json.dumps({"text": generate_latest().decode(),
                          "count": [hook.instrumented, ahook.instrumented]}), flush=True)
    """
)


def test_sockets_made_by_their_constructor_are_instrumented() -> None:
    """`zmq.Socket(ctx, type)`, an application's subclass instantiated directly and
    `zmq.asyncio.Socket(actx, type)` are instrumented at their first bind/connect by the
    hook of their context (heartbeat set at creation); their shadows (zmq.asyncio's own
    included) are not instrumented again; a context no hook applies to is left alone."""
    app = subprocess.Popen(
        [sys.executable, "-c", DIRECT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert app.stdout is not None and app.stdin is not None
        start = json.loads(app.stdout.readline())
        ep = start["ep"]
        assert start["ivl"] == {
            "router": 5000, "pull": 5000, "pub": 5000, "adealer": 5000, "peer": 0, "push": 0
        }  # fmt: skip
        expected = {
            ("ROUTER@tcp://127.0.0.1:*", "tcp://127.0.0.1:*"): 3,  # 2 peers + the asyncio DEALER
            ("PULL@tcp://127.0.0.1:*", "tcp://127.0.0.1:*"): 1,
            ("PUB@tcp://127.0.0.1:*", "tcp://127.0.0.1:*"): 1,
            ("DEALER@" + ep["router"], ep["router"]): 1,
        }
        report: dict[str, object] = {}

        def scrape() -> dict[str, object]:
            assert app.stdin is not None and app.stdout is not None
            app.stdin.write("\n")
            app.stdin.flush()
            return dict(json.loads(app.stdout.readline()))

        def all_connected() -> bool:
            report.update(scrape())
            s = parse_metrics(str(report["text"]))
            return all(
                value(s, "zmq_connections", socket=name, endpoint=endpoint) == n
                for (name, endpoint), n in expected.items()
            )

        wait_until(all_connected, timeout=15, what="every socket's peers connected")
        s = parse_metrics(str(report["text"]))
        # Exactly these four sockets: no shadow, no peer, no monitor PAIR of the exporter's.
        info = {dict(lbl)["socket"] for (name, lbl) in s if name == "zmq_socket_info"}
        assert info == {name for name, _endpoint in expected}
        assert report["count"] == [2, 2]
        for socket in ("ROUTER", "PULL", "PUB"):
            listening = value(s, "zmq_listening", socket=f"{socket}@tcp://127.0.0.1:*")
            assert listening == 1, socket
        router_port = int(ep["router"].rsplit(":", 1)[1])
        assert established_in(app.pid, local_port=router_port) == 3  # the kernel agrees
        app.stdin.close()
        assert app.wait(15) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()


FAMILY = textwrap.dedent(
    """\
    # An unmodified program: forks a worker, spawns a multiprocessing child; each has sockets.
    import multiprocessing, os, sys, time, zmq

    def child(endpoint):
        d = zmq.Context().socket(zmq.DEALER)
        d.connect(endpoint)
        d.send(b"spawned")
        time.sleep(30)

    if __name__ == "__main__":
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind("tcp://127.0.0.1:*")
        ep = router.last_endpoint.decode()
        pid = os.fork()
        if pid == 0:
            d = zmq.Context().socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(ep)
            d.send(b"forked")
            time.sleep(30)
            os._exit(0)
        proc = multiprocessing.get_context("spawn").Process(target=child, args=(ep,))
        proc.start()
        got = sorted(router.recv_multipart()[1] for _ in range(2))
        print(ep, os.getpid(), pid, proc.pid, zmq.Socket(ctx, zmq.DEALER)
              .getsockopt(zmq.HEARTBEAT_IVL), b",".join(got).decode(), flush=True)
        sys.stdin.readline()
        os.kill(pid, 9)
        proc.kill()
    """
)


def test_launcher_instruments_every_process_of_an_unmodified_program(tmp_path: Path) -> None:
    relay = f"ipc://{tmp_path}/relay.sock"
    script = tmp_path / "family.py"
    script.write_text(FAMILY)
    config = f'relay:\n  listen: ["{relay}"]\n  expire: 5m\n'
    with Daemon(config) as daemon:
        app = subprocess.Popen(
            [*LAUNCHER, "--relay", relay, "--heartbeat", "5s", sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert app.stdout is not None and app.stdin is not None
            ep, main_pid, fork_pid, spawn_pid, ivl, got = app.stdout.readline().split()
            assert got == "forked,spawned"
            # zmq.Socket(ctx, type) is hooked too: heartbeat set at creation.
            assert ivl == "5000"
            host = os.uname().nodename

            def three() -> bool:
                s = daemon.scrape()
                ok = (
                    value(
                        s,
                        "zmq_connections",
                        process=f"{host}/{main_pid}",
                        endpoint="tcp://127.0.0.1:*",
                    )
                    == 2
                )
                for pid in (fork_pid, spawn_pid):
                    ok = (
                        ok
                        and value(s, "zmq_connections", process=f"{host}/{pid}", endpoint=ep) == 1
                    )
                return ok

            wait_until(three, timeout=20, what="three processes at the sidecar")
            assert established_in(int(main_pid), local_port=int(ep.rsplit(":", 1)[1])) == 2
            app.stdin.write("\n")
            app.stdin.flush()
            assert app.wait(20) == 0
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()


def test_launcher_heartbeat_and_bad_values(tmp_path: Path) -> None:
    code = "import zmq; print(zmq.Context().socket(zmq.DEALER).getsockopt(zmq.HEARTBEAT_IVL))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    on = subprocess.run(
        [*LAUNCHER, "--heartbeat", "5s", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert on.stdout.strip() == "5000", on.stderr
    # A program whose first socket is made by its constructor starts the hooks too.
    direct = code.replace(
        "zmq.Context().socket(zmq.DEALER)", "zmq.Socket(zmq.Context(), zmq.DEALER)"
    )
    first = subprocess.run(
        [*LAUNCHER, "--heartbeat", "5s", sys.executable, "-c", direct],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert first.stdout.strip() == "5000", first.stderr
    off = subprocess.run(
        [*LAUNCHER, sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert off.stdout.strip() == "0", off.stderr
    bad = subprocess.run(
        [*LAUNCHER, "--heartbeat", "5", sys.executable, "-c", "pass"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert bad.returncode == 2 and "ZMQ_EXPORTER_HEARTBEAT" in bad.stderr
    missing = subprocess.run(
        [*LAUNCHER, "no-such-command-x"], capture_output=True, text=True, timeout=60, env=env
    )
    assert missing.returncode == 127


LATE = textwrap.dedent(
    """\
    import logging, sys, time, zmq, exporter
    from prometheus_client import generate_latest
    logging.basicConfig(stream=sys.stderr)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")              # bound before instrument(): late
    ep = router.last_endpoint.decode()
    early = ctx.socket(zmq.DEALER)
    early.connect(ep)
    router.RCVTIMEO = 10_000  # connected once its first message arrives
    early.send(b"hello")
    router.recv_multipart()
    exporter.instrument(router, "late", relay=sys.argv[1], relay_id="late/1")
    ok = ctx.socket(zmq.DEALER)
    exporter.instrument(ok, "ok", relay=sys.argv[1], relay_id="late/1")
    ok.connect(ep)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = generate_latest().decode()
        if 'zmq_accepted_total{endpoint="%s",socket="late"} 1.0' % ep in text:
            break
        time.sleep(0.05)
    print(ep, flush=True)
    print(text, flush=True)
    sys.stdin.readline()
    """
)


def test_late_instrumentation_serves_no_wrong_gauge(tmp_path: Path) -> None:
    relay = f"ipc://{tmp_path}/relay.sock"
    with Daemon(f'relay:\n  listen: ["{relay}"]\n  expire: 5m\n') as daemon:
        app = subprocess.Popen(
            [sys.executable, "-c", LATE, relay],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert app.stdout is not None and app.stdin is not None
            ep = app.stdout.readline().strip()
            lines = []
            while (line := app.stdout.readline()) and not line.startswith("zmq_exporter_build"):
                lines.append(line)
            s = parse_metrics("".join(lines))
            late = {"socket": "late", "endpoint": ep}
            # The kernel has 2 connections and a listener; what happened before
            # instrument() is unknown, so no gauge is served rather than 0 or 1.
            for gauge in ("zmq_listening", "zmq_connections", "zmq_connection_ready"):
                assert value(s, gauge, socket="late") is None, gauge
            # What it learned: the endpoint (ZMQ_LAST_ENDPOINT, a bind: this process
            # listens on it), and counters from instrument() on: the one new peer.
            assert value(s, "zmq_accepted_total", **late) == 1
            assert value(s, "zmq_socket_info", socket="late") == 1
            assert value(s, "zmq_connections", socket="ok", endpoint=ep) == 1
            # The sidecar gets the socket instrumented in time, not the late one.
            wait_until(
                lambda: (
                    value(daemon.scrape(), "zmq_connections", process="late/1", socket="ok") == 1
                ),
                timeout=10,
                what="the in-time socket at the sidecar",
            )
            assert total(daemon.scrape(), "zmq_socket_info", socket="late") == 0
            app.stdin.write("\n")
            app.stdin.flush()
            assert app.wait(15) == 0
            assert app.stderr is not None
            warnings = [ln for ln in app.stderr.read().splitlines() if "WARNING" in ln]
            assert len(warnings) == 1 and "'late'" in warnings[0] and ep in warnings[0]
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()


HEARTBEAT_APP = textwrap.dedent(
    """\
    import sys, time, zmq
    from prometheus_client import generate_latest
    router = zmq.Context().socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    print(router.last_endpoint.decode(), flush=True)
    for line in sys.stdin:
        time.sleep(0.1)
        text = generate_latest().decode()
        print([ln for ln in text.splitlines() if ln.startswith("zmq_connections{")][0],
              flush=True)
    """
)
PEER = (
    "import sys, time, zmq; d = zmq.Context().socket(zmq.DEALER); d.connect(sys.argv[1]); "
    "print('up', flush=True); time.sleep(60)"
)


def test_launcher_heartbeat_drops_a_frozen_peer(tmp_path: Path) -> None:
    """ZMQ_EXPORTER_HEARTBEAT set at creation: a SIGSTOPped peer (its kernel still holds the
    connection) leaves zmq_connections once the ROUTER's heartbeat times out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    app = subprocess.Popen(
        [*LAUNCHER, "--heartbeat", "500ms", sys.executable, "-c", HEARTBEAT_APP],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    peer = None
    try:
        assert app.stdout is not None and app.stdin is not None
        endpoint = app.stdout.readline().strip()
        peer = subprocess.Popen(
            [sys.executable, "-c", PEER, endpoint], stdout=subprocess.PIPE, text=True
        )
        assert peer.stdout is not None and peer.stdout.readline().strip() == "up"

        def gauge() -> float:
            assert app.stdin is not None and app.stdout is not None
            app.stdin.write("\n")
            app.stdin.flush()
            return float(app.stdout.readline().rsplit(" ", 1)[1])

        wait_until(lambda: gauge() == 1, timeout=10, what="the peer connected")
        os.kill(peer.pid, signal.SIGSTOP)
        # Timeout 1 s (twice the interval): generous bound for a loaded machine.
        wait_until(lambda: gauge() == 0, timeout=15, what="the frozen peer dropped")
        port = int(endpoint.rsplit(":", 1)[1])
        assert established_in(app.pid, local_port=port) == 0  # the ROUTER closed it
    finally:
        if peer is not None:
            peer.kill()
            peer.wait()
        if app.stdin is not None:
            app.stdin.close()
        app.wait(15)
