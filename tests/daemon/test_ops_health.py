"""Health and readiness transitions, and the landing page in a real headless Chromium
(Debian `chromium`): a screenshot that is a real, non-blank PNG, and the socket table's
rows in the rendered DOM with the values the metrics show."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import zmq

from exporter import __version__

from helpers import ROOT, Daemon, http_get, parse_metrics, total, value
from testkit import free_port, wait_until

SOCKETS = 100


def status_of(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


# A real daemon whose engine stops before it creates socket number HOLD_AT + 1, until the
# test writes a byte to the pipe it passes: the not-ready phase is held open whatever the
# machine's speed (stderr is a file; logging does not hold anything, exporter/logs.py).
HOLD_AT = SOCKETS // 2
HELD_DAEMON = """
import os
import sys

import exporter.monitor.engine as engine
from exporter import cli

hold_fd, hold_at = int(sys.argv.pop(1)), int(sys.argv.pop(1))
install = engine.Engine._install
installed = [0]


def held_install(self, managed):
    if installed[0] == hold_at:
        os.read(hold_fd, 1)  # blocks the engine thread until the test writes a byte
    installed[0] += 1
    install(self, managed)


engine.Engine._install = held_install
sys.exit(cli.main(sys.argv[1:]))
"""


def test_health_and_readiness_transitions(tmp_path: Path) -> None:
    """/-/healthy answers 200 from the moment the web server listens; /-/ready answers 503
    until every socket exists with its monitor attached, then 200, never the other way
    round. The not-ready phase is held open, whatever the machine's speed: the engine
    thread blocks (on a pipe of the test's) before it creates socket HOLD_AT + 1, while the
    web thread keeps answering."""
    lines = ["sockets:"] + [
        f"  - {{name: s{i}, type: DEALER, bind: [tcp://127.0.0.1:*, 'ipc://{tmp_path}/{i}']}}"
        for i in range(SOCKETS)
    ]
    config = tmp_path / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log_path = tmp_path / "daemon.log"
    hold_read, hold_write = os.pipe()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", HELD_DAEMON, str(hold_read), str(HOLD_AT),
             f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=debug"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            pass_fds=(hold_read,),
        )  # fmt: skip
    os.close(hold_read)

    def log_text() -> str:
        return log_path.read_text()

    try:
        # Held: alive and answering, not ready, sockets still being created.
        wait_until(lambda: status_of(port, "/-/healthy") == 200, timeout=30, what="web up")
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: (
                value(parse_metrics(http_get(url + "/metrics")), "zmq_exporter_sockets") == HOLD_AT
            ),
            timeout=30,
            what=f"the engine held at {HOLD_AT} sockets",
        )
        for _ in range(10):  # half a second at least, and as long as the test wishes
            assert status_of(port, "/-/ready") == 503
            assert status_of(port, "/-/healthy") == 200
            created = value(parse_metrics(http_get(url + "/metrics")), "zmq_exporter_sockets")
            assert created == HOLD_AT, created
            time.sleep(0.05)
        assert proc.poll() is None
        assert "zmq-exporter started" not in log_text()

        # Released: the engine goes on; ready once, and from then on.
        os.write(hold_write, b"x")
        seen: list[tuple[int | None, int | None]] = []
        deadline = time.monotonic() + 30
        for _ in range(100_000):
            assert time.monotonic() < deadline, seen[-5:]
            ready = status_of(port, "/-/ready")
            seen.append((status_of(port, "/-/healthy"), ready))
            if ready == 200:
                break
        for _ in range(5):
            seen.append((status_of(port, "/-/healthy"), status_of(port, "/-/ready")))
        assert all(h == 200 for h, _ in seen), seen
        readiness = [r for _, r in seen]
        first_ready = readiness.index(200)
        assert set(readiness[:first_ready]) <= {503} and set(readiness[first_ready:]) == {200}
        # Ready means every socket exists with its monitor attached: each bind's LISTENING
        # event is counted.
        assert value(parse_metrics(http_get(url + "/metrics")), "zmq_exporter_sockets") == SOCKETS
        wait_until(
            lambda: (
                total(parse_metrics(http_get(url + "/metrics")), "zmq_bind_succeeded_total")
                == 2 * SOCKETS
            ),
            what="every socket's monitor reported LISTENING",
        )
        # The daemon said it started only after its sockets, every bind logged before.
        text = wait_until(lambda: log_text() if "zmq-exporter started" in log_text() else "")
        binds = text[: text.index("zmq-exporter started")].count('msg="bind succeeded"')
        assert binds == 2 * SOCKETS, binds

        # Stays ready through a reload, failed or not.
        config.write_text("sockets: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in log_text(), what="reload failure logged")
        assert status_of(port, "/-/ready") == 200
        assert status_of(port, "/-/healthy") == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(hold_write)
    # Gone after SIGTERM.
    assert status_of(port, "/-/healthy") is None


# -- landing page in Chromium ---------------------------------------------------------------


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian chromium is not installed (tests/system-packages.txt)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_chromium(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    profile = tempfile.mkdtemp(prefix="zmq-exporter-chromium-")
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the chromium we started
        proc.communicate()
        raise
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Rows(HTMLParser):
    """Rows of <table id="sockets">: attributes and cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str | None], list[str]]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._in_table = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", "sockets") in attrs:
            self._in_table = True
        elif tag == "a":
            self.links.append(dict(attrs).get("href") or "")
        elif self._in_table and tag == "tr" and any(k == "data-socket" for k, _ in attrs):
            self.rows.append((dict(attrs), []))
        elif self._in_table and tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def png_pixels_vary(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the image data) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_landing_page_in_chromium(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    router_port, dead_port = free_port(), free_port()
    router_ep = f"tcp://127.0.0.1:{router_port}"
    dead_ep = f"tcp://127.0.0.1:{dead_port}"
    config = textwrap.dedent(f"""\
        sockets:
          - name: backend
            type: ROUTER
            bind: [{router_ep}]
          - name: orphan
            type: DEALER
            connect: [{dead_ep}]
            options: {{reconnect_ivl: 100ms}}
        """)
    with Daemon(config) as daemon:
        dealers = []
        try:
            for _ in range(3):
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(router_ep)
                dealers.append(dealer)
            wait_until(
                lambda: (
                    value(daemon.scrape(), "zmq_connections", socket="backend") == 3
                    and (value(daemon.scrape(), "zmq_connect_retried_total", socket="orphan") or 0)
                    > 0
                ),
                what="3 dealers connected and orphan retrying",
            )
            shot = tmp_path / "status.png"
            started = time.monotonic()
            result = run_chromium(["--window-size=1200,700", f"--screenshot={shot}", daemon.url])
            assert result.returncode == 0, result.stderr.decode()[-2000:]
            dom = run_chromium(["--dump-dom", daemon.url])
            elapsed = time.monotonic() - started
            assert dom.returncode == 0, dom.stderr.decode()[-2000:]
        finally:
            for dealer in dealers:
                dealer.close(linger=0)

    width, height, distinct = png_pixels_vary(shot.read_bytes())
    print(
        f"chromium: screenshot {shot.stat().st_size} bytes {width}x{height}, "
        f"{distinct} distinct byte values; screenshot + DOM in {elapsed:.1f}s"
    )
    assert (width, height) == (1200, 700)
    assert distinct > 16, "the screenshot is blank"

    page = Rows()
    page.feed(dom.stdout.decode())
    text = " ".join(page.text)
    assert f"Version {__version__}" in text
    assert {"/metrics", "/-/healthy", "/-/ready"} <= set(page.links)
    rows = {(attrs["data-socket"], attrs["data-endpoint"]): cells for attrs, cells in page.rows}
    assert set(rows) == {("backend", router_ep), ("orphan", dead_ep)}
    # Socket, Type, Role, Endpoint, Connections, Listening, Last event
    backend = rows[("backend", router_ep)]
    assert backend[:6] == ["backend", "ROUTER", "bind", router_ep, "3", "yes"], backend
    assert backend[6].endswith(" UTC") and backend[6] != "-", backend
    orphan = rows[("orphan", dead_ep)]
    assert orphan[:6] == ["orphan", "DEALER", "connect", dead_ep, "0", "-"], orphan
    assert orphan[6].split(" at ")[0] in {"CONNECT_DELAYED", "CLOSED", "CONNECT_RETRIED"}, orphan
