"""OTLP push settings: the `otlp:` section of the YAML config and the standard
OpenTelemetry environment variables, merged into one `OtlpSettings`.

The YAML section is a pydantic model, so its errors carry file:line like any other key.
Environment variables are checked here and a bad one raises `OtlpEnvError`, one line that
names the variable. Where both set the same thing, the config file wins. `resolve_otlp`
runs once at startup (exporter.otlp.export.check_otlp); the daemon is handed its result.

The transport (exporter/otlp/transport.py) reads nothing itself: what is checked here is
what it uses, the certificate variables included (read as paths here, their files by the
transport when it is made, so a missing file stops startup).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from exporter._version import __version__
from exporter.config.durations import parse_duration
from exporter.config.errors import ConfigError

T = TypeVar("T")
Protocol = Literal["grpc", "http/protobuf"]
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL: Protocol = "http/protobuf"  # the OpenTelemetry specification's default
DEFAULT_ENDPOINTS: dict[Protocol, str] = {
    "grpc": "http://localhost:4317",
    "http/protobuf": "http://localhost:4318",
}
DEFAULT_INTERVAL = 60.0  # seconds; OTEL_METRIC_EXPORT_INTERVAL's default
DEFAULT_TIMEOUT = 10.0  # seconds; OTEL_EXPORTER_OTLP_TIMEOUT's default
DEFAULT_EXPORT_TIMEOUT = 30.0  # seconds; OTEL_METRIC_EXPORT_TIMEOUT's default
# Seconds the final export at shutdown (SIGTERM) may take, its retries included: room for
# a round trip, a retry after the first backoff (0.5-1 s) and another; a collector that is
# down or hung delays exit by this much. Well below Docker's 10 s and Kubernetes' 30 s
# grace before SIGKILL.
DEFAULT_SHUTDOWN_TIMEOUT = 2.0
Compression = Literal["gzip", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "none")  # the specification's values
SERVICE_NAME = "zmq-exporter"
# Serialized bytes of one export request at most: gRPC servers (the Collector's otlp
# receiver among them) refuse a message above 4 MiB (4,194,304 bytes) by default; the rest
# is a margin. A larger export is sent as several requests.
DEFAULT_MAX_REQUEST_BYTES = 4_000_000
MIN_MAX_REQUEST_BYTES = 16_384  # room for the resource, a metric and its points

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def check_protocol(value: str) -> Protocol:
    if value not in PROTOCOLS:
        raise ValueError(f"unknown OTLP protocol {value!r} (expected grpc or http/protobuf)")
    return value


def check_compression(value: str) -> Compression:
    text = value.strip().lower()
    if text not in COMPRESSIONS:
        raise ValueError(f"unknown OTLP compression {value!r} (expected gzip or none)")
    return text


def check_endpoint(value: str) -> str:
    """An OTLP endpoint is an absolute http(s) URL with a host (`http://collector:4317`),
    or, for gRPC only (checked once the protocol is known), `host:port` without a scheme."""
    schemeless = "://" not in value
    try:
        # `collector:4317` would parse as scheme `collector`; as `//collector:4317` it is a host.
        parts = urlsplit("//" + value if schemeless else value)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as err:
        raise ValueError(f"malformed OTLP endpoint {value!r}: {err}") from None
    if schemeless:
        if not parts.hostname or port is None or parts.path or parts.query or parts.fragment:
            raise ValueError(
                f"malformed OTLP endpoint {value!r} (expected http://host:port, "
                "https://host:port or, for gRPC, host:port)"
            )
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"malformed OTLP endpoint {value!r} (expected http://host:port or https://host:port)"
        )
    if port == 0 or any(c.isspace() for c in value):
        raise ValueError(f"malformed OTLP endpoint {value!r}")
    return value


def has_scheme(endpoint: str) -> bool:
    return "://" in endpoint


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in text or "\n" in text:
            raise ValueError(f"header {name!r}: value must not contain a line break")
    return value


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def check_max_request_bytes(value: int) -> int:
    if value < MIN_MAX_REQUEST_BYTES:
        raise ValueError(f"expected at least {MIN_MAX_REQUEST_BYTES} bytes, got {value}")
    return value


OtlpProtocol = Annotated[str, AfterValidator(check_protocol)]
OtlpCompression = Annotated[str, AfterValidator(check_compression)]
OtlpEndpoint = Annotated[str, AfterValidator(check_endpoint)]
Headers = Annotated[dict[str, str], AfterValidator(_check_headers)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
RequestBytes = Annotated[int, AfterValidator(check_max_request_bytes)]


class OtlpConfig(BaseModel):
    """`otlp:` in the YAML config. Every key is optional; the section being present turns
    OTLP push on (unless `enabled: false`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = True
    protocol: OtlpProtocol | None = None  # OTEL_EXPORTER_OTLP_PROTOCOL
    endpoint: OtlpEndpoint | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT (base URL)
    metrics_endpoint: OtlpEndpoint | None = None  # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (full)
    insecure: bool | None = None  # OTEL_EXPORTER_OTLP_INSECURE (gRPC host:port endpoints)
    compression: OtlpCompression | None = None  # OTEL_EXPORTER_OTLP_COMPRESSION
    headers: Headers = {}  # OTEL_EXPORTER_OTLP_HEADERS
    interval: PositiveDuration | None = None  # OTEL_METRIC_EXPORT_INTERVAL
    timeout: PositiveDuration | None = None  # OTEL_EXPORTER_OTLP_TIMEOUT
    service_name: str | None = None  # OTEL_SERVICE_NAME
    resource_attributes: dict[str, str] = {}  # OTEL_RESOURCE_ATTRIBUTES
    # Not an OpenTelemetry setting (no variable): a larger export is split into requests.
    max_request_bytes: RequestBytes = DEFAULT_MAX_REQUEST_BYTES
    # Not an OpenTelemetry setting: the budget of the final export at shutdown.
    shutdown_timeout: PositiveDuration = DEFAULT_SHUTDOWN_TIMEOUT


@dataclass(frozen=True)
class OtlpSettings:
    """What the OTLP exporter is built from, every value resolved."""

    protocol: Protocol
    # What the exporter is given: for HTTP the full URL (with /v1/metrics); for gRPC a URL
    # or `host:port`.
    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT  # the exporter's, its retries included
    # Resource attributes (strings); resolve_otlp starts from default_resource() too.
    resource: dict[str, str] = field(default_factory=lambda: default_resource())
    compression: Compression = "none"
    # gRPC `host:port` endpoints: plaintext instead of TLS (see `plaintext`).
    insecure: bool = False
    export_timeout: float = DEFAULT_EXPORT_TIMEOUT  # OTEL_METRIC_EXPORT_TIMEOUT
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # serialized, per request
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT  # the final export's budget
    # TLS files (PEM paths): OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE (trusted CAs; the
    # system's when empty), ..._CLIENT_KEY and ..._CLIENT_CERTIFICATE (mutual TLS).
    certificate: str = ""
    client_key: str = ""
    client_certificate: str = ""

    @property
    def plaintext(self) -> bool:
        """gRPC transport security, the specification's rule: the scheme decides where there
        is one (http: plaintext, https: TLS), else `insecure`."""
        if has_scheme(self.endpoint):
            return self.endpoint.startswith("http://")
        return self.insecure

    @property
    def export_deadline(self) -> float:
        """Seconds one export may take, retries included: the exporter's timeout, bounded
        by the reader's export timeout."""
        return min(self.timeout, self.export_timeout)


class OtlpEnvError(ConfigError):
    """A bad OpenTelemetry environment variable: `OTEL_X='value': what is wrong`. Values of
    header variables are never echoed: they usually hold credentials."""

    def __init__(self, variable: str, value: str, message: str) -> None:
        super().__init__(variable, None, (), message)
        shown = variable if "HEADERS" in variable else f"{variable}={value!r}"
        Exception.__init__(self, f"environment variable {shown}: {message}")


def resolve_otlp(
    config: OtlpConfig | None,
    env: Mapping[str, str],
    warn: list[str] | None = None,
    file: str = "config",
) -> OtlpSettings | None:
    """Merge the YAML section (wins) with the environment; None when OTLP is off.

    Environment variables are only read (and checked) when OTLP is on. Messages about
    ignored values are appended to `warn`. `file` names the config file in errors."""
    warnings: list[str] = warn if warn is not None else []
    if not _enabled(config, env, warnings):
        return None
    yaml = config if config is not None else OtlpConfig()

    protocol = yaml.protocol
    if protocol is None:
        name, raw = _first(
            env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        protocol = _env(name, raw, check_protocol) if raw else DEFAULT_PROTOCOL
    proto = check_protocol(protocol)

    endpoint = _endpoint(yaml, env, proto, file)
    insecure = _insecure(yaml, env, proto, endpoint, warnings)
    compression = yaml.compression
    if compression is None:
        name, raw = _first(
            env, "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"
        )
        compression = _env(name, raw, check_compression) if raw else "none"
    compression = check_compression(compression)

    headers: dict[str, str] = {}
    name, raw = _first(env, "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    if raw:
        headers.update(_env(name, raw, lambda text: _check_headers(_parse_pairs(text))))
    headers.update(yaml.headers)
    # gRPC metadata keys must be lowercase; HTTP header names are case-insensitive.
    headers = {k.lower(): v for k, v in headers.items()}

    interval = yaml.interval
    if interval is None:
        raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "")
        interval = (
            _env("OTEL_METRIC_EXPORT_INTERVAL", raw, _millis) if raw.strip() else DEFAULT_INTERVAL
        )
    timeout = yaml.timeout
    if timeout is None:
        name, raw = _first(env, "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
        timeout = _env(name, raw, _millis) if raw else DEFAULT_TIMEOUT
    raw = env.get("OTEL_METRIC_EXPORT_TIMEOUT", "").strip()
    export_timeout = (
        _env("OTEL_METRIC_EXPORT_TIMEOUT", raw, _millis) if raw else DEFAULT_EXPORT_TIMEOUT
    )

    resource = default_resource()
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if raw.strip():
        resource.update(_env("OTEL_RESOURCE_ATTRIBUTES", raw, _parse_pairs))
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        resource["service.name"] = service
    resource.update(yaml.resource_attributes)
    if yaml.service_name:
        resource["service.name"] = yaml.service_name

    return OtlpSettings(
        proto,
        endpoint,
        headers,
        interval,
        timeout,
        resource,
        compression=compression,
        insecure=insecure,
        export_timeout=export_timeout,
        max_request_bytes=yaml.max_request_bytes,
        shutdown_timeout=yaml.shutdown_timeout,
        **_tls_files(env),
    )


def default_resource(hostname: str | None = None) -> dict[str, str]:
    """The resource attributes sent unless overridden (OTEL_RESOURCE_ATTRIBUTES, then
    OTEL_SERVICE_NAME, then the config file's `resource_attributes` and `service_name`).

    `service.instance.id` is the host name: stable across restarts of the same sidecar
    (a pod's host name is its name; a container's, its id), so a restart continues the same
    series in receivers that key on it (Prometheus maps it to `instance`), where a random id
    per start (the SDK's) began new ones. The `telemetry.sdk.*` attributes name what wrote
    the data: this program (no OpenTelemetry SDK is involved), as the semantic conventions
    ask of an implementation that is not the official SDK."""
    host = socket.gethostname() if hostname is None else hostname
    return {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "service.instance.id": host,
        "host.name": host,
        "telemetry.sdk.name": SERVICE_NAME,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": __version__,
    }


def _tls_files(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS file variables, the signal-specific one first (paths; an empty one is unset)."""
    out = {}
    for key, suffix in (
        ("certificate", "CERTIFICATE"),
        ("client_key", "CLIENT_KEY"),
        ("client_certificate", "CLIENT_CERTIFICATE"),
    ):
        _, raw = _first(env, f"OTEL_EXPORTER_OTLP_METRICS_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}")
        out[key] = raw
    return out


def _enabled(config: OtlpConfig | None, env: Mapping[str, str], warn: list[str]) -> bool:
    if config is not None:
        wanted, source = config.enabled, "the otlp: section of the config file"
    else:
        raw = env.get("OTEL_METRICS_EXPORTER", "")
        names = [n.strip().lower() for n in raw.split(",") if n.strip()]
        for unsupported in sorted(set(names) - {"otlp", "prometheus", "none"}):
            warn.append(
                f"OTEL_METRICS_EXPORTER: exporter {unsupported!r} is not supported here and is "
                "ignored (supported: otlp; Prometheus is always served on the web port)"
            )
        wanted, source = "otlp" in names, "OTEL_METRICS_EXPORTER=otlp"
    if wanted and _env_bool(env, "OTEL_SDK_DISABLED", warn):
        # The specification: the SDK is a no-op for every signal. It wins, but not silently.
        warn.append(f"OTLP push is off: OTEL_SDK_DISABLED=true wins over {source}")
        return False
    return wanted


def _endpoint(yaml: OtlpConfig, env: Mapping[str, str], protocol: Protocol, file: str) -> str:
    """Signal-specific endpoints are used as written; a base endpoint gets `/v1/metrics`
    appended for HTTP (the specification's rule). gRPC uses scheme, host and port, and also
    takes `host:port`; HTTP needs the scheme."""
    for key, value in (("metrics_endpoint", yaml.metrics_endpoint), ("endpoint", yaml.endpoint)):
        if value:
            if protocol != "grpc" and not has_scheme(value):
                raise ConfigError(file, None, ("otlp", key), _needs_scheme(value))
            return value if key == "metrics_endpoint" else _with_signal_path(value, protocol)
    for name in ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        raw = env.get(name, "").strip()
        if raw:
            value = _env(name, raw, check_endpoint)
            if protocol != "grpc" and not has_scheme(value):
                raise OtlpEnvError(name, raw, _needs_scheme(value))
            return (
                value if name.endswith("METRICS_ENDPOINT") else _with_signal_path(value, protocol)
            )
    return _with_signal_path(DEFAULT_ENDPOINTS[protocol], protocol)


def _needs_scheme(value: str) -> str:
    return (
        f"OTLP/HTTP endpoint {value!r} has no scheme (expected http://host:port or "
        "https://host:port; host:port alone is for protocol grpc)"
    )


def _with_signal_path(base: str, protocol: Protocol) -> str:
    if protocol == "grpc":
        return base
    return base.rstrip("/") + "/v1/metrics"


def _insecure(
    yaml: OtlpConfig, env: Mapping[str, str], protocol: Protocol, endpoint: str, warn: list[str]
) -> bool:
    """`insecure` for a gRPC `host:port` endpoint: the file, then
    OTEL_EXPORTER_OTLP_[METRICS_]INSECURE, false by default. With a scheme, or over HTTP,
    the scheme decides (`OtlpSettings.plaintext`) and the variables are not read."""
    if has_scheme(endpoint):
        return False
    if yaml.insecure is not None:
        return yaml.insecure
    name, _ = _first(env, "OTEL_EXPORTER_OTLP_METRICS_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
    return _env_bool(env, name, warn) if protocol == "grpc" else False


def _env_bool(env: Mapping[str, str], name: str, warn: list[str]) -> bool:
    """The specification's boolean: only `true` (any case) is true; a value other than
    true, false or empty is read as false with a warning."""
    raw = env.get(name, "").strip()
    if raw.lower() == "true":
        return True
    if raw and raw.lower() != "false":
        warn.append(f"environment variable {name}={raw!r} is not true or false; read as false")
    return False


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str]:
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            return name, raw
    return names[-1], ""


def _env(name: str, raw: str, check: Callable[[str], T]) -> T:
    try:
        return check(raw)
    except ValueError as err:
        raise OtlpEnvError(name, raw, str(err)) from None


def _millis(raw: str) -> float:
    """Durations in OTEL_* variables are integers of milliseconds."""
    try:
        millis = int(raw.strip())
    except ValueError:
        raise ValueError("expected a whole number of milliseconds") from None
    if millis <= 0:
        raise ValueError("expected a number of milliseconds above zero")
    return millis / 1000


def _parse_pairs(raw: str) -> dict[str, str]:
    """`key1=value1,key2=value2`, values percent-decoded (W3C Baggage style), as used by
    OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES."""
    out: dict[str, str] = {}
    for index, item in enumerate(raw.split(",")):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = unquote(key.strip())
        if not sep or not key:
            # The entry itself is not echoed: header values are usually credentials.
            raise ValueError(f"entry {index + 1} is not key=value (expected key=value,...)")
        out[key] = unquote(value.strip())
    return out
