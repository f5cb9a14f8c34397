"""A real third-party gevent application, unmodified, under `zmq-exporter-instrument`:
locust (installed by the test extra). Its master and workers talk over zmq.green; its rpc
library creates, binds and connects the sockets in its constructors (`locust.rpc.zmqrpc.
Server`/`Client`), after `gevent.monkey.patch_all()`; `--processes N` forks the workers
from the master. Everything reports through the relay to a real sidecar daemon, checked
against the kernel (/proc/PID/net/tcp) and against locust's own view of its workers (its
web API)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import Daemon, established_in, free_port, total, value, wait_until

# locust is never imported here: importing it runs gevent's monkey.patch_all() in the
# pytest process, which turned every later test's threads into greenlets (a test_library
# storm then hung with the hub blocked in zmq_poll). The applications run in their own
# processes; the test extra installs them, so a missing one is a failure, not a skip.
for _app in ("locust", "jupyter_client", "ipykernel"):
    assert importlib.util.find_spec(_app) is not None, f"{_app} is not installed (test extra)"

LOCUSTFILE = """\
from locust import User, constant, task


class Idle(User):
    wait_time = constant(1)

    @task
    def nothing(self):
        pass
"""

WORKERS = 3


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return sorted(out)


def _owned_established(pid: int, remote_port: int) -> int:
    """ESTABLISHED TCP connections to `remote_port` whose socket process `pid` holds (its
    fds' inodes matched against /proc/PID/net/tcp): what `ss -tnp` shows for that pid."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
            count += fields[9] in inodes
    return count


def _api(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/requests", timeout=5) as resp:
        data: dict[str, object] = json.loads(resp.read())
        return data


def _worker_count(port: int) -> int:
    try:
        count = _api(port).get("worker_count", 0)
    except OSError:
        return -1
    return int(count) if isinstance(count, int) else -1


def _config(relay: str) -> str:
    return f'relay:\n  listen: ["{relay}"]\n  expire: 3s\n'


def test_locust_master_and_workers_under_the_launcher(tmp_path: Path) -> None:
    relay = f"ipc://{tmp_path}/relay.sock"
    (tmp_path / "locustfile.py").write_text(LOCUSTFILE)
    locust = Path(sys.executable).parent / "locust"
    master_port, web_port = free_port(), free_port()
    host = os.uname().nodename
    daemon = Daemon(_config(relay)).start()
    app = subprocess.Popen(
        [
            sys.executable, "-m", "exporter.instrument.launcher", "--relay", relay,
            str(locust), "-f", "locustfile.py", "--processes", str(WORKERS),
            "--web-host", "127.0.0.1", "--web-port", str(web_port),
            "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
            "--master-port", str(master_port), "--loglevel", "WARNING",
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "locust.log").open("wb"),
        start_new_session=True,
    )  # fmt: skip
    try:
        # locust's own view: all workers connected (its master's web API).
        wait_until(lambda: _worker_count(web_port) == WORKERS, timeout=60, what="locust's workers")
        master = app.pid  # the launcher exec'd locust in place
        workers = _children(master)
        assert len(workers) == WORKERS
        router = {
            "process": f"{host}/{master}",
            "socket": f"ROUTER@tcp://127.0.0.1:{master_port}",
            "endpoint": f"tcp://127.0.0.1:{master_port}",
        }

        def at_sidecar() -> bool:
            s = daemon.scrape()
            ok = value(s, "zmq_connections", **router) == WORKERS
            for pid in workers:
                ok = ok and total(s, "zmq_connections", process=f"{host}/{pid}") == 1
            return ok

        wait_until(at_sidecar, timeout=30, what="master and workers at the sidecar")
        # Per-process series, each equal to the kernel and to locust's own count.
        assert established_in(master, local_port=master_port) == WORKERS
        for pid in workers:
            assert _owned_established(pid, master_port) == 1
        s = daemon.scrape()
        assert value(s, "zmq_listening", **router) == 1
        assert value(s, "zmq_accepted_total", **router) == WORKERS
        assert value(s, "zmq_exporter_relay_processes") == WORKERS + 1

        # A worker SIGKILLed: the master's gauge follows the kernel; the worker's series
        # expire (relay.expire 3s) at the sidecar.
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", **router) == WORKERS - 1,
            timeout=15,
            what="the master's gauge after a worker's death",
        )
        assert established_in(master, local_port=master_port) == WORKERS - 1
        wait_until(
            lambda: (
                total(daemon.scrape(), "zmq_connections", process=f"{host}/{victim}") == 0
                and value(daemon.scrape(), "zmq_exporter_relay_processes") == WORKERS
            ),
            timeout=20,
            what="the dead worker's series expired",
        )

        # The sidecar SIGKILLed and restarted: the same totals, exactly.
        before = value(daemon.scrape(), "zmq_accepted_total", **router)
        assert daemon.proc is not None
        daemon.proc.kill()
        daemon.proc.wait(10)
        started = time.monotonic()
        daemon = Daemon(_config(relay), port=daemon.port).start()

        def restored() -> bool:
            s = daemon.scrape()
            return (
                value(s, "zmq_accepted_total", **router) == before
                and value(s, "zmq_connections", **router) == WORKERS - 1
            )

        wait_until(restored, timeout=30, what="exact totals after the sidecar's restart")
        assert before == WORKERS
        print(f"sidecar restart: totals exact after {time.monotonic() - started:.2f} s")
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)  # the session this test started
            app.wait(10)
        daemon.stop()


JUPYTER_APP = """\
import json, sys
from jupyter_client.manager import start_new_kernel

km, kc = start_new_kernel(kernel_name="python3")
reply = kc.execute_interactive("import os; print(os.getpid())", timeout=60)
info = km.get_connection_info()
print(json.dumps({"shell": info["shell_port"], "iopub": info["iopub_port"],
                  "kernel": km.provisioner.pid, "status": reply["content"]["status"]}),
      flush=True)
sys.stdin.readline()
kc.stop_channels()
km.shutdown_kernel(now=True)
"""


def test_jupyter_client_and_kernel_under_the_launcher(tmp_path: Path) -> None:
    """jupyter_client (the application's library: its KernelManager and client create and
    connect the sockets) starts an ipykernel, a spawned child that inherits the launcher's
    environment and binds its ROUTERs and XPUB inside ipykernel's own constructors (with
    bytes endpoints, and zmq.asyncio contexts). Both processes at the sidecar, each
    socket's gauge equal to the kernel's rows."""
    relay = f"ipc://{tmp_path}/relay.sock"
    script = tmp_path / "app.py"
    script.write_text(JUPYTER_APP)
    host = os.uname().nodename
    with Daemon(_config(relay).replace("3s", "5m")) as daemon:
        app = subprocess.Popen(
            [sys.executable, "-m", "exporter.instrument.launcher", "--relay", relay,
             sys.executable, str(script)],
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / "app.log").open("wb"),
            text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert app.stdout is not None and app.stdin is not None
            # The kernel's output (its pid, printed by execute_interactive) comes first.
            line = "x"
            for _ in range(10):
                line = app.stdout.readline()
                if not line or line.startswith("{"):
                    break
            assert line.startswith("{"), (tmp_path / "app.log").read_text()
            info = json.loads(line)
            assert info["status"] == "ok"  # the application's own view: the kernel works
            kernel, shell, iopub = info["kernel"], info["shell"], info["iopub"]
            router = {
                "process": f"{host}/{kernel}",
                "socket": f"ROUTER@tcp://127.0.0.1:{shell}",
                "endpoint": f"tcp://127.0.0.1:{shell}",
            }
            xpub = {"process": f"{host}/{kernel}", "socket": f"XPUB@tcp://127.0.0.1:{iopub}"}
            client = {"process": f"{host}/{app.pid}", "endpoint": f"tcp://127.0.0.1:{shell}"}

            def reported() -> bool:
                s = daemon.scrape()
                return (
                    value(s, "zmq_connections", **router)
                    == established_in(kernel, local_port=shell)
                    and value(s, "zmq_connections", **xpub)
                    == established_in(kernel, local_port=iopub)
                    and total(s, "zmq_connections", **client) == _owned_established(app.pid, shell)
                    and total(s, "zmq_connections", **client) >= 1
                )

            wait_until(reported, timeout=30, what="client and kernel at the sidecar == kernel")
            s = daemon.scrape()
            assert (value(s, "zmq_listening", **router), value(s, "zmq_listening", **xpub)) == (
                1,
                1,
            )
            # No endpoint label is a bytes repr (ipykernel binds/connects with bytes).
            assert not any("b'" in dict(lbl).get("socket", "") for (_, lbl) in s)
            app.stdin.write("\n")
            app.stdin.flush()
            assert app.wait(30) == 0
        finally:
            if app.poll() is None:
                os.killpg(app.pid, signal.SIGKILL)  # the session this test started
                app.wait(10)
