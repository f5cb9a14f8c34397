"""CURVE key files: one reader (exporter.config.keys) for the socket options, the probe
modules and the relay, so a key file that one section takes, every section takes, and a
bad one is refused by each with the same words, never quoting the path or the content."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
import zmq.auth

from exporter.config import ConfigError, parse_config
from exporter.config.keys import KeyFileError, parse_key, read_key_file

PUBLIC, SECRET = (k.decode() for k in zmq.curve_keypair())


def _good_forms(tmp: Path) -> dict[str, Path]:
    """Every form a secret key file may take."""
    public_file, secret_file = zmq.auth.create_certificates(str(tmp), "made")
    forms = {"zmq.auth certificate": Path(secret_file)}
    texts = {
        "bare key": SECRET,
        "bare key, newline": f"{SECRET}\n",
        "bare key, spaces": f"  {SECRET}  \n\n",
        "ZPL double quotes": f'curve\n    public-key = "{PUBLIC}"\n    secret-key = "{SECRET}"\n',
        "ZPL single quotes": f"curve\n    secret-key = '{SECRET}'\n",
        "ZPL bare value": f"curve\n    secret-key = {SECRET}\n",
        "ZPL, no spaces": f'curve\n    secret-key="{SECRET}"\n',
    }
    for i, (name, text) in enumerate(texts.items()):
        path = tmp / f"good{i}.key"
        path.write_text(text)
        forms[name] = path
    del public_file
    return forms


def _bad_forms(tmp: Path) -> dict[str, Path]:
    public_file, _ = zmq.auth.create_certificates(str(tmp), "other")
    texts: dict[str, str | bytes] = {
        "empty": "",
        "a password": "hunter2 is my password\n",
        "39 characters": SECRET[:39],
        "41 characters": SECRET + "x",
        "two keys": f"{SECRET}\n{SECRET}\n",
        "key in a comment only": f'# secret-key = "{SECRET}"\n',
        "not UTF-8": b"\xff\xfe" + SECRET.encode(),
        "not a key's value": "#" * 40,  # Z85 characters that decode beyond 2^32
    }
    forms = {"public certificate only": Path(public_file), "directory": tmp}
    for i, (name, text) in enumerate(texts.items()):
        path = tmp / f"bad{i}.key"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        forms[name] = path
    return forms


def test_every_good_form_gives_the_key(tmp_path: Path) -> None:
    for name, path in _good_forms(tmp_path).items():
        key = read_key_file(str(path), "secret")
        if name == "zmq.auth certificate":
            assert zmq.curve_public(key) == parse_key(path.read_text(), "public"), name
        else:
            assert key == SECRET.encode(), name


def test_every_bad_form_is_refused_without_quoting_it(tmp_path: Path) -> None:
    for name, path in _bad_forms(tmp_path).items():
        with pytest.raises(KeyFileError) as err:
            read_key_file(str(path), "secret")
        message = str(err.value)
        assert str(path) not in message and "hunter2" not in message, name
        assert message.startswith(("cannot read key file", "key file holds no")), name


def test_public_key_from_a_certificate_or_a_bare_file(tmp_path: Path) -> None:
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "c")
    from_secret = read_key_file(secret_file, "public")
    assert read_key_file(public_file, "public") == from_secret
    assert zmq.curve_public(read_key_file(secret_file, "secret")) == from_secret
    (tmp_path / "bare.pub").write_text(PUBLIC + "\n")
    assert read_key_file(str(tmp_path / "bare.pub"), "public") == PUBLIC.encode()


def test_a_key_pasted_as_the_path_is_hinted_at_not_shown() -> None:
    with pytest.raises(KeyFileError) as err:
        read_key_file(SECRET, "secret")
    assert SECRET not in str(err.value) and "looks like a Z85 key" in str(err.value)


# The three places a config names a secret key file, each as a config using `path`.
def _socket(path: Path) -> str:
    return (
        "sockets:\n- name: s\n  type: ROUTER\n  bind: [tcp://127.0.0.1:1]\n"
        f"  options:\n    curve_server: true\n    curve_secretkey_file: '{path}'\n"
    )


def _module(path: Path) -> str:
    return (
        f"modules:\n  c:\n    mechanism: CURVE\n    curve_server_key_file: '{path}.pub'\n"
        f"    curve_client_key_file: '{path}'\n"
    )


def _relay(path: Path) -> str:
    return f"relay:\n  listen: [tcp://127.0.0.1:1]\n  curve_secretkey_file: '{path}'\n"


SECTIONS: dict[str, Callable[[Path], str]] = {
    "socket options": _socket,
    "probe module": _module,
    "relay": _relay,
}


def _secret_of(section: str, text: str) -> bytes | None:
    settings = parse_config(text, "c.yml")
    if section == "socket options":
        return settings.sockets[0].curve_secretkey
    if section == "probe module":
        return settings.modules["c"].curve_secretkey
    assert settings.relay is not None
    return settings.relay.curve_secretkey


@pytest.mark.parametrize("section", SECTIONS)
def test_each_config_section_takes_every_good_form(tmp_path: Path, section: str) -> None:
    for name, path in _good_forms(tmp_path).items():
        Path(f"{path}.pub").write_text(PUBLIC)
        key = read_key_file(str(path), "secret")
        assert _secret_of(section, SECTIONS[section](path)) == key, name


@pytest.mark.parametrize("section", SECTIONS)
def test_each_config_section_refuses_every_bad_form_alike(tmp_path: Path, section: str) -> None:
    for name, path in _bad_forms(tmp_path).items():
        Path(f"{path}.pub").write_text(PUBLIC)
        with pytest.raises(ConfigError) as err:
            parse_config(SECTIONS[section](path), "c.yml")
        with pytest.raises(KeyFileError) as direct:
            read_key_file(str(path), "secret")
        assert str(err.value).endswith(str(direct.value)), (name, str(err.value))
        assert "hunter2" not in str(err.value), name
