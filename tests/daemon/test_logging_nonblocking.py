"""Logging never blocks the engine (exporter/logs.py): a real daemon whose stderr is a pipe
nobody reads (a stuck log driver, a stopped `| less`) keeps counting every event, drops
log lines (counted in `zmq_exporter_log_messages_dropped_total`) once its log queue is
full, writes again once the pipe is drained, and still exits on SIGTERM within a bound.

Before the fix (a synchronous StreamHandler, at 97f71d5): with two sockets clashing on a
port (1 ms retries, debug level) and stderr a one-page pipe nobody read, the daemon counted
0 of 1,082 connections a churn completed in 10 s (all 1,082 once the pipe was drained: the
engine thread had sat in write()), and with eight it was still running 10 s after SIGTERM."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exporter.logs import FLUSH_TIMEOUT, QUEUE_SIZE

from helpers import ROOT, http_get, parse_metrics, value
from testkit import LoadGen, free_port, wait_until

DROPPED = "zmq_exporter_log_messages_dropped_total"
# Sockets that all bind one port, retried every millisecond: each failed attempt is a debug
# log line (and a BIND_FAILED event), thousands of lines a second.
CLASHING = 8


class StuckStderr:
    """The daemon's stdout and stderr: a pipe of one page (the smallest the kernel allows)
    that nobody reads until `drain()`; then a thread reads it into `text` until EOF."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, os.sysconf("SC_PAGE_SIZE"))
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def drain(self) -> None:
        self._thread.start()

    def _drain(self) -> None:
        for _ in range(10_000_000):  # bounded; ends at EOF, when the daemon exits
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk)

    @property
    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def close(self) -> None:
        if self._thread.ident is not None:
            self._thread.join(10)
        os.close(self.read_fd)


def start_daemon(
    tmp_path: Path, config: str, out: StuckStderr, web: int
) -> subprocess.Popen[bytes]:
    path = tmp_path / "config.yml"
    path.write_text(config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", f"--config.file={path}",
         f"--web.listen-address=127.0.0.1:{web}", "--log.level=debug"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out.write_fd, stderr=out.write_fd,
    )  # fmt: skip
    os.close(out.write_fd)
    return proc


def churn_config(target: int) -> str:
    clash = free_port()
    lines = [
        "global: {bind_retry_interval: 1ms, bind_retry_max_interval: 1ms}",
        "connections: {metrics: false}",
        "sockets:",
        f'  - {{name: target, type: ROUTER, bind: ["tcp://127.0.0.1:{target}"]}}',
    ] + [
        f'  - {{name: clash{i}, type: ROUTER, bind: ["tcp://127.0.0.1:{clash}"]}}'
        for i in range(CLASHING)
    ]
    return "\n".join(lines) + "\n"


def metric(web: int, name: str, **labels: str) -> float:
    found = value(
        parse_metrics(http_get(f"http://127.0.0.1:{web}/metrics", timeout=5)), name, **labels
    )
    assert found is not None, name
    return found


def web_up(web: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"daemon exited with {proc.returncode}"
    try:
        http_get(f"http://127.0.0.1:{web}/-/ready", timeout=2)
        return True
    except OSError:
        return False


@pytest.mark.slow  # events and a churn while stderr stays blocked: ~18 s
def test_stuck_stderr_keeps_counting_events_and_counts_dropped_lines(tmp_path: Path) -> None:
    target, web = free_port(), free_port()
    out = StuckStderr()
    proc = start_daemon(tmp_path, churn_config(target), out, web)
    try:
        wait_until(lambda: web_up(web, proc), timeout=30, what="daemon ready")
        # The queue fills while nobody reads stderr: lines are dropped and counted, the
        # engine goes on retrying (each attempt one debug line).
        wait_until(lambda: metric(web, DROPPED) > 0, timeout=60, what="log lines dropped")
        failures = metric(web, "zmq_exporter_attach_failures_total")
        assert failures > QUEUE_SIZE, failures
        # A churn on the target ROUTER while stderr stays blocked: every connection the
        # load generator completed is counted, exactly.
        # Every connect must complete (a connect given up after a SYN retransmission may
        # still be accepted by the daemon: neither side's tally would be exact); on a
        # loaded machine one may take a retransmission (1 s, then 3 s), as in test_storm.
        gen = LoadGen(target, count=2000, deadline=20, connect_timeout=10.0)
        tally = gen.tally()
        assert tally.completed == 2000 and tally.failed == 0, tally
        seen: list[tuple[float, float]] = []

        def counted() -> bool:
            seen.append(
                (
                    metric(web, "zmq_accepted_total", socket="target"),
                    metric(web, "zmq_disconnected_total", socket="target"),
                )
            )
            return seen[-1] == (tally.completed, tally.completed)

        try:
            wait_until(counted, timeout=15)
        except AssertionError:
            raise AssertionError(
                f"{tally} with stderr blocked; (accepted, disconnected) counted: "
                f"first {seen[0]}, last {seen[-1]}"
            ) from None
        dropped = metric(web, DROPPED)
        assert metric(web, "zmq_exporter_attach_failures_total") > failures  # still retrying
        assert out.text == ""  # nothing read yet: stderr really was blocked all along
        print(
            f"stderr blocked: {tally.completed} connections completed ({tally.failed} failed), "
            f"{tally.completed} counted; {dropped:.0f} log lines dropped"
        )

        # Drained: logging resumes; a line logged now (a reload) is written, and the lines
        # are whole (a dropped line is dropped whole, never cut).
        out.drain()
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: 'msg="config reloaded"' in out.text, timeout=20, what="reload logged")
        assert metric(web, DROPPED) >= dropped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    lines = out.text.splitlines()
    assert 'msg="shutting down"' in out.text  # written on exit
    bad = [line for line in lines if not line.startswith("ts=")]
    assert not bad, bad[:5]


def test_sigterm_writes_every_queued_line(tmp_path: Path) -> None:
    """Lines queued while stderr is blocked (fewer than the queue holds: none dropped) are
    all written on SIGTERM once the pipe drains, and the daemon became ready meanwhile."""
    sockets = 100
    lines = ["sockets:"] + [
        f"  - {{name: s{i}, type: DEALER, bind: [tcp://127.0.0.1:*, 'ipc://{tmp_path}/{i}']}}"
        for i in range(sockets)
    ]
    web = free_port()
    out = StuckStderr()
    proc = start_daemon(tmp_path, "\n".join(lines) + "\n", out, web)
    try:
        # Ready with stderr blocked: before the fix the engine sat in write() here.
        wait_until(lambda: web_up(web, proc), timeout=30, what="daemon ready, stderr blocked")
        assert metric(web, "zmq_exporter_sockets") == sockets
        assert metric(web, DROPPED) == 0
        proc.send_signal(signal.SIGTERM)
        out.drain()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    text = out.text
    assert text.count('msg="bind succeeded"') == 2 * sockets, text[-2000:]
    for msg in ("sockets started", "zmq-exporter started", "shutting down"):
        assert text.count(f'msg="{msg}"') == 1, msg
    assert text.index("zmq-exporter started") < text.index("shutting down")


def test_sigterm_with_stderr_blocked_for_good_exits_within_a_bound(tmp_path: Path) -> None:
    """Nobody ever reads stderr: SIGTERM still ends the process (exit 0) within the usual
    shutdown plus FLUSH_TIMEOUT; before the fix it hung in write() for ever."""
    target, web = free_port(), free_port()
    out = StuckStderr()
    proc = start_daemon(tmp_path, churn_config(target), out, web)
    try:
        wait_until(lambda: web_up(web, proc), timeout=30, what="daemon ready")
        wait_until(lambda: metric(web, DROPPED) > 0, timeout=60, what="queue full")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    print(f"SIGTERM with stderr blocked: exit {code} after {elapsed:.2f}s")
    assert code == 0
    assert elapsed < 2.0 + FLUSH_TIMEOUT + 1.0, elapsed
