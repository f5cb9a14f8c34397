"""Test helpers: a real daemon process, the CLI, real HTTP scrapes parsed with
prometheus_client's own parser, the kernel's view of connections, process resources and
network namespaces. Ports and waiting with a deadline come from testkit.py (shared with
bench/)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from testkit import ROOT, free_port, wait_until

if TYPE_CHECKING:
    from exporter.web.app import WebApp

# free_port and wait_until are testkit's (shared with bench/); re-exported here for the
# modules that still import them from helpers (test_otlp*.py, test_reload_under_fire.py,
# test_faults_netns.py).
__all__ = ["ROOT", "free_port", "wait_until"]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample `name` whose labels include `labels`; None if there is none."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    if len(found) > 1:
        raise AssertionError(f"{name}{labels} matches {len(found)} series")
    return found[0] if found else None


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`zmq-exporter ARGS` to completion, as a user runs it (no stdin)."""
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def start_script(
    script: Path, text: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Writes `text` to `script` and starts it with this interpreter, the repository on
    its path, `args` and `env` added: stdin and stdout are pipes (text) for the test to
    drive it line by line."""
    script.write_text(text)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def check_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`zmq-exporter --config.check ARGS` through `exporter.cli.main` in this process, as
    `run_cli` would run it (exit code, stdout, stderr) without an interpreter per case: for
    the many config files whose one line `run_cli` checks once per error class. The root
    logger's handlers (set by the CLI) are restored afterwards."""
    assert "--config.check" in args, "in process only for a check: a start would serve"
    from exporter import cli

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(
        ["zmq-exporter", *args], code, out.getvalue(), err.getvalue()
    )


def bare_web_app(**overrides: Any) -> WebApp:
    """A WebApp with nothing behind it, for tests of the web server itself (TLS, basic auth,
    web config files): no sockets (an engine snapshot that is empty and ready), an empty
    registry, /metrics, always ready, an empty landing page, a reload that succeeds;
    `overrides`: other WebApp arguments (e.g. `is_healthy`)."""
    # Imported here, as check_in_process imports the CLI: most modules that import helpers
    # run a daemon process and need none of the web stack in the test process.
    from prometheus_client.registry import CollectorRegistry

    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.monitor.sockets import build_labels
    from exporter.render.prometheus import StateCollector
    from exporter.web.app import WebApp

    no_sockets = StateCollector(lambda: EngineSnapshot((), ReaderStats(), True), build_labels())
    return WebApp(
        registry=CollectorRegistry(auto_describe=False),
        telemetry_path="/metrics",
        is_ready=lambda: True,
        landing_page=lambda: "",
        reload=lambda: (True, ""),
        state=no_sockets,
        **overrides,
    )


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(response.read().decode())


@dataclass
class Daemon:
    """A real `zmq-exporter` process on a config written to a temp file."""

    config_text: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    config_path: Path | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> Daemon:
        tmp = Path(tempfile.mkdtemp(prefix="zmq-exporter-test-"))
        self.config_path = tmp / "config.yml"
        self.config_path.write_text(self.config_text)
        self.log_path = tmp / "daemon.log"
        cmd = [
            sys.executable,
            "-m",
            "exporter",
            f"--config.file={self.config_path}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            *self.args,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
            )
        if wait_ready:
            wait_until(self._ready, timeout=15, what=f"daemon ready at {self.url}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.logs()}")
        try:
            http_get(self.url + "/-/ready", timeout=1)
            return True
        except OSError:
            return False

    def scrape(self, headers: dict[str, str] | None = None) -> Samples:
        return parse_metrics(http_get(self.url + "/metrics", headers))

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- process resources and fault injection (reliability suite) ---------------------------


def open_fds(pid: int) -> int:
    """Open file descriptors of process `pid`, as the kernel lists them."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """Threads (tasks) of process `pid`, as the kernel lists them."""
    return len(os.listdir(f"/proc/{pid}/task"))


def http_post(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """POST with an empty body; (status, body) for every complete response, errors too."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename, as a config management tool (or a Kubernetes
    ConfigMap's symlink swap) does: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def missing_tool(what: str) -> None:
    """A tool the test needs is missing: fail under CI=true (tests/run installs it), skip
    elsewhere."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing; CI must have it", pytrace=False)
    pytest.skip(f"{what} is missing")


def established_in(pid: int, local_port: int | None = None, remote_port: int | None = None) -> int:
    """ESTABLISHED TCP connections in the network namespace of process `pid` (its
    /proc/PID/net/tcp{,6}: the same table `ip netns exec NS cat /proc/net/tcp` shows),
    with the given local and/or remote port: the kernel's count in that namespace."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "01":
                continue
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port is not None and local != local_port:
                continue
            if remote_port is not None and remote != remote_port:
                continue
            count += 1
    return count


_CLONE_NEWNET = 0x40000000


def _enter_netns(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def netns_executor(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """One worker thread that lives in network namespace `name` (setns applies to the
    calling thread only, so the rest of the test stays where it is): sockets it opens,
    e.g. HTTP scrapes of a daemon listening on the namespace's loopback, are in `name`."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=1, initializer=_enter_netns, initargs=(name,)
    )
