"""Config fuzzing (issue 11): mutations of valid configs, token soups and binary through the
real loader. Zero tracebacks; every rejection is exactly one line, `file:line: key: message`
or `file: message`; every accepted config starts (its options are set on real sockets, and
a sample runs as real daemons until /-/ready answers 200).

The loader runs in a child process with its address space capped and each example under a
deadline, so a bomb that gets through fails the test instead of taking down the run. The
seed is fixed (derandomize) so CI is not flaky.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config.yamlnodes import load_with_lines

from helpers import ROOT, Daemon
from testkit import free_port

# Slow (fuzzing: ~18 s, loaded 2 cores): `tests/run --quick` leaves it out.
pytestmark = pytest.mark.slow

MEMORY_LIMIT = 1024**3  # per worker: a billion laughs that got through would hit this
EXAMPLE_TIMEOUT = 10.0  # seconds per example in the worker
DAEMON_SAMPLE = 15
SEEDS = [
    p.read_text()
    for p in [
        *sorted((ROOT / "tests" / "testdata" / "configs" / "good").glob("*.yml")),
        ROOT / "config" / "zmq-exporter.yml",
        ROOT / "config" / "example.yml",
    ]
]
TOKENS = [
    "!!int", "!!int ", "!!float x", "!!timestamp 2026-99-99", "!!binary a", "!!str", "!!map",
    "&a", "*a", "&b [1, 2]", "*b", "<<: *a", "<<:", "{", "}", "[", "]", "- ", ": ", ", ", "\n",
    "  ", "    ", "'", '"', "\t", "#", "---", "...", "%YAML 1.1\n", "? ", "|", ">",
    "2147483648", "2147483647", "4294967296", "-1", "0", "1", "1e400", "0x1F", "0o17", "1_000",
    "2h", "6553.6s", "6553.599s", "596h31m23.648s", "1ms", "0s", "\u0661s", "1.5s", "9" * 400,
    "tcp://256.0.0.1:1", "tcp://a..b:1", "tcp://127.0.0.1:\u0662\u0665", "tcp://[::1]:1",
    "tcp://[zz]:1", "tcp://*:*", "tcp://h:0", "ipc://", "ipc:///tmp/x", "inproc://x", "udp://h:1",
    '"\\ud800"', '"\\0"', '"\\x01"', "~", "null", "true", "yes", "no", "é", "\u2028",
    "ROUTER", "SUB", "DEALER", "STREAM", "sockets:", "options:", "global:", "limits:", "otlp:",
    "name:", "type:", "bind:", "connect:", "labels:", "events:", "subscribe:", "routing_id:",
    "heartbeat_ttl:", "heartbeat_ivl:", "sndhwm:", "rcvhwm:", "backlog:", "linger:",
    "reconnect_ivl:", "reconnect_ivl_max:", "tcp_keepalive_cnt:", "tcp_keepalive_idle:",
    "ipv6:", "curve_server:", "curve_secretkey_file:", "max_sockets:", "max_series:", "headers:",
    "bind_retry_interval:", "all", "connected", "x" * 300, "r" * 256,
]  # fmt: skip
_VALUE = re.compile(r"(?<=: )[^\s{}\[\],#][^\n{}\[\],#]*|(?<=- )[^\s{}\[\],#]+")

# --- the worker: load one file, report ok / error / crash as one JSON line --------------


def _worker() -> None:  # pragma: no cover - runs in the child
    import resource
    import traceback

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import zmq

    from exporter.config import ConfigError, load_config
    from exporter.monitor.sockets import close_socket, open_socket

    ctx = zmq.Context()
    for line in sys.stdin:
        path = json.loads(line)["path"]
        try:
            loaded = load_config(path)
            # "Starts": libzmq takes every option of every socket (no bind/connect here).
            for spec in loaded.sockets:
                close_socket(open_socket(ctx, spec))
            reply: dict[str, Any] = {"ok": len(loaded.sockets)}
        except ConfigError as err:
            reply = {"error": str(err)}
        except BaseException:
            reply = {"crash": traceback.format_exc()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    """The child process, restarted after a crash or a timeout."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="zmq-exporter-fuzz-"))
        self.count = 0

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=ROOT,
                # the worker imports helpers (tests/) wherever this file lives under tests/
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
            )
        return self.proc

    def load(self, data: bytes) -> tuple[Path, dict[str, Any]]:
        self.count += 1
        path = self.dir / f"fuzz-{self.count}.yml"
        path.write_bytes(data)
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"path": str(path)}) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], EXAMPLE_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            proc.wait()
            self.proc = None
            return path, {"crash": f"worker died or took over {EXAMPLE_TIMEOUT}s"}
        return path, json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- strategies ---------------------------------------------------------------------------


@st.composite
def text_mutations(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["value", "insert", "delete", "duplicate"]))
        lines = text.splitlines(keepends=True)
        if kind == "value":
            spans = [m.span() for m in _VALUE.finditer(text)]
            if spans:
                start, end = draw(st.sampled_from(spans))
                text = text[:start] + draw(st.sampled_from(TOKENS)) + text[end:]
        elif kind == "insert":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        elif lines:
            index = draw(st.integers(0, len(lines) - 1))
            if kind == "delete":
                del lines[index]
            else:
                lines.insert(index, lines[index])
            text = "".join(lines)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def value_mutations(draw: st.DrawFn) -> bytes:
    """A value at a random place of a valid config replaced, then dumped as YAML: reaches
    the validator more often than text mutations, which mostly break the syntax."""
    data = yaml.safe_load(draw(st.sampled_from(SEEDS)))
    values: list[object] = [
        2**31, 2**31 - 1, 2**63, -1, 0, 1, 0.5, True, None, "", "2h", "6553.6s", "6553.599s",
        "596h31m23.648s", "\u0661s", "tcp://256.0.0.1:1", "tcp://a..b:1", "tcp://[::1]:1",
        "tcp://127.0.0.1:\u0662\u0665", "a\0b", "r" * 256, "\ud800", [], {}, ["x"], {"a": 1},
        128, 32768, "32768s", "1ms", "0s", "ipc:///tmp/\u0000", "inproc://", "SUB",
    ]  # fmt: skip
    for _ in range(draw(st.integers(1, 3))):
        parents: list[tuple[Any, Any]] = []
        stack: list[Any] = [data]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                parents.extend((node, k) for k in node)
                stack.extend(node.values())
            elif isinstance(node, list):
                parents.extend((node, i) for i in range(len(node)))
                stack.extend(node)
        if not parents:
            break
        parent, key = draw(st.sampled_from(parents))
        parent[key] = draw(st.sampled_from(values))
    return yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass")


token_soups = st.lists(st.sampled_from(TOKENS), max_size=60).map(
    lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
)
inputs = st.one_of(text_mutations(), value_mutations(), token_soups, st.binary(max_size=2000))


def check_reply(path: Path, data: bytes, reply: dict[str, Any], accepted: list[bytes]) -> None:
    shown = data[:300]
    assert "crash" not in reply, f"{reply['crash']}\ninput: {shown!r}"
    if "error" in reply:
        message = reply["error"]
        assert "\n" not in message and "\r" not in message, message
        assert re.fullmatch(re.escape(str(path)) + r"(:[1-9][0-9]*)?: \S.*", message), message
        assert "Traceback" not in message
    elif reply["ok"] and len(accepted) < 200:
        accepted.append(data)


# --- the test ------------------------------------------------------------------------------


def rewrite_endpoints(text: str, tmp: Path, index: int) -> str:
    """The accepted config with its endpoints moved to free loopback ports, private ipc
    paths and unique inproc names, so that daemons started from it do not collide."""
    data, _ = load_with_lines(text, "accepted.yml")  # the loader that accepted it
    for n, sock in enumerate(data.get("sockets") or []):
        for role in ("bind", "connect"):
            new = []
            for endpoint in sock.get(role) or []:
                transport = endpoint.split("://", 1)[0]
                if transport == "tcp":
                    new.append(f"tcp://127.0.0.1:{free_port()}")
                elif transport == "ipc":
                    new.append(f"ipc://{tmp}/{index}-{n}-{len(new)}.sock")
                else:
                    new.append(f"inproc://fuzz-{index}-{n}-{role}-{len(new)}")
            if role in sock:
                sock[role] = new
    return yaml.safe_dump(data, allow_unicode=True)


def start_and_check(text: str) -> None:
    daemon = Daemon(text)
    try:
        daemon.start()  # waits for /-/ready 200 (15 s), failing with the daemon's log
    finally:
        daemon.stop()


def test_config_fuzz(tmp_path: Path) -> None:
    started = time.monotonic()
    worker = Worker()
    accepted: list[bytes] = []
    examples = 0

    @settings(
        max_examples=2000,
        deadline=None,  # the worker enforces EXAMPLE_TIMEOUT per example
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def fuzz(data: bytes) -> None:
        nonlocal examples
        examples += 1
        path, reply = worker.load(data)
        check_reply(path, data, reply, accepted)

    try:
        fuzz()
    finally:
        worker.close()
    print(f"fuzz: {examples} examples, {len(accepted)} accepted")
    assert examples >= 1500
    assert len(accepted) >= 15, f"only {len(accepted)} accepted configs: mutations too wild"

    # A deterministic, spread-out sample of the accepted configs starts as real daemons.
    step = max(1, len(accepted) // DAEMON_SAMPLE)
    sample = [
        rewrite_endpoints(data.decode(), tmp_path, i)
        for i, data in enumerate(accepted[::step][:DAEMON_SAMPLE])
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(start_and_check, sample))
    assert time.monotonic() - started < 90


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
