"""Read, validate and resolve a config file into `Settings`: the one place a config enters.

Every error becomes a `ConfigError` naming file, line and key path; nothing here starts
sockets, so a bad file changes nothing.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import pydantic
import zmq

from exporter.config.cardinality import estimate_series
from exporter.config.durations import format_millis, to_millis
from exporter.config.errors import ConfigError, Path, shown
from exporter.config.files import CONFIG_MAX_BYTES, FileProblem, read_limited
from exporter.config.keys import Z85_KEY, KeyFileError, read_key_file
from exporter.config.messages import first_problem
from exporter.config.model import (
    Config,
    ConnectionsConfig,
    GlobalConfig,
    LimitsConfig,
    SocketConfig,
    SocketOptions,
    label_name_problem,
)
from exporter.config.modules import ProbeModule, default_modules, resolve_modules
from exporter.config.otlp import OtlpConfig
from exporter.config.relay import RelaySettings, resolve_relay
from exporter.config.yamlnodes import decode, line_of, load_with_lines
from exporter.core.endpoints import Role, parse_endpoint
from exporter.core.events import events_mask


@dataclass(frozen=True)
class SocketSpec:
    """One socket as the daemon creates it: globals merged in, key files read."""

    name: str
    socket_type: str
    binds: tuple[str, ...]
    connects: tuple[str, ...]
    options: SocketOptions
    labels: dict[str, str]
    events_mask: int
    curve_secretkey: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    file: str
    sockets: tuple[SocketSpec, ...]
    global_: GlobalConfig
    limits: LimitsConfig
    # Sections read by other parts. Not the whole validated model: it would keep a second
    # copy of every socket alive (~3 KB each).
    otlp: OtlpConfig | None = field(default=None, repr=False, compare=False)
    # /probe modules (exporter/config/modules.py); always holds the default `zmtp`.
    modules: dict[str, ProbeModule] = field(default_factory=default_modules, compare=False)
    # relay: (exporter/config/relay.py); None: no relay listener.
    relay: RelaySettings | None = field(default=None, repr=False, compare=False)
    # connections: the per-endpoint connection metrics and their sampler.
    connections: ConnectionsConfig = field(default=ConnectionsConfig(), compare=False)


def load_config(file: str) -> Settings:
    try:
        data = read_limited(file, CONFIG_MAX_BYTES)
    except FileProblem as err:
        raise ConfigError(file, None, (), f"cannot read config: {err}") from None
    return parse_config(decode(data, file), file)


def parse_config(text: str, file: str) -> Settings:
    data, lines = load_with_lines(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            file, lines.get(()), (), "the top level must be a mapping with a `sockets:` list"
        )
    try:
        model = Config.model_validate(data)
    except pydantic.ValidationError as err:
        path, text = first_problem(err, Config, is_secret)
        raise ConfigError(file, line_of(lines, path), path, text) from None
    return _resolve(model, file, lines)


# Keys whose value is a secret, or may be one pasted in the wrong place: no message ever
# quotes their value (a CURVE secret key pasted into curve_secretkey_file is a classic).
SECRET_KEYS = frozenset({"curve_secretkey_file", "curve_client_key_file", "plain_password_file"})
SECRET_SECTIONS: tuple[Path, ...] = (("otlp", "headers"),)


def is_secret(path: Path) -> bool:
    keys = tuple(p for p in path if isinstance(p, str))
    if any(k in SECRET_KEYS for k in keys):
        return True
    return any(path[: len(section)] == section for section in SECRET_SECTIONS)


def _resolve(model: Config, file: str, lines: dict[Path, int]) -> Settings:
    def fail(path: Path, message: str) -> typing.NoReturn:
        raise ConfigError(file, line_of(lines, path), path, message)

    if len(model.sockets) > model.limits.max_sockets:
        fail(
            ("sockets",),
            f"{len(model.sockets)} sockets configured, more than limits.max_sockets "
            f"({model.limits.max_sockets})",
        )
    _check_labels(model.global_.labels, ("global", "labels"), fail)
    g = model.global_
    if g.bind_retry_interval <= 0:
        fail(("global", "bind_retry_interval"), "must be above zero (0 would retry in a busy loop)")
    if g.bind_retry_max_interval < g.bind_retry_interval:
        fail(
            ("global", "bind_retry_max_interval"),
            "must not be below bind_retry_interval",
        )
    # The base of every socket that connects: the heartbeat defaults under global options.
    connect_base = CONNECT_DEFAULTS.model_copy(update=g.options.model_dump(exclude_none=True))
    seen: dict[str, int] = {}
    specs = []
    for index, sock in enumerate(model.sockets):
        here: Path = ("sockets", index)
        if sock.name in seen:
            fail(
                (*here, "name"),
                f"duplicate socket name {sock.name!r} (first at sockets[{seen[sock.name]}])",
            )
        seen[sock.name] = index
        specs.append(_resolve_socket(sock, model.global_, connect_base, here, fail))
    # Label values come only from here: see cardinality.
    series = estimate_series(specs, model.connections)
    if series > model.limits.max_series:
        where: Path = ("limits", "max_series") if ("limits", "max_series") in lines else ()
        fail(
            where or ("sockets",),
            f"about {series} series estimated for {len(specs)} sockets, more than "
            f"limits.max_series ({model.limits.max_series})",
        )
    modules = resolve_modules(model.modules, fail)
    relay = None
    if model.relay is not None:
        relay = resolve_relay(model.relay, fail)
    if not specs and "modules" not in model.model_fields_set and relay is None:
        # An empty file, or `sockets: []` alone, would start a daemon that watches nothing;
        # a `modules:` section (even `{}`, the default module only) makes a probe-only one.
        fail(
            ("sockets",) if ("sockets",) in lines else (),
            "the config watches nothing: no socket configured (add one under `sockets:`, "
            "or a `modules:` section for a probe-only exporter)",
        )
    return Settings(
        file,
        tuple(specs),
        model.global_,
        model.limits,
        model.otlp,
        modules,
        relay,
        model.connections,
    )


# Defaults for the options of sockets that connect, under the file's own (global, then per
# socket; `heartbeat_ivl: 0s` turns heartbeats off). Without heartbeats a peer that froze
# (SIGSTOP, a hung VM) keeps its TCP connection and looks connected for ever: with them a
# live connection to it ends within heartbeat_timeout (15 s), and a new one, which its
# kernel still accepts, fails its ZMTP handshake within handshake_ivl (10 s; libzmq's
# default is 30 s). PING/PONG are ZMTP commands that libzmq peers (4.2 and later) answer
# by themselves; they add no monitor events. Sockets that only bind keep libzmq's defaults:
# their peers are the watched applications' sockets, which the sidecar should not drop.
CONNECT_DEFAULTS = SocketOptions.model_validate(
    {"heartbeat_ivl": "5s", "heartbeat_timeout": "15s", "handshake_ivl": "10s"}
)


def _resolve_socket(
    sock: SocketConfig,
    defaults: GlobalConfig,
    connect_base: SocketOptions,
    here: Path,
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> SocketSpec:
    if not sock.bind and not sock.connect:
        fail(here, f"socket {sock.name!r} has neither `bind` nor `connect` endpoints")
    for role, endpoints in (("bind", sock.bind), ("connect", sock.connect)):
        for index, endpoint in enumerate(endpoints):
            if endpoints.index(endpoint) != index:
                fail((*here, role, index), f"duplicate endpoint {endpoint!r}")
    _check_labels(sock.labels, (*here, "labels"), fail)
    # Sockets without options of their own share one options object (memory).
    base = connect_base if sock.connect else defaults.options
    overrides = sock.options.model_dump(exclude_none=True)
    merged = base.model_copy(update=overrides) if overrides else base
    opts: Path = (*here, "options")
    if merged.subscribe is not None and sock.type != "SUB":
        fail((*opts, "subscribe"), f"`subscribe` applies only to SUB sockets, not {sock.type}")
    _check_across(sock, merged, here, fail)
    secret = _curve(merged, opts, fail)
    names = sock.events if sock.events is not None else defaults.events
    return SocketSpec(
        name=sock.name,
        socket_type=sock.type,
        binds=tuple(sock.bind),
        connects=tuple(sock.connect),
        options=merged,
        labels={**defaults.labels, **sock.labels},
        events_mask=events_mask(names),
        curve_secretkey=secret,
    )


def _check_across(
    sock: SocketConfig,
    merged: SocketOptions,
    here: Path,
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> None:
    """Checks of one option against another (after the globals are merged in)."""
    opts: Path = (*here, "options")
    own = sock.options.model_fields_set
    ivl, ivl_max = merged.reconnect_ivl, merged.reconnect_ivl_max
    if ivl is not None and ivl_max is not None and 0 < to_millis(ivl_max) < to_millis(ivl):
        # libzmq silently ignores such a maximum (zmq_setsockopt(3)): say so instead.
        key = (
            "reconnect_ivl_max"
            if "reconnect_ivl_max" in own or "reconnect_ivl" not in own
            else "reconnect_ivl"
        )
        fail(
            (*opts, key),
            f"reconnect_ivl_max ({format_millis(to_millis(ivl_max))}) is below reconnect_ivl "
            f"({format_millis(to_millis(ivl))}); libzmq would ignore it (0s: no backoff)",
        )
    if not merged.ipv6:
        roles: tuple[tuple[Role, list[str]], ...] = (("bind", sock.bind), ("connect", sock.connect))
        for role, endpoints in roles:
            for index, endpoint in enumerate(endpoints):
                if parse_endpoint(endpoint, role).host.startswith("["):
                    fail(
                        (*here, role, index),
                        f"IPv6 endpoint {shown(endpoint)} needs `ipv6: true` in the options "
                        "(without it libzmq fails the bind or retries the connect for ever)",
                    )


def _check_labels(
    labels: dict[str, str], where: Path, fail: typing.Callable[[Path, str], typing.NoReturn]
) -> None:
    for name, value in labels.items():
        problem = label_name_problem(name)
        if problem:
            fail((*where, name), problem)
        if "\0" in value:
            fail((*where, name), "label value must not contain a NUL byte")


def _curve(
    options: SocketOptions,
    opts: Path,
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> bytes | None:
    wants_curve = options.curve_server or options.curve_serverkey or options.curve_secretkey_file
    if not wants_curve:
        return None
    if not zmq.has("curve"):
        fail(opts, "CURVE options given, but this libzmq was built without CURVE")
    if options.curve_secretkey_file is None:
        fail(opts, "CURVE needs `curve_secretkey_file` (the socket's own secret key)")
    if options.curve_server and options.curve_serverkey:
        fail((*opts, "curve_serverkey"), "a CURVE server takes no `curve_serverkey`")
    if not options.curve_server and not options.curve_serverkey:
        fail(opts, "a CURVE client needs `curve_serverkey` (or set `curve_server: true`)")
    try:
        secret = read_key_file(options.curve_secretkey_file, "secret")
    except KeyFileError as err:
        fail((*opts, "curve_secretkey_file"), str(err))
    for key in ("curve_publickey", "curve_serverkey"):
        value = getattr(options, key)
        if value is not None and not Z85_KEY.fullmatch(value):
            fail((*opts, key), "not a valid Z85-encoded CURVE key")
    return secret
