"""OTLP settings: the `otlp:` YAML section, the OTEL_* environment variables, which wins, and
the startup errors of bad values (a real daemon process, exit code 1, one line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import ConfigError, parse_config
from exporter.config.otlp import OtlpSettings, resolve_otlp
from exporter.core.metrics import PUSHED

from helpers import ROOT, Daemon, free_port, value

SOCKETS = "sockets:\n  - {name: s, type: ROUTER, bind: ['tcp://127.0.0.1:5999']}\n"


def resolve(
    yaml_otlp: str | None, env: dict[str, str], warn: list[str] | None = None
) -> OtlpSettings | None:
    text = SOCKETS + (f"otlp:\n{yaml_otlp}" if yaml_otlp is not None else "")
    return resolve_otlp(parse_config(text, "c.yml").otlp, env, warn, "c.yml")


def test_off_unless_asked() -> None:
    assert resolve(None, {}) is None
    assert resolve(None, {"OTEL_METRICS_EXPORTER": "prometheus"}) is None
    assert resolve(None, {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None
    assert resolve("  enabled: false\n", {"OTEL_METRICS_EXPORTER": "otlp"}) is None
    # Unused variables are not checked while OTLP is off.
    assert resolve(None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "bogus"}) is None


def test_env_defaults_and_signal_path() -> None:
    on = {"OTEL_METRICS_EXPORTER": "otlp"}
    s = resolve(None, on)
    assert s is not None
    assert (s.protocol, s.endpoint) == ("http/protobuf", "http://localhost:4318/v1/metrics")
    assert (s.interval, s.timeout) == (60.0, 10.0)
    assert s.resource["service.name"] == "zmq-exporter"
    assert {"service.version", "host.name"} <= set(s.resource)

    s = resolve(None, {**on, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert s is not None and s.endpoint == "http://localhost:4317"

    base = {**on, "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example:4318/"}
    s = resolve(None, base)
    assert s is not None and s.endpoint == "https://c.example:4318/v1/metrics"
    s = resolve(None, {**base, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:1/custom"})
    assert s is not None and s.endpoint == "http://m:1/custom"  # signal-specific: as is

    s = resolve(
        None,
        {
            **on,
            "OTEL_METRIC_EXPORT_INTERVAL": "1500",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "250",
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-b=2",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=core",
            "OTEL_SERVICE_NAME": "svc",
        },
    )
    assert s is not None
    assert (s.interval, s.timeout) == (1.5, 0.25)
    assert s.headers == {"authorization": "Bearer abc", "x-b": "2"}
    assert s.resource["service.name"] == "svc"  # OTEL_SERVICE_NAME wins, as specified
    assert s.resource["team"] == "core"


def test_config_file_wins_where_both_are_set() -> None:
    env = {
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://env:4318/v1/metrics",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-a=env,x-env=1",
        "OTEL_METRIC_EXPORT_INTERVAL": "9000",
        "OTEL_SERVICE_NAME": "env-name",
        "OTEL_RESOURCE_ATTRIBUTES": "a=env,b=env",
    }
    s = resolve(
        "  protocol: grpc\n"
        "  endpoint: http://yaml:4317\n"
        "  headers: {x-a: yaml}\n"
        "  interval: 2s\n"
        "  service_name: yaml-name\n"
        "  resource_attributes: {a: yaml}\n",
        env,
    )
    assert s is not None
    assert (s.protocol, s.endpoint, s.interval) == ("grpc", "http://yaml:4317", 2.0)
    assert s.headers == {"x-a": "yaml", "x-env": "1"}  # merged per key
    assert s.resource["service.name"] == "yaml-name"
    assert (s.resource["a"], s.resource["b"]) == ("yaml", "env")


@pytest.mark.parametrize(
    ("otlp", "message"),
    [
        ("  protocol: http/json\n", "c.yml:4: otlp.protocol: unknown OTLP protocol 'http/json'"),
        ("  endpoint: collector\n", "c.yml:4: otlp.endpoint: malformed OTLP endpoint"),
        ("  endpoint: collector:4317/x\n", "c.yml:4: otlp.endpoint: malformed OTLP endpoint"),
        ("  compression: brotli\n", "c.yml:4: otlp.compression: unknown OTLP compression"),
        ("  metrics_endpoint: http://c:70000\n", "c.yml:4: otlp.metrics_endpoint: malformed"),
        ("  interval: 0s\n", "c.yml:4: otlp.interval: expected a duration above zero"),
        ("  headers: {'bad name': x}\n", "c.yml:4: otlp.headers: invalid header name"),
        ("  protcol: grpc\n", "c.yml:4: otlp.protcol: unknown key (expected one of: enabled"),
        ("  max_request_bytes: 1000\n", "c.yml:4: otlp.max_request_bytes: expected at least 16384"),
        ("  max_request_bytes: 4MB\n", "c.yml:4: otlp.max_request_bytes: "),
    ],
)
def test_yaml_errors_name_file_line_and_key(otlp: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(SOCKETS + "otlp:\n" + otlp, "c.yml")
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "environment variable OTEL_EXPORTER_OTLP_PROTOCOL='http/json': unknown OTLP "
            "protocol 'http/json' (expected grpc or http/protobuf)",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"},
            "environment variable OTEL_EXPORTER_OTLP_ENDPOINT='collector:4317': OTLP/HTTP "
            "endpoint 'collector:4317' has no scheme",
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector"},
            "environment variable OTEL_EXPORTER_OTLP_ENDPOINT='collector': malformed",
        ),
        (
            {"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"},
            "environment variable OTEL_EXPORTER_OTLP_COMPRESSION='brotli': unknown OTLP "
            "compression 'brotli' (expected gzip or none)",
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"},
            "environment variable OTEL_EXPORTER_OTLP_COMPRESSION='deflate': unknown OTLP",
        ),
        (
            {"OTEL_METRIC_EXPORT_TIMEOUT": "1s"},
            "environment variable OTEL_METRIC_EXPORT_TIMEOUT='1s': expected a whole number",
        ),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "ftp://c/v1/metrics"},
            "environment variable OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=",
        ),
        (
            {"OTEL_METRIC_EXPORT_INTERVAL": "10s"},
            "environment variable OTEL_METRIC_EXPORT_INTERVAL='10s': expected a whole number",
        ),
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization Bearer sekrit"},
            "environment variable OTEL_EXPORTER_OTLP_HEADERS: entry 1 is not key=value",
        ),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(None, {"OTEL_METRICS_EXPORTER": "otlp", **env})
    text = str(err.value)
    assert text.startswith(message), text
    assert "sekrit" not in text  # header values are never echoed


def run_cli(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "exporter", f"--config.file={config}", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("check", [True, False], ids=["config.check", "start"])
@pytest.mark.parametrize(
    ("yaml", "env", "expected"),
    [
        ("", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpcc"}, "OTEL_EXPORTER_OTLP_PROTOCOL='grpcc'"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost"}, "OTEL_EXPORTER_OTLP_ENDPOINT="),
        ("otlp:\n  protocol: thrift\n", {}, "config.yml:4: otlp.protocol: unknown OTLP"),
        ("otlp:\n  endpoint: 'http://'\n", {}, "config.yml:4: otlp.endpoint: malformed"),
        ("", {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION='zstd'"),
        (
            "",
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
            "OTEL_EXPORTER_OTLP_COMPRESSION='zstd': unknown OTLP compression",
        ),
        (
            "otlp:\n  endpoint: collector:4317\n",
            {},
            "config.yml: otlp.endpoint: OTLP/HTTP endpoint 'collector:4317' has no scheme",
        ),
    ],
)
def test_bad_settings_stop_the_daemon_with_one_line(
    tmp_path: Path, yaml: str, env: dict[str, str], expected: str, check: bool
) -> None:
    config = tmp_path / "config.yml"
    config.write_text(
        f"sockets:\n  - {{name: s, type: ROUTER, bind: ['tcp://127.0.0.1:{free_port()}']}}\n" + yaml
    )
    args = ["--config.check"] if check else [f"--web.listen-address=127.0.0.1:{free_port()}"]
    result = run_cli(config, {"OTEL_METRICS_EXPORTER": "otlp", **env}, *args)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zmq-exporter: "), lines
    assert expected in lines[0], lines
    assert "Traceback" not in result.stderr


def test_off_by_default_no_otlp_self_metrics() -> None:
    port = free_port()
    config = f"sockets:\n  - {{name: s, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
    with Daemon(config, env={"OTEL_METRICS_EXPORTER": "none"}) as d:
        samples = d.scrape()
    assert value(samples, "zmq_exporter_otlp_exports_total", result="failure") is None
    assert "OTLP" not in d.logs()


def translate(otel_name: str, unit: str, counter: bool) -> str:
    """The standard OTLP→Prometheus translation, written out here independently of the
    table: `.` → `_`, unit `s` → `_seconds`, `By` → `_bytes`, monotonic sums end in
    `_total` exactly once."""
    name = otel_name.replace(".", "_") + {"s": "_seconds", "By": "_bytes"}.get(unit, "")
    return name.removesuffix("_total") + "_total" if counter else name


def test_instrument_names_translate_to_distinct_contract_names() -> None:
    """Every pushed family's OTel name translates back to its /metrics name."""
    assert len({f.otel_name for f in PUSHED}) == len(PUSHED) > 20
    for f in PUSHED:
        assert f.otel_name is not None and f.type in ("counter", "gauge"), f
        assert translate(f.otel_name, f.otel_unit, f.type == "counter") == f.name, f
    table = {f.otel_name: f.name for f in PUSHED}
    assert table["zmq.accepted"] == "zmq_accepted_total"
    assert table["zmq.connections"] == "zmq_connections"
    assert table["zmq.reconnect_interval"] == "zmq_reconnect_interval_seconds"
    assert table["zmq.bind_succeeded"] == "zmq_bind_succeeded_total"  # the counter
    assert table["zmq.listening"] == "zmq_listening"  # the gauge


def test_example_yml_otlp_section_is_valid() -> None:
    """config/example.yml carries the `otlp:` section commented out; uncommented, it is a
    valid config that resolves as documented."""
    text = (ROOT / "config" / "example.yml").read_text()
    block = text[text.index("# otlp:") :].split("\n\n", 1)[0].splitlines()  # to its end
    yaml = "\n".join(line.removeprefix("# ") for line in block if line.startswith("# ")) + "\n"
    settings = parse_config(SOCKETS + yaml, "example.yml")
    s = resolve_otlp(settings.otlp, {})
    assert s is not None
    assert (s.protocol, s.endpoint) == ("http/protobuf", "http://otel-collector:4318/v1/metrics")
    assert s.headers == {"x-api-key": "change-me"}
    assert (s.interval, s.timeout) == (30.0, 10.0)
    assert s.resource["deployment.environment"] == "production"


def test_grpc_endpoint_without_scheme_and_insecure() -> None:
    """The specification: a gRPC endpoint may be `host:port`; there OTEL_EXPORTER_OTLP_INSECURE
    (signal-specific first) decides plaintext, false by default; a scheme always wins."""
    grpc = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    s = resolve(None, {**grpc, "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"})
    assert s is not None and (s.endpoint, s.plaintext) == ("collector:4317", False)
    s = resolve(
        None,
        {
            **grpc,
            "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
            "OTEL_EXPORTER_OTLP_INSECURE": "TRUE",
        },
    )
    assert s is not None and s.insecure is True
    s = resolve(
        None,
        {
            **grpc,
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "[::1]:4317",
            "OTEL_EXPORTER_OTLP_INSECURE": "false",
            "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
        },
    )
    assert s is not None and (s.endpoint, s.insecure) == ("[::1]:4317", True)
    for scheme, insecure in (("http", True), ("https", False)):
        s = resolve(
            None,
            {
                **grpc,
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"{scheme}://c:4317",
                "OTEL_EXPORTER_OTLP_INSECURE": str(not insecure).lower(),
            },
        )
        assert s is not None and s.plaintext is insecure, scheme
    s = resolve("  protocol: grpc\n  endpoint: c:4317\n  insecure: true\n", {})
    assert s is not None and (s.endpoint, s.insecure) == ("c:4317", True)
    warn: list[str] = []
    s = resolve(
        None,
        {**grpc, "OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "yes"},
        warn,
    )
    assert s is not None and s.insecure is False
    assert warn == [
        "environment variable OTEL_EXPORTER_OTLP_INSECURE='yes' is not true or false; read as false"
    ]


def test_compression_and_export_timeout() -> None:
    on = {"OTEL_METRICS_EXPORTER": "otlp"}
    s = resolve(None, on)
    assert s is not None and s.compression == "none"
    assert (s.timeout, s.export_timeout, s.export_deadline) == (10.0, 30.0, 10.0)
    s = resolve(None, {**on, "OTEL_EXPORTER_OTLP_COMPRESSION": " GZIP "})
    assert s is not None and s.compression == "gzip"
    s = resolve(
        None,
        {
            **on,
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "none",
        },
    )
    assert s is not None and s.compression == "none"  # signal-specific first
    s = resolve("  compression: gzip\n", {"OTEL_EXPORTER_OTLP_COMPRESSION": "none"})
    assert s is not None and s.compression == "gzip"  # the file wins
    s = resolve(None, {**on, "OTEL_METRIC_EXPORT_TIMEOUT": "300"})
    assert s is not None and (s.export_timeout, s.export_deadline) == (0.3, 0.3)
    s = resolve("  timeout: 2s\n", {"OTEL_METRIC_EXPORT_TIMEOUT": "5000"})
    assert s is not None and s.export_deadline == 2.0


def test_sdk_disabled_wins_with_a_warning() -> None:
    warn: list[str] = []
    assert resolve("  endpoint: http://c:4318\n", {"OTEL_SDK_DISABLED": "True"}, warn) is None
    assert warn == [
        "OTLP push is off: OTEL_SDK_DISABLED=true wins over the otlp: section of the config file"
    ]
    warn.clear()
    assert (
        resolve(None, {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, warn) is None
    )
    assert warn == ["OTLP push is off: OTEL_SDK_DISABLED=true wins over OTEL_METRICS_EXPORTER=otlp"]
    warn.clear()  # nothing asked for, nothing said
    assert resolve(None, {"OTEL_SDK_DISABLED": "true"}, warn) is None and warn == []
    assert resolve("  enabled: false\n", {"OTEL_SDK_DISABLED": "true"}, warn) is None and warn == []
    # Not a boolean: read as false (the SDK stays on), with a warning.
    s = resolve("  endpoint: http://c:4318\n", {"OTEL_SDK_DISABLED": "1"}, warn)
    assert s is not None
    assert warn == [
        "environment variable OTEL_SDK_DISABLED='1' is not true or false; read as false"
    ]


def test_sdk_disabled_with_a_config_section_says_so(tmp_path: Path) -> None:
    """A real process: --config.check and a start both print the warning; the daemon then
    has no OTLP output at all (no 'OTLP push started', no zmq_exporter_otlp_* series)."""
    config = tmp_path / "config.yml"
    config.write_text(SOCKETS.replace("5999", str(free_port())) + "otlp:\n  interval: 200ms\n")
    result = run_cli(config, {"OTEL_SDK_DISABLED": "true"}, "--config.check")
    assert result.returncode == 0, result
    assert "OTEL_SDK_DISABLED=true wins over the otlp: section" in result.stderr
    with Daemon(config.read_text(), env={"OTEL_SDK_DISABLED": "true"}) as d:
        samples = d.scrape()
    assert value(samples, "zmq_exporter_otlp_exports_total", result="failure") is None
    logs = d.logs()
    assert "OTEL_SDK_DISABLED=true wins over the otlp: section" in logs
    assert "OTLP push started" not in logs


def test_max_request_bytes() -> None:
    """The byte budget of one export request: 4,000,000 by default (under gRPC's default
    4 MiB receive limit, with a margin), the `otlp:` key when set; no variable sets it."""
    on = {"OTEL_METRICS_EXPORTER": "otlp"}
    s = resolve(None, on)
    assert s is not None and s.max_request_bytes == 4_000_000 < 4 * 1024 * 1024
    s = resolve(None, {**on, "OTEL_EXPORTER_OTLP_MAX_REQUEST_BYTES": "20000"})
    assert s is not None and s.max_request_bytes == 4_000_000
    s = resolve("  max_request_bytes: 16384\n", {})
    assert s is not None and s.max_request_bytes == 16384
    s = resolve("  max_request_bytes: 20000000\n", {})
    assert s is not None and s.max_request_bytes == 20_000_000
