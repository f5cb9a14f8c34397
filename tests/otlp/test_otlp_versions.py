"""The OpenTelemetry ranges of pyproject.toml, tested at both ends in isolated venvs.

Library mode: an application that pins OpenTelemetry (the oldest supported, 1.12.0, the
first stable metrics API; and the newest on the index) installs zmq-exporter after it. pip
must keep the application's versions (no upgrade, no conflict, `pip check` clean), the
OTLP push's packages (the `otlp` extra: grpcio, urllib3, opentelemetry-proto) must not come
along, and library mode must report through the application's own MeterProvider.

The daemon's OTLP push (the `otlp` extra): with opentelemetry-proto at the oldest supported
(1.20.0) and the newest, a request is built, sent over HTTP to a receiver in the same
process, and its response's partial success read; a gRPC RetryInfo is parsed.

Kept fast: the project's wheel is built once; venvs are made without pip and the test
run's pip installs into them (`pip --python`), from its cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT

# Installs from the package index (~30 s): CI runs it, the quick lane does not.
pytestmark = pytest.mark.slow

OLDEST_API = "1.12.0"  # pyproject.toml: opentelemetry-api>=1.12
OLDEST_PROTO = "1.20.0"  # pyproject.toml: the otlp extra's opentelemetry-proto>=1.20

LIBRARY_CHECK = textwrap.dedent(
    """
    import importlib.metadata as md, importlib.util, json, time
    import zmq
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    import exporter

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(router, "app", registry=None, meter_provider=provider)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    accepted = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not accepted:
        data = reader.get_metrics_data()
        for rm in (data.resource_metrics if data else ()):
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "zmq.accepted":
                        accepted = sum(
                            p.value for p in m.data.data_points
                            if p.attributes.get("socket") == "app"
                        )
        time.sleep(0.05)
    handle.close()
    dealer.close()
    router.close()
    ctx.term()
    provider.shutdown()
    print(json.dumps({
        "accepted": accepted,
        "api": md.version("opentelemetry-api"),
        "sdk": md.version("opentelemetry-sdk"),
        "extra_absent": all(
            importlib.util.find_spec(m) is None for m in ("grpc", "urllib3")
        ),
    }))
    """
)

DAEMON_CHECK = textwrap.dedent(
    """
    import importlib.metadata as md, json, threading, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as pb
    from exporter.config.otlp import OtlpSettings
    from exporter.core.state import EngineSnapshot, ReaderStats
    from exporter.monitor.sockets import build_labels
    from exporter.otlp import transport
    from exporter.otlp.request import MetricsBuilder, count_points

    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            reply = pb.ExportMetricsServiceResponse()
            reply.partial_success.rejected_data_points = 2
            data = reply.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1/metrics"
    builder = MetricsBuilder({"service.name": "v"}, build_labels())
    payload = builder.encode(EngineSnapshot((), ReaderStats(), True))
    sender = transport.make_transport(OtlpSettings("http/protobuf", url))
    result = transport.send(sender, payload, lambda: time.monotonic() + 20)
    sender.close()
    server.shutdown()
    request = pb.ExportMetricsServiceRequest.FromString(bodies[0])
    status = status_pb2.Status(code=14)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000)))
    status.details.append(detail)
    hint = transport._retry_info([("grpc-status-details-bin", status.SerializeToString())])
    print(json.dumps({
        "ok": result.ok,
        "rejected": result.rejected,
        "points": count_points(request),
        "hint": hint,
        "proto": md.version("opentelemetry-proto"),
    }))
    """
)


def run(*cmd: str | Path, timeout: float = 600) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd="/",  # not the checkout: the venv must import the installed wheel
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT)
    (built,) = out.glob("zmq_exporter-*.whl")
    return built


def venv(path: Path) -> Path:
    """A venv without pip (faster); the test run's pip installs into it."""
    run(sys.executable, "-m", "venv", "--without-pip", path)
    return path / "bin" / "python"


def pip(python: Path, *args: str | Path) -> str:
    return run(sys.executable, "-m", "pip", "--python", python, *args)


def versions(python: Path) -> dict[str, str]:
    listed = json.loads(pip(python, "list", "--format=json"))
    return {p["name"].lower(): p["version"] for p in listed}


@pytest.mark.parametrize("pin", [OLDEST_API, "newest"])
def test_library_mode_keeps_the_applications_opentelemetry(
    pin: str, wheel: Path, tmp_path: Path
) -> None:
    python = venv(tmp_path / "app")
    # The application: OpenTelemetry API and SDK, pinned (or the newest the index has).
    wanted = ["opentelemetry-api", "opentelemetry-sdk"]
    # OpenTelemetry 1.12 imports pkg_resources without declaring setuptools (a venv made
    # with pip has it; this one is made without), which later setuptools dropped.
    more = ["setuptools<81"] if pin == OLDEST_API else []
    pip(python, "install", "-q", *(f"{w}=={pin}" if pin != "newest" else w for w in wanted), *more)
    before = versions(python)
    if pin != "newest":
        assert before["opentelemetry-api"] == before["opentelemetry-sdk"] == pin
    # Then zmq-exporter, as an application adds it: dependencies resolved by pip.
    pip(python, "install", "-q", wheel)
    after = versions(python)
    for name in wanted:
        assert after[name] == before[name], (name, before[name], after[name])
    pip(python, "check")
    doc = json.loads(run(python, "-c", LIBRARY_CHECK))
    assert doc["accepted"] >= 1, doc  # reported through the application's MeterProvider
    assert (doc["api"], doc["sdk"]) == (before["opentelemetry-api"], before["opentelemetry-sdk"])
    assert doc["extra_absent"], doc  # the OTLP push's packages stayed out
    print(f"\napplication on OpenTelemetry {doc['api']}: kept; zmq.accepted {doc['accepted']}")


@pytest.mark.parametrize("pin", [OLDEST_PROTO, "newest"])
def test_otlp_extra_at_both_ends(pin: str, wheel: Path, tmp_path: Path) -> None:
    python = venv(tmp_path / "daemon")
    proto = [f"opentelemetry-proto=={pin}"] if pin != "newest" else []
    pip(python, "install", "-q", f"{wheel}[otlp]", *proto)
    pip(python, "check")
    doc = json.loads(run(python, "-c", DAEMON_CHECK))
    assert doc["ok"] and doc["rejected"] == 2 and doc["points"] > 0, doc
    assert doc["hint"] == 0.25, doc
    if pin != "newest":
        assert doc["proto"] == pin, doc
    print(f"\nopentelemetry-proto {doc['proto']}: {doc['points']} points sent")
