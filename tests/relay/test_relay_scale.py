"""Issue 16: 50 real sender processes x 20 relayed sockets each into one daemon; per
(process, socket) and in total, the relayed counters equal each sender's own tally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import ROOT, Daemon, Samples, total, value, wait_until

# Slow (50 sender processes: ~17 s, loaded 2 cores): `tests/run --quick` leaves it out.
pytestmark = pytest.mark.slow

PROCESSES = 50
SOCKETS = 20


def _config(endpoint: str) -> str:
    return textwrap.dedent(
        f"""\
        relay:
          listen: ["{endpoint}"]
          expire: 5m
          ipc_mode: "0600"
        """
    )


def test_fifty_sender_processes_twenty_sockets_each_exact(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/relay.sock"
    script = str(ROOT / "tests" / "relay_scale_sender.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[str]] = []
    with Daemon(_config(endpoint)) as daemon:
        try:
            # All started at once: on 2 cores the interpreter startups overlap.
            for p in range(PROCESSES):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, script, endpoint, f"proc-{p}", str(p)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=ROOT,
                        env=env,
                    )
                )
            truth: dict[str, dict[str, int]] = {}
            deadline = time.monotonic() + 60
            for p, proc in enumerate(procs):
                assert proc.stdout is not None
                # readline blocks; the sender bounds its own wait (30 s) before printing.
                line = proc.stdout.readline()
                assert line, f"sender {p} exited ({proc.poll()}) before its tally"
                assert time.monotonic() < deadline, "senders too slow to report"
                truth[f"proc-{p}"] = json.loads(line)
            assert all(len(t) == SOCKETS for t in truth.values())
            grand = sum(sum(t.values()) for t in truth.values())

            last: list[Samples] = []

            def converged() -> bool:
                s = daemon.scrape()
                last[:] = [s]
                return (
                    value(s, "zmq_exporter_relay_processes") == PROCESSES
                    and total(s, "zmq_accepted_total") == grand
                )

            wait_until(converged, timeout=30, interval=0.3, what=f"{grand} accepted in total")
            s = last[0]
            for proc_id, tally in truth.items():
                for sock, n in tally.items():
                    got = total(s, "zmq_accepted_total", process=proc_id, socket=sock)
                    assert got == n, (proc_id, sock, got, n)
            assert value(s, "zmq_exporter_relay_processes") == PROCESSES
            assert value(s, "zmq_exporter_relay_sockets") == PROCESSES * SOCKETS
            assert total(s, "zmq_accepted_total") == grand
        finally:
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
            for proc in procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
