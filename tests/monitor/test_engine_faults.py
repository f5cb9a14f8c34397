"""The engine never dies silently and never half-applies a config.

Each test reproduces a failure seen on 8b429ee: the retry backoff overflowed at attempt
1025 and killed the engine thread (metrics froze, /-/ready stayed 200, reloads hung 30 s);
a reload that validated but could not be applied closed a running socket for good. Faults
are injected at the seams the engine owns (a socket's reader, the loop itself, socket
creation); the sockets, ports and processes are real.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

import exporter.core.state as state_module
import exporter.monitor.engine as engine_module
import exporter.monitor.sockets as sockets_module
from exporter.config import parse_config
from exporter.core.events import Event
from exporter.daemon import FD_RESERVE
from exporter.monitor.engine import (
    MAX_BACKOFF_EXPONENT,
    ApplyError,
    Engine,
    EngineStopped,
    retry_delay,
)
from exporter.monitor.fdbudget import BASE_FDS, FDS_PER_SOCKET
from exporter.monitor.reader import Reader

from helpers import ROOT, Daemon, http_get, parse_metrics, value
from testkit import free_port, wait_until


def settings_of(text: str) -> Any:
    return parse_config(textwrap.dedent(text), "test.yml")


def accepted(engine: Engine, name: str) -> float:
    for sock in engine.snapshot().sockets:
        if sock.name == name:
            return sum(ep.counts.get(Event.ACCEPTED, 0) for ep in sock.endpoints)
    raise AssertionError(f"no socket {name!r}")


# -- backoff ------------------------------------------------------------------------------


def test_retry_delay_is_capped_for_any_attempt() -> None:
    for base, cap in ((0.001, 0.001), (1.0, 30.0), (2147483.647, 2147483.647), (0.001, 3600.0)):
        previous = 0.0
        for attempt in (*range(1, 3000), 10**6, 10**18):
            delay = retry_delay(attempt, base, cap)
            assert base <= delay <= cap or delay == cap
            assert delay >= previous
            previous = delay
        assert retry_delay(10**18, base, cap) == cap
    assert retry_delay(1, 1.0, 30.0) == 1.0
    assert retry_delay(3, 1.0, 30.0) == 4.0
    assert retry_delay(MAX_BACKOFF_EXPONENT + 5, 1e-9, 1e30) == 1e-9 * 2.0**MAX_BACKOFF_EXPONENT


def test_bind_retries_past_attempt_1025_without_killing_the_engine(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """Two ROUTERs on one port, retry interval 1 ms: on 8b429ee attempt 1025 raised
    OverflowError in the engine thread and every metric froze."""
    port = free_port()
    engine = Engine(ctx)
    engine.start()
    settings = settings_of(f"""\
        global:
          bind_retry_interval: 1ms
          bind_retry_max_interval: 1ms
        sockets:
          - {{name: first, type: ROUTER, bind: ["tcp://127.0.0.1:{port}"]}}
          - {{name: second, type: ROUTER, bind: ["tcp://127.0.0.1:{port}"]}}
        """)
    try:
        engine.apply(settings).result(10)
        wait_until(
            lambda: engine.snapshot().stats.attach_failures > 1200,
            timeout=30,
            what="more than 1,200 bind retries",
        )
        snap = engine.snapshot()
        assert snap.failure is None and snap.ready
        # Still serving: a command is answered and the retries keep being counted.
        engine.apply(settings).result(5)
        before = engine.snapshot().stats.attach_failures
        wait_until(lambda: engine.snapshot().stats.attach_failures > before + 50, timeout=10)
    finally:
        engine.stop()


# -- failures inside the engine ------------------------------------------------------------


def test_a_failing_socket_is_counted_and_the_others_go_on(
    ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = free_port(), free_port()
    real_apply_event = state_module.apply_event  # what the engine calls

    def apply_event(state: Any, *args: Any) -> None:
        if state.name == "bad":
            raise RuntimeError("injected reducer failure")
        real_apply_event(state, *args)

    monkeypatch.setattr(engine_module, "apply_event", apply_event)
    engine = Engine(ctx)
    engine.start()
    clients: list[zmq.Socket[bytes]] = []
    try:
        engine.apply(
            settings_of(f"""\
                sockets:
                  - {{name: good, type: ROUTER, bind: ["tcp://127.0.0.1:{good}"]}}
                  - {{name: bad, type: ROUTER, bind: ["tcp://127.0.0.1:{bad}"]}}
                """)
        ).result(10)
        for port in (good, bad, good, bad):
            client = ctx.socket(zmq.DEALER)
            client.connect(f"tcp://127.0.0.1:{port}")
            clients.append(client)
        wait_until(lambda: accepted(engine, "good") == 2, what="good socket counts")
        wait_until(lambda: engine.snapshot().stats.engine_errors >= 1, what="error counted")
        snap = engine.snapshot()
        assert snap.ready and snap.failure is None
    finally:
        for client in clients:
            client.close(linger=0)
        engine.stop()


def test_engine_thread_death_is_visible_and_fails_commands_at_once(
    ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    failures: list[str] = []
    engine = Engine(ctx, on_failure=failures.append)
    engine.start()
    settings = settings_of(f"""\
        sockets:
          - {{name: r, type: ROUTER, bind: ["tcp://127.0.0.1:{port}"]}}
        """)
    engine.apply(settings).result(10)
    assert engine.snapshot().ready

    def broken(self: Reader) -> None:
        raise RuntimeError("injected loop failure")

    monkeypatch.setattr(Reader, "_run_commands", broken)
    pending = engine.apply(settings)  # wakes the loop, which now fails
    wait_until(lambda: failures, what="on_failure called")
    assert failures == ["RuntimeError: injected loop failure"]
    with pytest.raises(EngineStopped):  # the command in flight is answered, not lost
        pending.result(1)
    snap = engine.snapshot()
    assert not snap.ready
    assert snap.failure == "RuntimeError: injected loop failure"
    start = time.monotonic()
    with pytest.raises(EngineStopped, match="injected loop failure"):
        engine.apply(settings).result(30)
    assert time.monotonic() - start < 1.0  # not the 30 s apply timeout
    engine.stop()
    assert len(failures) == 1


INJECT = """\
import sys, threading, time
from exporter import cli
from exporter.monitor.reader import Reader

real = Reader._run_timers
started = time.monotonic()

def run_timers(self):
    if time.monotonic() - started > 1.5:
        raise RuntimeError("injected loop failure")
    real(self)

Reader._run_timers = run_timers
sys.exit(cli.main(sys.argv[1:]))
"""


def test_daemon_exits_non_zero_when_the_engine_dies(tmp_path: Path) -> None:
    """A real daemon process whose engine loop fails after 1.5 s: it must not stay up as a
    zombie that answers /-/ready 200 with frozen numbers; it logs the cause once and exits
    70 (EX_SOFTWARE) so that its supervisor restarts it."""
    port, web = free_port(), free_port()
    config = tmp_path / "config.yml"
    config.write_text(
        textwrap.dedent(f"""\
            global: {{bind_retry_interval: 100ms}}
            sockets:
              # Two binds of one port: the second is retried, so the loop runs timers.
              - {{name: r, type: ROUTER, bind: ["tcp://127.0.0.1:{port}"]}}
              - {{name: r2, type: ROUTER, bind: ["tcp://127.0.0.1:{port}"]}}
            """)
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            INJECT,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 70, out
    assert out.count("engine thread ended") == 1, out
    assert "injected loop failure" in out


# -- reload is a transaction -----------------------------------------------------------------


def test_apply_that_fails_changes_nothing(
    ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating one of the new sockets fails: the socket being changed keeps running with
    its connections and counters, the ones after it are not skipped half-way, and the
    next good apply does not reset anything that it does not change."""
    keep, change = free_port(), free_port()
    engine = Engine(ctx)
    engine.start()
    client = ctx.socket(zmq.DEALER)
    try:
        first = settings_of(f"""\
            sockets:
              - {{name: keep, type: ROUTER, bind: ["tcp://127.0.0.1:{keep}"]}}
              - {{name: change, type: ROUTER, bind: ["tcp://127.0.0.1:{change}"]}}
            """)
        engine.apply(first).result(10)
        client.connect(f"tcp://127.0.0.1:{change}")
        wait_until(lambda: accepted(engine, "change") == 1, what="accept counted")
        changed = settings_of(f"""\
            sockets:
              - {{name: keep, type: ROUTER, bind: ["tcp://127.0.0.1:{keep}"]}}
              - name: change
                type: ROUTER
                bind: ["tcp://127.0.0.1:{change}"]
                options: {{sndhwm: 5}}
              - {{name: added, type: PULL, bind: ["tcp://127.0.0.1:{free_port()}"]}}
            """)
        real_open = sockets_module.open_socket  # what the engine calls

        def open_socket(context: Any, spec: Any) -> Any:
            if spec.name == "added":
                raise zmq.ZMQError(errno.EMFILE)
            return real_open(context, spec)

        monkeypatch.setattr(engine_module, "open_socket", open_socket)
        fds_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ApplyError, match=r"'added'.*Too many open files"):
            engine.apply(changed).result(10)
        # What was opened is closed again (libzmq closes fds asynchronously).
        wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, what="fds back")
        snap = engine.snapshot()
        assert [s.name for s in snap.sockets] == ["keep", "change"]
        assert accepted(engine, "change") == 1
        # The old socket still serves: a second client is accepted and counted.
        second = ctx.socket(zmq.DEALER)
        second.connect(f"tcp://127.0.0.1:{change}")
        wait_until(lambda: accepted(engine, "change") == 2, what="old socket still serving")
        second.close(linger=0)
        monkeypatch.setattr(engine_module, "open_socket", real_open)
        result = engine.apply(changed).result(10)
        assert result.recreated == ["change"] and result.added == ["added"]
        assert result.unchanged == ["keep"]
    finally:
        client.close(linger=0)
        engine.stop()


def reload_status(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url + "/-/reload", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_unappliable_reload_keeps_sockets_and_counters() -> None:
    """On 8b429ee, `sndhwm: 3000000000` on a running socket closed it, never recreated it,
    and the next good reload reset its zmq_accepted_total to 0."""
    port = free_port()
    good = f"""\
sockets:
  - name: backend
    type: ROUTER
    bind: ["tcp://127.0.0.1:{port}"]
"""
    with Daemon(good) as daemon, zmq.Context() as context:
        clients = []
        for _ in range(3):
            client = context.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            client.connect(f"tcp://127.0.0.1:{port}")
            clients.append(client)
        wait_until(
            lambda: value(daemon.scrape(), "zmq_accepted_total", socket="backend") == 3,
            what="3 accepts",
        )
        assert daemon.config_path is not None
        daemon.config_path.write_text(good + "    options: {sndhwm: 3000000000}\n")
        status, body = reload_status(daemon.url)
        assert status == 500, body
        samples = daemon.scrape()
        assert value(samples, "zmq_exporter_config_last_reload_successful") == 0
        assert value(samples, "zmq_accepted_total", socket="backend") == 3
        assert value(samples, "zmq_connections", socket="backend") == 3
        daemon.config_path.write_text(good)
        status, body = reload_status(daemon.url)
        assert status == 200, body
        extra = context.socket(zmq.DEALER)
        extra.setsockopt(zmq.LINGER, 0)
        extra.connect(f"tcp://127.0.0.1:{port}")
        clients.append(extra)
        wait_until(
            lambda: value(daemon.scrape(), "zmq_accepted_total", socket="backend") == 4,
            what="counter continues from 3",
        )
        for client in clients:
            client.close()


# -- file descriptor budget ------------------------------------------------------------------


def many_sockets(count: int) -> str:
    lines = ["sockets:"]
    for index in range(count):
        endpoint = f"ipc://@zmq-exporter-fd-{os.getpid()}-{index}"
        lines.append(f"  - {{name: s{index}, type: ROUTER, bind: ['{endpoint}']}}")
    return "\n".join(lines) + "\n"


def limited(nofile: int) -> Any:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return preexec


def test_fd_budget_refuses_start_check_and_reload_that_cannot_fit(tmp_path: Path) -> None:
    """On 8b429ee, with a low RLIMIT_NOFILE, a reload to more sockets left the process with
    every fd used and HTTP unreachable, or aborted it inside libzmq."""
    per_socket = FDS_PER_SOCKET + 1
    start_count, big_count = 50, 400
    nofile = BASE_FDS + start_count * per_socket + FD_RESERVE + 40
    assert BASE_FDS + big_count * per_socket + FD_RESERVE > nofile
    # Refused up front, by the check and by the start alike.
    big = tmp_path / "big.yml"
    big.write_text(many_sockets(big_count))
    for extra in (["--config.check"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "exporter", f"--config.file={big}", *extra,
             f"--web.listen-address=127.0.0.1:{free_port()}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL, preexec_fn=limited(nofile),
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "not enough file descriptors" in proc.stderr
        assert f"RLIMIT_NOFILE is {nofile}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # A running daemon refuses the reload and keeps serving, probes included.
    config = tmp_path / "config.yml"
    config.write_text(many_sockets(start_count))
    web = f"http://127.0.0.1:{free_port()}"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "exporter", f"--config.file={config}",
         f"--web.listen-address={web.removeprefix('http://')}"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, preexec_fn=limited(nofile),
    )  # fmt: skip

    def ready() -> bool:
        assert daemon.poll() is None, "daemon exited"
        try:
            return http_get(web + "/-/ready", timeout=1).startswith("Ready")
        except OSError:
            return False

    try:
        wait_until(ready, timeout=20, what="daemon ready")
        config.write_text(many_sockets(big_count))
        status, body = reload_status(web)
        assert status == 500 and "not enough file descriptors" in body, body
        assert http_get(web + "/-/healthy").startswith("Healthy")
        samples = parse_metrics(http_get(web + "/metrics"))
        assert value(samples, "zmq_exporter_sockets") == start_count
        assert value(samples, "zmq_exporter_config_last_reload_successful") == 0
        # A reload that fits is applied.
        config.write_text(many_sockets(start_count + 5))
        status, body = reload_status(web)
        assert status == 200, body
        samples = parse_metrics(http_get(web + "/metrics"))
        assert value(samples, "zmq_exporter_sockets") == start_count + 5
    finally:
        daemon.terminate()
        assert daemon.wait(10) == 0


def test_sighup_storm_thread_safety_of_pending_commands(
    ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands queued from many threads while the engine dies: every one of them is
    answered (result or EngineStopped), none waits for ever."""
    port = free_port()
    engine = Engine(ctx)
    engine.start()
    settings = settings_of(f"""\
        sockets:
          - {{name: r, type: ROUTER, bind: ["tcp://127.0.0.1:{port}"]}}
        """)
    engine.apply(settings).result(10)
    futures: list[Any] = []
    lock = threading.Lock()

    def send() -> None:
        for _ in range(50):
            future = engine.apply(settings)
            with lock:
                futures.append(future)

    def broken(self: Reader) -> None:
        raise RuntimeError("injected")

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    monkeypatch.setattr(Reader, "_run_commands", broken)
    for thread in threads:
        thread.join(10)
    for future in futures:
        with contextlib.suppress(EngineStopped):
            future.result(5)
    engine.stop()


def test_probes_fail_once_the_engine_thread_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process daemon: the web side stays up, but /-/healthy and /-/ready say 503, so a
    supervisor that only probes (Kubernetes) restarts it too."""
    from exporter.daemon import Daemon as InProcessDaemon

    failures: list[str] = []
    settings = settings_of(f"""\
        sockets:
          - {{name: r, type: ROUTER, bind: ["tcp://127.0.0.1:{free_port()}"]}}
        """)
    daemon = InProcessDaemon(
        settings, f"127.0.0.1:{free_port()}", "/metrics", on_failure=failures.append
    )
    daemon.start()
    url = f"http://127.0.0.1:{daemon.web.port}"

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    try:
        assert status("/-/healthy") == 200 and status("/-/ready") == 200

        def broken(self: Reader) -> None:
            raise RuntimeError("injected loop failure")

        monkeypatch.setattr(Reader, "_run_commands", broken)
        pending = daemon.engine.apply(settings)  # wakes the loop, which fails
        wait_until(lambda: failures, what="on_failure called")
        with pytest.raises(EngineStopped):
            pending.result(1)
        assert status("/-/healthy") == 503
        assert status("/-/ready") == 503
    finally:
        daemon.stop()


def test_fd_budget_arithmetic() -> None:
    from exporter.monitor.fdbudget import MIN_RESERVE, fd_budget_problem

    # A reload that opens nothing is never refused, whatever the limit.
    assert fd_budget_problem(250, 0, 320, limit=256) is None
    # The reserve shrinks to a quarter of a small limit, never below MIN_RESERVE.
    assert fd_budget_problem(100, 92, 320, limit=256) is None  # 100 + 92 + 64
    assert fd_budget_problem(100, 93, 320, limit=256) is not None
    assert fd_budget_problem(10, 54, 320, limit=96) is None  # 10 + 54 + 32
    assert fd_budget_problem(10, 55, 320, limit=96) is not None
    assert MIN_RESERVE == 32
    # A large limit keeps the whole reserve.
    assert fd_budget_problem(100, 1580, 320, limit=2000) is None
    problem = fd_budget_problem(100, 1581, 320, limit=2000)
    assert problem is not None and "RLIMIT_NOFILE is 2000" in problem
