"""The YAML schema, as pydantic models. Only shape and per-value checks live here;
checks across keys (duplicate names, CURVE pairs, key files) are in `exporter.config.load`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from exporter.config.durations import format_millis, parse_duration, to_millis
from exporter.config.otlp import OtlpConfig
from exporter.core.endpoints import parse_endpoint
from exporter.core.events import EVENT_BY_NAME
from exporter.core.metrics import RESERVED_LABELS  # a configured label may not shadow them

SOCKET_TYPES = (
    "ROUTER", "DEALER", "PUB", "SUB", "REQ", "REP",
    "PUSH", "PULL", "PAIR", "XPUB", "XSUB", "STREAM",
)  # fmt: skip

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _socket_type(value: str) -> str:
    upper = value.upper()
    if upper not in SOCKET_TYPES:
        raise ValueError(
            f"unknown socket type {value!r} (expected one of {', '.join(SOCKET_TYPES)})"
        )
    return upper


def _bind_endpoint(value: str) -> str:
    parse_endpoint(value, "bind")
    return value


def _connect_endpoint(value: str) -> str:
    parse_endpoint(value, "connect")
    return value


def _event_name(value: str) -> str:
    name = value.lower()
    if name != "all" and name not in EVENT_BY_NAME:
        raise ValueError(
            f"unknown event {value!r} (expected 'all' or one of {', '.join(EVENT_BY_NAME)})"
        )
    return name


def label_name_problem(name: str) -> str | None:
    """Why `name` cannot be a configured label name, or None if it can."""
    if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
        return f"invalid label name {name!r} (expected [a-zA-Z_][a-zA-Z0-9_]*, no '__' prefix)"
    if name in RESERVED_LABELS:
        return f"label name {name!r} is reserved by the exporter"
    return None


def _z85_key(value: str) -> str:
    if len(value) != 40:
        raise ValueError("expected a Z85-encoded CURVE key of 40 characters")
    return value


def _no_nul(value: str) -> str:
    # A NUL ends the string for libzmq's C API and for most consumers of label values.
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _int_range(low: int, high: int, why: str = "") -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"expected {low} to {high}{why}, got {value}")
        return value

    return AfterValidator(check)


def _max_millis(high: int, why: str) -> AfterValidator:
    def check(seconds: float) -> float:
        if to_millis(seconds) > high:
            raise ValueError(f"at most {format_millis(high)}{why}")
        return seconds

    return AfterValidator(check)


def _keepalive_seconds(seconds: float) -> float:
    # Sent in whole seconds (at least 1) at each TCP connection; Linux refuses more than
    # 32767 (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL), and libzmq then drops every connection.
    if round(seconds) > MAX_TCP_KEEPALIVE_SECONDS:
        raise ValueError(
            f"at most {MAX_TCP_KEEPALIVE_SECONDS}s (the Linux limit; libzmq would fail every "
            "connection of the socket)"
        )
    return seconds


def _routing_id(value: str) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= 255:
        raise ValueError(f"expected 1 to 255 bytes (libzmq's limit), got {size}")
    return value


# Limits libzmq 4.3.5 enforces in zmq_setsockopt (src/options.cpp) or that break every
# connection later; the validator knows them so that a config that passes the check starts.
INT_MAX = 2**31 - 1  # every integer option is a C int
HEARTBEAT_TTL_MAX_MS = 65535 * 100 + 99  # kept in deciseconds as a uint16 (ms // 100)
MAX_TCP_KEEPALIVE_SECONDS = 32767  # Linux MAX_TCP_KEEPIDLE / MAX_TCP_KEEPINTVL
MAX_TCP_KEEPCNT = 127  # Linux MAX_TCP_KEEPCNT

Duration = Annotated[float, BeforeValidator(parse_duration)]
HeartbeatTtl = Annotated[
    float,
    BeforeValidator(parse_duration),
    _max_millis(HEARTBEAT_TTL_MAX_MS, " (libzmq keeps heartbeat_ttl in 16 bits of deciseconds)"),
]
KeepaliveSeconds = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(_keepalive_seconds)
]
Name = Annotated[str, AfterValidator(_no_nul)]
SocketType = Annotated[str, AfterValidator(_socket_type)]
BindEndpoint = Annotated[str, AfterValidator(_bind_endpoint)]
ConnectEndpoint = Annotated[str, AfterValidator(_connect_endpoint)]
EventName = Annotated[str, AfterValidator(_event_name)]
Labels = dict[str, str]  # names checked by the loader, which knows each key's line
Z85Key = Annotated[str, AfterValidator(_z85_key)]
PositiveInt = Annotated[int, Field(gt=0)]
Hwm = Annotated[int, _int_range(0, INT_MAX, " (a C int; 0 means no limit)")]
Backlog = Annotated[int, _int_range(1, INT_MAX, " (a C int)")]
KeepaliveCount = Annotated[int, _int_range(1, MAX_TCP_KEEPCNT, " (the Linux limit)")]
RoutingId = Annotated[str, AfterValidator(_routing_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SocketOptions(_Strict):
    """Socket options; each maps to one ZMQ_* option (see `exporter.monitor.sockets`)."""

    reconnect_ivl: Duration | None = None
    reconnect_ivl_max: Duration | None = None
    heartbeat_ivl: Duration | None = None
    heartbeat_timeout: Duration | None = None
    heartbeat_ttl: HeartbeatTtl | None = None
    handshake_ivl: Duration | None = None
    linger: Duration | None = None
    tcp_keepalive: bool | None = None
    tcp_keepalive_idle: KeepaliveSeconds | None = None
    tcp_keepalive_intvl: KeepaliveSeconds | None = None
    tcp_keepalive_cnt: KeepaliveCount | None = None
    sndhwm: Hwm | None = None
    rcvhwm: Hwm | None = None
    backlog: Backlog | None = None
    ipv6: bool | None = None
    immediate: bool | None = None
    routing_id: RoutingId | None = None
    subscribe: list[str] | None = None
    curve_server: bool | None = None
    curve_secretkey_file: str | None = None
    curve_publickey: Z85Key | None = None
    curve_serverkey: Z85Key | None = None


class SocketConfig(_Strict):
    name: Annotated[Name, Field(min_length=1, max_length=128)]
    type: SocketType
    bind: list[BindEndpoint] = []
    connect: list[ConnectEndpoint] = []
    options: SocketOptions = SocketOptions()
    labels: Labels = {}
    events: list[EventName] | None = None


class GlobalConfig(_Strict):
    labels: Labels = {}
    options: SocketOptions = SocketOptions()
    events: list[EventName] = ["all"]
    # A bind that fails at run time (EADDRINUSE, EACCES) is retried with exponential
    # backoff between these two intervals.
    bind_retry_interval: Duration = 1.0
    bind_retry_max_interval: Duration = 30.0


def _between_millis(low: int, high: int, shown: str) -> AfterValidator:
    def check(seconds: float) -> float:
        if not low <= to_millis(seconds) <= high:
            raise ValueError(f"expected {shown}, got {format_millis(to_millis(seconds))}")
        return seconds

    return AfterValidator(check)


class ConnectionsConfig(_Strict):
    """Who is connected: the per-endpoint metrics read from the kernel by a
    sampler thread (exporter/connections/sampler.py; docs/connections.md)."""

    metrics: bool = True  # the six zmq_connection* families; False: no sampler thread
    per_peer: bool = False  # opt-in: the families per peer address (`peer` label)
    # Peers beyond it (per endpoint) aggregate under peer="other".
    max_peers_per_endpoint: Annotated[int, _int_range(1, 1000)] = 50
    # How often the live connections are read (at least 20x the last read's duration).
    sample_interval: Annotated[
        float, BeforeValidator(parse_duration), _between_millis(100, 3_600_000, "100ms to 1h")
    ] = 2.0


class LimitsConfig(_Strict):
    max_sockets: PositiveInt = 1000
    max_series: PositiveInt = 200_000


# -- /probe modules, as blackbox_exporter's `modules:` -------------------------------------

MECHANISMS = ("NULL", "PLAIN", "CURVE")


def _mechanism(value: str) -> str:
    upper = value.upper()
    if upper not in MECHANISMS:
        raise ValueError(f"unknown mechanism {value!r} (expected one of {', '.join(MECHANISMS)})")
    return upper


def _yaml_null_is_null(value: object) -> object:
    # `mechanism: NULL` is YAML's null; the user means the NULL mechanism.
    return "NULL" if value is None else value


def _probe_socket_type(value: str) -> str:
    upper = _socket_type(value)
    if upper == "STREAM":  # a STREAM socket does no ZMTP handshake: nothing to time
        raise ValueError("a STREAM socket does no ZMTP handshake; probe with another type")
    return upper


ModuleName = Annotated[Name, Field(min_length=1, max_length=128)]
Mechanism = Annotated[str, BeforeValidator(_yaml_null_is_null), AfterValidator(_mechanism)]


class ModuleConfig(_Strict):
    """One /probe module: how to probe a target (exporter/prober)."""

    socket_type: Annotated[str, AfterValidator(_probe_socket_type)] = "DEALER"
    # None: the scrape's timeout (X-Prometheus-Scrape-Timeout-Seconds) minus the offset.
    timeout: Duration | None = None
    mechanism: Mechanism = "NULL"
    curve_server_key_file: str | None = None  # the server's public key (Z85 or certificate)
    curve_client_key_file: str | None = None  # our secret key; none: a new pair per probe
    plain_username: str | None = None
    plain_password_file: str | None = None
    ip_protocol: Literal["ip4", "ip6"] = "ip4"
    ip_protocol_fallback: bool = True
    allowed_targets: list[Annotated[str, Field(min_length=1)]] | None = None


# -- relay: application processes send their sockets' state (docs/relay.md) -------------


def _relay_endpoint(value: str) -> str:
    if not value.startswith(("ipc://", "tcp://")):
        raise ValueError(f"relay endpoint {value!r}: expected ipc:// or tcp://")
    parse_endpoint(value, "bind")
    return value


def _file_mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f"file mode {value!r}: expected octal digits such as '0660'")
    return value


class RelayConfig(_Strict):
    listen: Annotated[
        list[Annotated[str, AfterValidator(_relay_endpoint)]], Field(min_length=1, max_length=16)
    ]
    expire: Duration = 300.0  # how long a gone process's series are kept
    ipc_mode: Annotated[str, AfterValidator(_file_mode)] | None = None  # ipc socket files
    # Required for tcp on a non-loopback address: the ROUTER is a CURVE server.
    curve_secretkey_file: str | None = None
    max_processes: PositiveInt = 1000
    max_sockets_per_process: PositiveInt = 1000
    max_message_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 256 * 1024
    # Relayed series of one process; all processes share what limits.max_series leaves.
    max_series_per_process: PositiveInt = 20_000
    # With CURVE: only these client public keys may send (a file of Z85 keys, one a line,
    # or a directory of such files / ZPL certificates). None: any key pair.
    curve_allowed_clients: str | None = None


class Config(_Strict):
    global_: GlobalConfig = Field(GlobalConfig(), alias="global")
    limits: LimitsConfig = LimitsConfig()
    sockets: list[SocketConfig] = []
    otlp: OtlpConfig | None = None  # OTLP push; see exporter/config/otlp.py
    modules: dict[ModuleName, ModuleConfig] = {}  # /probe modules; see ModuleConfig
    relay: RelayConfig | None = None  # relay listener; see RelayConfig
    connections: ConnectionsConfig = ConnectionsConfig()  # see ConnectionsConfig
