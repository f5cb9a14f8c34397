"""Library mode in a gevent monkey-patched process with zmq.green sockets: the reader, the
connection sampler and the relay sender run on real OS threads (exporter/core/native.py),
the hub keeps running, and the process exits without closing anything. Real processes: the
patched application in a subprocess, a real sidecar daemon."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT, Daemon, established_in, missing_tool, value, wait_until

if importlib.util.find_spec("gevent") is None:
    missing_tool("gevent (the test extra)")

GREEN_APP = textwrap.dedent(
    """\
    from gevent import monkey
    monkey.patch_all()
    import json, sys, time
    import gevent
    import zmq.green as zmq
    import exporter
    from prometheus_client import generate_latest

    relay = sys.argv[1]
    gaps = []
    def ticker():  # the hub's heartbeat: a long gap means something blocked it
        last = time.monotonic()
        while True:
            gevent.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
    gevent.spawn(ticker)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    exporter.instrument(router, "green-router", relay=relay, relay_id="green/1")
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    dealers = []
    for n in range(3):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        exporter.instrument(d, f"green-dealer-{n}", relay=relay, relay_id="green/1")
        d.connect(endpoint)
        dealers.append(d)
    def echo():
        while True:
            ident, msg = router.recv_multipart()
            router.send_multipart([ident, msg])
    gevent.spawn(echo)
    for _ in range(200):  # round trips through the hub while the reader works
        for d in dealers:
            d.send(b"ping")
        for d in dealers:
            assert d.recv() == b"ping"
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = generate_latest().decode()
        if 'zmq_connections{endpoint="%s",socket="green-router"} 3.0' % endpoint in text:
            break
        gevent.sleep(0.05)
    import threading
    print(json.dumps({
        "endpoint": endpoint,
        "text": text,
        "max_gap": max(gaps),
        "gevent_threads": [t.name for t in threading.enumerate()],
    }), flush=True)
    sys.stdin.readline()  # the test checks the sidecar, then lets us exit
    # exit with everything open and instrumented: no close(), no term()
    """
)


def _ipc(tmp: Path) -> str:
    return f"ipc://{tmp}/relay.sock"


def _relay_config(endpoint: str) -> str:
    return f'relay:\n  listen: ["{endpoint}"]\n  expire: 5m\n'


def test_green_app_instruments_relays_and_exits(tmp_path: Path) -> None:
    endpoint = _ipc(tmp_path)
    script = tmp_path / "green_app.py"
    script.write_text(GREEN_APP)
    with Daemon(_relay_config(endpoint)) as daemon:
        app = subprocess.Popen(
            [sys.executable, str(script), endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert app.stdout is not None and app.stdin is not None
            line = app.stdout.readline()
            assert line, app.stderr.read() if app.stderr else ""
            report = json.loads(line)
            ep = report["endpoint"]
            port = int(ep.rsplit(":", 1)[1])
            # The application's own registry: 3 peers on the ROUTER, as the kernel has.
            assert f'zmq_connections{{endpoint="{ep}",socket="green-router"}} 3.0' in report["text"]
            assert established_in(app.pid, local_port=port) == 3
            # No thread of ours is a greenlet: threading (patched) sees only the main one.
            assert report["gevent_threads"] == ["MainThread"]
            # The hub was never blocked for long (generous: a loaded 2-core machine).
            assert report["max_gap"] < 1.0, report["max_gap"]
            labels = {"socket": "green-router", "process": "green/1", "endpoint": ep}
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connections", **labels) == 3,
                timeout=10,
                what="the green application's state at the sidecar",
            )
            tasks = {p.read_text().strip() for p in Path(f"/proc/{app.pid}/task").glob("*/comm")}
            assert {"zmq-exporter-re", "zmq-exporter-li"} <= {t[:15] for t in tasks}, tasks
            app.stdin.write("\n")
            app.stdin.flush()
            app.wait(15)  # never deadlocks at exit
            assert app.returncode == 0, app.stderr.read() if app.stderr else ""
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()


PLAIN_APP = textwrap.dedent(
    """\
    import sys, zmq, exporter
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    exporter.instrument(s, "plain")
    s.bind("tcp://127.0.0.1:*")
    exporter.instrument_sockets(None)
    d = ctx.socket(zmq.DEALER)
    d.connect(s.last_endpoint.decode())
    print("gevent" in sys.modules, flush=True)
    """
)


def test_library_never_imports_gevent() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_APP], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
