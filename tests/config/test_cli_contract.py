"""Command-line and log contract fixed by issue 12, on real daemon processes: `--log.level`
takes `warn` and `warning` and lines say `warn`; logfmt values are plain text, not Python
reprs; errors before the start honour `--log.format=json`; an out-of-range port says so; the
`listening` line names the address; a config that watches nothing is an error."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import Daemon, check_in_process, http_post, run_cli, write_atomic
from testkit import free_port, wait_until


def held_port() -> tuple[socket.socket, int]:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


@pytest.mark.parametrize("level", ["warn", "warning"])
def test_log_level_warn_and_warning_print_warn(level: str) -> None:
    holder, busy = held_port()
    config = f"sockets:\n  - {{name: busy, type: ROUTER, bind: ['tcp://127.0.0.1:{busy}']}}\n"
    try:
        with Daemon(config, args=[f"--log.level={level}"]) as daemon:
            # A bind that fails at run time logs one warning.
            wait_until(lambda: "level=warn " in daemon.logs(), what="the warning")
            logs = daemon.logs()
    finally:
        holder.close()
    lines = logs.splitlines()
    assert lines and all(line.startswith("ts=") for line in lines), logs
    assert "level=warning" not in logs
    assert "level=info" not in logs  # the level filters as well as it prints
    assert any("endpoint=tcp://127.0.0.1:" in line for line in lines), logs


def test_logfmt_values_are_plain_and_listening_names_the_address(tmp_path: Path) -> None:
    port = free_port()
    first = f"sockets:\n  - {{name: a, type: PUB, bind: ['tcp://127.0.0.1:{port}']}}\n"
    with Daemon(first) as daemon:
        wait_until(lambda: "msg=listening" in daemon.logs(), what="the listening line")
        (listening,) = [x for x in daemon.logs().splitlines() if "msg=listening" in x]
        assert f" address=127.0.0.1:{daemon.port} " in listening, listening
        assert daemon.config_path is not None
        second = first + "  - {name: b, type: SUB, connect: ['tcp://127.0.0.1:1']}\n"
        second += "  - {name: c, type: SUB, connect: ['tcp://127.0.0.1:2']}\n"
        write_atomic(daemon.config_path, second)
        assert http_post(daemon.url + "/-/reload")[0] == 200
        wait_until(lambda: "config reloaded" in daemon.logs(), what="the reload line")
        (line,) = [x for x in daemon.logs().splitlines() if "config reloaded" in x]
    # Lists as comma-separated items, an empty one as "": no ['b', 'c'] or [].
    assert " added=b,c " in line, line
    assert ' removed="" ' in line and line.endswith(' recreated=""'), line
    assert "[" not in line and "'" not in line, line


def test_json_format_for_errors_before_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("sockets:\n  - name: a\n    type: ROUTR\n    bind: [tcp://127.0.0.1:1]\n")
    for args in (["--config.check"], []):
        proc = run_cli(f"--config.file={bad}", "--log.format=json", *args)
        assert proc.returncode == 1, proc.stderr
        (line,) = proc.stderr.splitlines()
        record = json.loads(line)
        assert (record["level"], record["logger"], record["msg"]) == (
            "error",
            "zmq_exporter",
            "cannot start",
        )
        assert record["err"].startswith(f"{bad}:3: sockets[0].type: unknown socket type")
    # logfmt (the default) keeps the one plain line.
    proc = run_cli(f"--config.file={bad}", "--config.check")
    assert proc.stderr.startswith(f"zmq-exporter: {bad}:3: sockets[0].type:"), proc.stderr


def test_port_out_of_range_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("sockets:\n  - {name: a, type: PUB, bind: ['tcp://127.0.0.1:*']}\n")
    proc = run_cli(f"--config.file={config}", "--web.listen-address=127.0.0.1:99999")
    assert proc.returncode == 1
    assert "port 99999 is out of range (0 to 65535)" in proc.stderr, proc.stderr
    assert "expected host:port" not in proc.stderr
    proc = run_cli(f"--config.file={config}", "--web.listen-address=127.0.0.1:http")
    assert proc.returncode == 1 and "expected host:port" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", ""),
        ("# nothing here\n", ""),
        ("global: {labels: {a: b}}\nsockets: []\n", ":2: sockets"),
    ],
)
def test_a_config_that_watches_nothing_is_an_error(tmp_path: Path, text: str, where: str) -> None:
    # A real process for the empty file; cli.main in this process for the others.
    cli = run_cli if text == "" else check_in_process
    config = tmp_path / "empty.yml"
    config.write_text(text)
    proc = cli("--config.check", f"--config.file={config}")
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr == (
        f"zmq-exporter: {config}{where}: the config watches nothing: no socket configured (add "
        "one under `sockets:`, or a `modules:` section for a probe-only exporter)\n"
    )
    # A probe-only config (issue 17) has something to do.
    config.write_text(text + "modules: {}\n")
    assert cli("--config.check", f"--config.file={config}").returncode == 0


def test_config_example_documents_the_heartbeat_defaults() -> None:
    from exporter.config.load import CONNECT_DEFAULTS

    example = (Path(__file__).resolve().parent.parent.parent / "config" / "example.yml").read_text()
    assert "heartbeat_ivl 5s, heartbeat_timeout 15s and handshake_ivl" in example
    assert CONNECT_DEFAULTS.model_dump(exclude_none=True) == {
        "heartbeat_ivl": 5.0,
        "heartbeat_timeout": 15.0,
        "handshake_ivl": 10.0,
    }
