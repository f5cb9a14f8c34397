"""OTLP push settings: the `otlp:` section of the YAML config and the standard
OpenTelemetry environment variables, merged into one `OtlpSettings`.

The YAML section is a pydantic model, so its errors carry file:line like any other key.
Environment variables are checked here and a bad one raises `OtlpEnvError`, one line that
names the variable. Where both set the same thing, the config file wins.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from exporter import __version__
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
SERVICE_NAME = "zmq-exporter"

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def check_protocol(value: str) -> Protocol:
    if value not in PROTOCOLS:
        raise ValueError(f"unknown OTLP protocol {value!r} (expected grpc or http/protobuf)")
    return value


def check_endpoint(value: str) -> str:
    """An OTLP endpoint is an absolute http(s) URL with a host: `http://collector:4317`."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as err:
        raise ValueError(f"malformed OTLP endpoint {value!r}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"malformed OTLP endpoint {value!r} (expected http://host:port or https://host:port)"
        )
    if port == 0 or any(c.isspace() for c in value):
        raise ValueError(f"malformed OTLP endpoint {value!r}")
    return value


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


OtlpProtocol = Annotated[str, AfterValidator(check_protocol)]
OtlpEndpoint = Annotated[str, AfterValidator(check_endpoint)]
Headers = Annotated[dict[str, str], AfterValidator(_check_headers)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]


class OtlpConfig(BaseModel):
    """`otlp:` in the YAML config. Every key is optional; the section being present turns
    OTLP push on (unless `enabled: false`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = True
    protocol: OtlpProtocol | None = None  # OTEL_EXPORTER_OTLP_PROTOCOL
    endpoint: OtlpEndpoint | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT (base URL)
    metrics_endpoint: OtlpEndpoint | None = None  # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (full)
    headers: Headers = {}  # OTEL_EXPORTER_OTLP_HEADERS
    interval: PositiveDuration | None = None  # OTEL_METRIC_EXPORT_INTERVAL
    timeout: PositiveDuration | None = None  # OTEL_EXPORTER_OTLP_TIMEOUT
    service_name: str | None = None  # OTEL_SERVICE_NAME
    resource_attributes: dict[str, str] = {}  # OTEL_RESOURCE_ATTRIBUTES


@dataclass(frozen=True)
class OtlpSettings:
    """What the OTLP exporter is built from, every value resolved."""

    protocol: Protocol
    endpoint: str  # the URL handed to the exporter (for HTTP: including /v1/metrics)
    headers: dict[str, str] = field(default_factory=dict)
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    resource: dict[str, str] = field(default_factory=dict)


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
) -> OtlpSettings | None:
    """Merge the YAML section (wins) with the environment; None when OTLP is off.

    Environment variables are only read (and checked) when OTLP is on. Messages about
    ignored values are appended to `warn`."""
    if not _enabled(config, env, warn if warn is not None else []):
        return None
    yaml = config if config is not None else OtlpConfig()

    protocol = yaml.protocol
    if protocol is None:
        name, raw = _first(
            env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        protocol = _env(name, raw, check_protocol) if raw else DEFAULT_PROTOCOL
    proto = check_protocol(protocol)

    endpoint = _endpoint(yaml, env, proto)

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

    resource = {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "host.name": socket.gethostname(),
    }
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if raw.strip():
        resource.update(_env("OTEL_RESOURCE_ATTRIBUTES", raw, _parse_pairs))
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        resource["service.name"] = service
    resource.update(yaml.resource_attributes)
    if yaml.service_name:
        resource["service.name"] = yaml.service_name

    return OtlpSettings(proto, endpoint, headers, interval, timeout, resource)


def _enabled(config: OtlpConfig | None, env: Mapping[str, str], warn: list[str]) -> bool:
    if config is not None:
        return config.enabled
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    raw = env.get("OTEL_METRICS_EXPORTER", "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    for unsupported in sorted(set(names) - {"otlp", "prometheus", "none"}):
        warn.append(
            f"OTEL_METRICS_EXPORTER: exporter {unsupported!r} is not supported here and is "
            "ignored (supported: otlp; Prometheus is always served on the web port)"
        )
    return "otlp" in names


def _endpoint(yaml: OtlpConfig, env: Mapping[str, str], protocol: Protocol) -> str:
    """Signal-specific endpoints are used as written; a base endpoint gets `/v1/metrics`
    appended for HTTP (the specification's rule). gRPC uses scheme, host and port."""
    if yaml.metrics_endpoint:
        return yaml.metrics_endpoint
    if yaml.endpoint:
        return _with_signal_path(yaml.endpoint, protocol)
    raw = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
    if raw:
        return _env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raw, check_endpoint)
    raw = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if raw:
        return _with_signal_path(_env("OTEL_EXPORTER_OTLP_ENDPOINT", raw, check_endpoint), protocol)
    return _with_signal_path(DEFAULT_ENDPOINTS[protocol], protocol)


def _with_signal_path(base: str, protocol: Protocol) -> str:
    if protocol == "grpc":
        return base
    return base.rstrip("/") + "/v1/metrics"


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
