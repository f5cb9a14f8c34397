"""The `modules:` section (issue 17): a probe-only config is valid, the default `zmtp`
module is always there, cross-key errors name the key, and no secret is ever echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from exporter.config import ConfigError, parse_config
from exporter.config.modules import ProbeModule

from helpers import run_cli


def load(text: str) -> dict[str, ProbeModule]:
    return dict(parse_config(text, "c.yml").modules)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yml")
    return str(err.value)


def test_default_module_without_config() -> None:
    modules = load("modules: {}\n")  # a probe-only config without a module of its own
    assert list(modules) == ["zmtp"]


def test_probe_only_config_is_valid(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    (tmp_path / "server.pub").write_text(
        f'#   ZeroMQ CURVE Public Certificate\ncurve\n    public-key = "{public.decode()}"\n'
    )
    (tmp_path / "client.key").write_bytes(secret + b"\n")
    (tmp_path / "password").write_text("s3cret\n")
    config = tmp_path / "probe.yml"
    config.write_text(
        f"""\
modules:
  curve:
    mechanism: curve
    socket_type: router
    timeout: 3s
    curve_server_key_file: {tmp_path}/server.pub
    curve_client_key_file: {tmp_path}/client.key
    ip_protocol: ip6
    ip_protocol_fallback: false
  plain:
    mechanism: PLAIN
    plain_username: probe
    plain_password_file: {tmp_path}/password
    allowed_targets: ["tcp://10.0.*:5555", "ipc:///run/zmq/*"]
"""
    )
    modules = parse_config(config.read_text(), str(config)).modules
    curve, plain = modules["curve"], modules["plain"]
    assert set(modules) == {"zmtp", "curve", "plain"}
    assert (curve.mechanism, curve.socket_type, curve.timeout) == ("CURVE", "ROUTER", 3.0)
    assert (curve.curve_serverkey, curve.curve_secretkey) == (public, secret)
    assert (curve.ip_protocol, curve.ip_protocol_fallback) == ("ip6", False)
    assert (plain.plain_username, plain.plain_password) == (b"probe", b"s3cret")
    assert plain.allows("tcp://10.0.3.4:5555") and plain.allows("ipc:///run/zmq/a.sock")
    assert not plain.allows("tcp://10.1.3.4:5555") and not plain.allows("tcp://10.0.3.4:22")
    assert secret.decode() not in repr(curve) and "s3cret" not in repr(plain)
    assert secret.decode() not in curve.describe() and "s3cret" not in plain.describe()
    out = run_cli(f"--config.file={config}", "--config.check")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ("modules: {c: {mechanism: CURVE}}", "modules.c", "needs `curve_server_key_file`"),
        ("modules: {c: {mechanism: ROT13}}", "modules.c.mechanism", "unknown mechanism"),
        ("modules: {c: {socket_type: STREAM}}", "modules.c.socket_type", "no ZMTP handshake"),
        ("modules: {c: {timeout: 0s}}", "modules.c.timeout", "above zero"),
        ("modules: {c: {ip_protocol: ip5}}", "modules.c.ip_protocol", ""),
        (
            "modules: {c: {plain_username: u}}",
            "modules.c.plain_username",
            "only to `mechanism: PLAIN`",
        ),
        ("modules: {c: {mechanism: PLAIN, plain_username: u}}", "modules.c", "plain_password_file"),
        ("modules: {c: {frobnicate: 1}}", "modules.c.frobnicate", ""),
    ],
)
def test_module_errors_name_the_key(text: str, where: str, says: str) -> None:
    message = error(text)
    assert where in message and says in message, message


def test_secrets_are_never_echoed(tmp_path: Path) -> None:
    _, secret = zmq.curve_keypair()
    public, _ = zmq.curve_keypair()
    (tmp_path / "server.pub").write_bytes(public)
    pasted = secret.decode()  # a key pasted where a file name goes
    message = error(
        "modules: {c: {mechanism: CURVE, curve_server_key_file: "
        f"'{tmp_path}/server.pub', curve_client_key_file: '{pasted}'}}}}"
    )
    assert pasted not in message and "cannot read key file" in message
    (tmp_path / "bad.key").write_text("not a key at all, but maybe a password\n")
    message = error(
        "modules: {c: {mechanism: CURVE, curve_server_key_file: "
        f"'{tmp_path}/server.pub', curve_client_key_file: '{tmp_path}/bad.key'}}}}"
    )
    assert "maybe a password" not in message and "content not shown" in message
    message = error(
        f"modules: {{c: {{mechanism: PLAIN, plain_username: u, plain_password_file: '{pasted}'}}}}"
    )
    assert pasted not in message


def test_yaml_null_is_the_null_mechanism() -> None:
    for spelling in ("NULL", "null", "~", "'NULL'"):
        modules = load(f"modules: {{m: {{mechanism: {spelling}}}}}")
        assert modules["m"].mechanism == "NULL"


def test_allowed_targets_cidr_and_ipv6_from_yaml() -> None:
    modules = load(
        "modules:\n  m:\n    allowed_targets:\n"
        '      - "tcp://10.20.0.0/16:5555"\n'
        '      - "tcp://[fd00:20::/32]:*"\n'
        '      - "tcp://*.orders.internal:5555"\n'
    )
    m = modules["m"]
    assert m.allows("tcp://10.20.3.4:5555") and not m.allows("tcp://10.21.3.4:5555")
    assert m.allows("tcp://[fd00:20::7]:1") and not m.allows("tcp://[fd00:21::7]:1")
    assert m.allows("tcp://db.orders.internal:5555")
    assert m.allows_address("10.20.9.9", 5555) and not m.allows_address("127.0.0.1", 5555)
    assert not m.allows("tcp://10.20.0.1.evil.test:5555")
    message = error('modules: {m: {allowed_targets: ["tcp://[10.0.0.0/8]:1"]}}')
    assert "modules.m.allowed_targets[0]" in message and "takes no brackets" in message
