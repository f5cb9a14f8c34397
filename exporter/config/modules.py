"""The `modules:` section resolved into `ProbeModule`s for /probe: checks across
keys and the key and password files read, once, when the config loads.

A module's secrets (CURVE secret key, PLAIN password) are held as bytes and never shown:
not in errors, not in `repr`, not in /probe's debug output (`ProbeModule.describe`).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

import zmq

from exporter.config.errors import Path, shown
from exporter.config.fence import Fence, address_of, parse_pattern
from exporter.config.files import KEY_MAX_BYTES, FileProblem, read_limited
from exporter.config.keys import KeyFileError, KeyKind, read_key_file
from exporter.config.model import ModuleConfig

DEFAULT_MODULE = "zmtp"  # works with no config: a DEALER, NULL mechanism, ip4 first
Fail = typing.Callable[[Path, str], typing.NoReturn]


@dataclass(frozen=True)
class ProbeModule:
    name: str
    socket_type: str = "DEALER"
    timeout: float | None = None  # None: the scrape's timeout minus the offset
    mechanism: str = "NULL"
    ip_protocol: str = "ip4"
    ip_protocol_fallback: bool = True
    allowed_targets: tuple[str, ...] | None = None
    curve_serverkey: bytes | None = None  # Z85, public
    curve_secretkey: bytes | None = field(default=None, repr=False)  # Z85; None: per probe
    plain_username: bytes | None = None
    plain_password: bytes | None = field(default=None, repr=False)
    # `allowed_targets` parsed (exporter.config.fence); None: no fence, every target.
    fence: Fence | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.allowed_targets is not None:
            object.__setattr__(self, "fence", Fence.parse(self.allowed_targets))

    def allows(self, target: str) -> bool:
        """Whether `target` as written passes `allowed_targets` (exporter.config.fence:
        addresses by address patterns and CIDR blocks, names by name patterns, ipc paths
        normalised and without `..`); every target when none are configured."""
        return self.fence is None or self.fence.allows(target)

    def allows_address(self, ip: str, port: int) -> bool:
        """Whether the address a target's name resolved to may be connected to: it must
        pass `allowed_targets` as an address literal would."""
        if self.fence is None:
            return True
        address = address_of(ip)
        return address is not None and self.fence.allows_address(address, port)

    def allows_path(self, path: str) -> bool:
        """Whether a normalised ipc path (or the path a symbolic link leads to) passes."""
        return self.fence is None or self.fence.allows_path(path)

    def describe(self) -> str:
        """The module as YAML-ish text for debug output; secrets only as `<set>`."""
        lines = [
            f"socket_type: {self.socket_type}",
            f"timeout: {'scrape timeout' if self.timeout is None else f'{self.timeout:g}s'}",
            f"mechanism: {self.mechanism}",
            f"ip_protocol: {self.ip_protocol}",
            f"ip_protocol_fallback: {str(self.ip_protocol_fallback).lower()}",
        ]
        if self.allowed_targets is not None:
            lines.append(f"allowed_targets: {list(self.allowed_targets)}")
        if self.curve_serverkey is not None:
            lines.append(f"curve_server_key: {self.curve_serverkey.decode()}")
        if self.mechanism == "CURVE":
            given = "<set>" if self.curve_secretkey is not None else "<new pair per probe>"
            lines.append(f"curve_client_key: {given}")
        if self.plain_username is not None:
            lines.append("plain_username: <set>")
            lines.append("plain_password: <set>")
        return "\n".join(lines) + "\n"


def default_modules() -> dict[str, ProbeModule]:
    return {DEFAULT_MODULE: ProbeModule(DEFAULT_MODULE)}


def resolve_modules(modules: Mapping[str, ModuleConfig], fail: Fail) -> dict[str, ProbeModule]:
    """Every configured module, plus `zmtp` unless the config defines its own."""
    out = default_modules()
    for name, module in modules.items():
        out[name] = _resolve(name, module, ("modules", name), fail)
    return out


def _resolve(name: str, m: ModuleConfig, here: Path, fail: Fail) -> ProbeModule:
    if m.timeout is not None and m.timeout <= 0:
        fail((*here, "timeout"), "must be above zero")
    curve_keys = ("curve_server_key_file", "curve_client_key_file")
    plain_keys = ("plain_username", "plain_password_file")
    for key in curve_keys if m.mechanism != "CURVE" else ():
        if getattr(m, key) is not None:
            fail((*here, key), f"applies only to `mechanism: CURVE`, not {m.mechanism}")
    for key in plain_keys if m.mechanism != "PLAIN" else ():
        if getattr(m, key) is not None:
            fail((*here, key), f"applies only to `mechanism: PLAIN`, not {m.mechanism}")
    if m.allowed_targets is not None:
        _check_fence(m.allowed_targets, (*here, "allowed_targets"), fail)
    server = secret = username = password = None
    if m.mechanism == "CURVE":
        if not zmq.has("curve"):
            fail((*here, "mechanism"), "CURVE, but this libzmq was built without CURVE")
        if m.curve_server_key_file is None:
            fail(here, "`mechanism: CURVE` needs `curve_server_key_file` (the server's public key)")
        server = _key(m.curve_server_key_file, "public", (*here, "curve_server_key_file"), fail)
        if m.curve_client_key_file is not None:
            where: Path = (*here, "curve_client_key_file")
            secret = _key(m.curve_client_key_file, "secret", where, fail)
    if m.mechanism == "PLAIN":
        if m.plain_username is None or m.plain_password_file is None:
            fail(here, "`mechanism: PLAIN` needs `plain_username` and `plain_password_file`")
        username = m.plain_username.encode()
        password = _read(m.plain_password_file, (*here, "plain_password_file"), fail).rstrip(
            b"\r\n"
        )
        if len(username) > 255 or len(password) > 255:  # one length byte each in HELLO
            fail(here, "PLAIN username and password are at most 255 bytes each")
    return ProbeModule(
        name=name,
        socket_type=m.socket_type,
        timeout=m.timeout,
        mechanism=m.mechanism,
        ip_protocol=m.ip_protocol,
        ip_protocol_fallback=m.ip_protocol_fallback,
        allowed_targets=tuple(m.allowed_targets) if m.allowed_targets is not None else None,
        curve_serverkey=server,
        curve_secretkey=secret,
        plain_username=username,
        plain_password=password,
    )


def _check_fence(patterns: list[str], here: Path, fail: Fail) -> None:
    for i, text in enumerate(patterns):
        try:
            parse_pattern(text)
        except ValueError as err:
            fail((*here, i), f"bad pattern {shown(text)}: {err}")
    if Fence.parse(tuple(patterns)).names_without_addresses():
        fail(
            here,
            "host-name patterns but no address pattern: a name is allowed only if the address "
            "it resolves to is allowed too; add the addresses or CIDR blocks (e.g. "
            "tcp://10.20.0.0/16:5555) the names resolve to",
        )


def _read(path: str, where: Path, fail: Fail) -> bytes:
    # Neither the path nor the content is quoted: either may be the secret itself.
    try:
        return read_limited(path, KEY_MAX_BYTES)
    except FileProblem as err:
        fail(where, f"cannot read file: {err} (value not shown)")


def _key(path: str, kind: KeyKind, where: Path, fail: Fail) -> bytes:
    try:
        return read_key_file(path, kind)
    except KeyFileError as err:
        fail(where, str(err))
