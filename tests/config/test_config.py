"""Config files: every good one loads, every bad one gives its one-line message naming
file, line and key path - in-process and through `zmq-exporter --config.check`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import ConfigError, Settings, load_config, parse_config
from exporter.config.durations import parse_duration
from exporter.core.events import ALL_EVENTS_MASK, Event

from helpers import check_in_process, run_cli

DATA = Path(__file__).parent.parent / "testdata" / "configs"
GOOD = sorted((DATA / "good").glob("*.yml"))
BAD = sorted((DATA / "bad").glob("*.yml"))
ROOT = Path(__file__).resolve().parent.parent.parent


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} lacks an '# expect:' header"
    return f"{path}:{first.removeprefix('# expect: ')}"


def expected_settings(path: Path) -> dict[str, Any]:
    """The `# expect:` block at the top of `path`: YAML in comments, up to the first line
    that is not one. The shipped configs keep theirs in testdata/configs/shipped/."""
    if path.parent != DATA / "good":
        path = DATA / "shipped" / f"{path.name}.expect"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# expect:"), f"{path} lacks an '# expect:' header"
    block = ["expect:"]
    for line in lines[1:]:
        if not line.startswith("#   "):
            break
        block.append(line.removeprefix("#"))
    expect: dict[str, Any] = yaml.safe_load("\n".join(block))["expect"]
    return expect


def resolved(settings: Settings) -> dict[str, Any]:
    """What the daemon gets from a config: each socket with globals merged in (options
    unset everywhere left out), events as names, plus the global and limit settings."""

    def events(mask: int) -> str | list[str]:
        if mask == ALL_EVENTS_MASK:
            return "all"
        return [e.name.lower() for e in Event if mask & e]

    return {
        "global": {
            "bind_retry_interval": settings.global_.bind_retry_interval,
            "bind_retry_max_interval": settings.global_.bind_retry_max_interval,
        },
        "limits": settings.limits.model_dump(),
        "sockets": [
            {
                "name": s.name,
                "type": s.socket_type,
                "bind": list(s.binds),
                "connect": list(s.connects),
                "labels": s.labels,
                "options": s.options.model_dump(exclude_none=True),
                "events": events(s.events_mask),
            }
            for s in settings.sockets
        ],
    }


@pytest.mark.parametrize(
    "path",
    [*GOOD, ROOT / "config" / "zmq-exporter.yml", ROOT / "config" / "example.yml"],
    # relative to the checkout: the same ids wherever it is
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_good_configs_load(path: Path) -> None:
    settings = load_config(str(path))
    assert settings.file == str(path)
    assert resolved(settings) == expected_settings(path)
    assert all(s.curve_secretkey is None for s in settings.sockets)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_config_message(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected(path)), message


def assert_one_line_refusal(proc: subprocess.CompletedProcess[str], path: Path) -> None:
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("zmq-exporter: " + expected(path)), lines[0]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_config_check_exits_nonzero_with_one_line(path: Path) -> None:
    assert_one_line_refusal(check_in_process("--config.check", f"--config.file={path}"), path)


# Through a real process (interpreter, argparse, exit status) once per error class: YAML
# syntax, the loader's duplicate key, the schema, a file the config names. The others go
# through cli.main in this process above, which writes the same line.
CLI_CASES = ["yaml-syntax.yml", "duplicate-key.yml", "unknown-key.yml", "unreadable-key-file.yml"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_config_check_in_a_process(name: str) -> None:
    path = DATA / "bad" / name
    assert_one_line_refusal(run_cli("--config.check", f"--config.file={path}"), path)


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_config_check_exits_zero(path: Path) -> None:
    args = ("--config.check", f"--config.file={path}")
    proc = run_cli(*args) if path.name == "minimal.yml" else check_in_process(*args)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_bad_config_at_start_exits_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "c.yml"
    bad.write_text("sockets:\n  - name: a\n    type: ROUTR\n    bind: [tcp://127.0.0.1:1]\n")
    proc = run_cli(f"--config.file={bad}", "--web.listen-address=127.0.0.1:0")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"zmq-exporter: {bad}:3: sockets[0].type: unknown")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yml: cannot read config: No such file"):
        load_config(str(tmp_path / "nope.yml"))


def test_globals_merge_into_sockets() -> None:
    settings = load_config(str(DATA / "good" / "everything.yml"))
    front, feed = settings.sockets
    assert front.socket_type == "ROUTER"
    assert front.labels == {"env": "test", "team": "payments"}
    assert front.options.reconnect_ivl == pytest.approx(0.1)  # from global
    assert front.options.heartbeat_ivl == pytest.approx(1.0)  # its own
    assert front.events_mask == ALL_EVENTS_MASK
    assert feed.events_mask == (
        Event.CONNECTED
        | Event.DISCONNECTED
        | Event.CONNECT_RETRIED
        | Event.HANDSHAKE_FAILED_PROTOCOL
        | Event.MONITOR_STOPPED
    )
    assert settings.global_.bind_retry_max_interval == pytest.approx(90)


def test_socket_options_override_global_ones() -> None:
    settings = parse_config(
        "global: {options: {linger: 1s, reconnect_ivl: 1s}}\n"
        "sockets:\n- {name: a, type: DEALER, connect: ['tcp://h:1'], options: {linger: 2s}}\n",
        "inline.yml",
    )
    assert settings.sockets[0].options.linger == pytest.approx(2)
    assert settings.sockets[0].options.reconnect_ivl == pytest.approx(1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1), ("2m", 120), ("1h", 3600), ("1m30s", 90), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "1 s", "s", "1x", "1s2", "-1s", True, 5, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def make_keys(tmp_path: Path) -> tuple[Path, str, Path, str]:
    import zmq.auth

    server_public, server_secret = zmq.auth.create_certificates(str(tmp_path), "server")
    client_public, _ = zmq.auth.create_certificates(str(tmp_path), "client")
    del server_public, client_public
    server_pub, _ = zmq.auth.load_certificate(str(tmp_path / "server.key_secret"))
    return (
        tmp_path / "server.key_secret",
        server_pub.decode(),
        tmp_path / "client.key_secret",
        server_secret,
    )


def test_curve_key_files_zpl_and_raw(tmp_path: Path) -> None:
    import zmq

    server_secret_file, server_public, client_secret_file, _ = make_keys(tmp_path)
    raw = tmp_path / "raw.key"
    _, raw_secret = zmq.curve_keypair()
    raw.write_text(raw_secret.decode() + "\n")
    settings = parse_config(
        f"""
sockets:
  - name: server
    type: ROUTER
    bind: [tcp://127.0.0.1:1]
    options: {{curve_server: true, curve_secretkey_file: "{server_secret_file}"}}
  - name: client
    type: DEALER
    connect: [tcp://127.0.0.1:1]
    options: {{curve_serverkey: "{server_public}", curve_secretkey_file: "{raw}"}}
""",
        "curve.yml",
    )
    server, client = settings.sockets
    assert server.curve_secretkey is not None and len(server.curve_secretkey) == 40
    assert client.curve_secretkey == raw_secret
    # The secret never shows in a repr (and so never in a log line).
    assert raw_secret.decode() not in repr(settings)
    del client_secret_file


def test_curve_key_file_with_garbage_is_reported_without_echo(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not-a-key-but-a-secret-looking-string-ok?")
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"sockets:\n- name: s\n  type: ROUTER\n  bind: [tcp://127.0.0.1:1]\n"
            f"  options:\n    curve_server: true\n    curve_secretkey_file: {bad}\n",
            "c.yml",
        )
    assert str(info.value).startswith("c.yml:7: sockets[0].options.curve_secretkey_file: key file")
    assert "secret-looking" not in str(info.value)


def test_curve_client_without_serverkey(tmp_path: Path) -> None:
    server_secret_file, _, _, _ = make_keys(tmp_path)
    with pytest.raises(ConfigError, match=r"c.yml:5: sockets\[0\].options: a CURVE client needs"):
        parse_config(
            f"sockets:\n- name: s\n  type: DEALER\n  connect: [tcp://127.0.0.1:1]\n"
            f"  options: {{curve_secretkey_file: {server_secret_file}}}\n",
            "c.yml",
        )


def test_example_documents_every_key() -> None:
    from pydantic import BaseModel

    from exporter.config.model import Config

    text = (ROOT / "config" / "example.yml").read_text()
    missing = []
    pending: list[type[BaseModel]] = [Config]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        seen.add(model)
        for name, info in model.model_fields.items():
            key = info.alias or name
            if f"{key}:" not in text:
                missing.append(f"{model.__name__}.{key}")
            for inner in _models_in(info.annotation):
                if inner not in seen:
                    pending.append(inner)
    assert not missing, f"config/example.yml does not document: {missing}"


def _models_in(annotation: object) -> list[type]:
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
