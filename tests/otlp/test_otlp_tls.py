"""OTLP over TLS with client certificates, both protocols, configured by the standard
variables (OTEL_EXPORTER_OTLP_CERTIFICATE, ..._CLIENT_KEY, ..._CLIENT_CERTIFICATE): the
receiver's certificate is checked against the given CA, the client presents its own, and a
receiver requiring one refuses an exporter without it. Certificates are generated per run
(tests/pki.py); receivers on loopback."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import Pki, make_pki

from exporter.config.otlp import OtlpSettings, resolve_otlp
from exporter.core.state import EngineSnapshot, ReaderStats
from exporter.monitor.sockets import build_labels
from exporter.otlp import transport as tx
from exporter.otlp.request import MetricsBuilder

from helpers import free_port


class TlsReceiver:
    """An OTLP receiver on 127.0.0.1 over TLS that requires a client certificate from
    the test CA; counts the requests that reached it."""

    def __init__(self, protocol: str, pki: Pki) -> None:
        self.protocol = protocol
        self.port = free_port()
        self.received = 0
        self._grpc: Any = None
        self._http: ThreadingHTTPServer | None = None
        if protocol == "grpc":

            def export(request: bytes, context: Any) -> bytes:
                self.received += 1
                return b""

            handler = grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.metrics.v1.MetricsService",
                {"Export": grpc.unary_unary_rpc_method_handler(export)},
            )
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            server.add_generic_rpc_handlers((handler,))
            credentials = grpc.ssl_server_credentials(
                [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
                root_certificates=pki.ca.read_bytes(),
                require_client_auth=True,
            )
            assert server.add_secure_port(f"127.0.0.1:{self.port}", credentials) == self.port
            server.start()
            self._grpc = server
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.verify_mode = ssl.CERT_REQUIRED

        class Server(ThreadingHTTPServer):
            def get_request(self) -> tuple[Any, Any]:
                conn, addr = super().get_request()
                return context.wrap_socket(conn, server_side=True), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a refused handshake

        self._http = Server(("127.0.0.1", self.port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        base = f"https://127.0.0.1:{self.port}"
        return base if self.protocol == "grpc" else base + "/v1/metrics"

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(5)
        if self._http is not None:
            with contextlib.suppress(OSError):
                self._http.shutdown()
                self._http.server_close()


def settings(rx: TlsReceiver, pki: Pki, client: bool) -> OtlpSettings:
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": rx.protocol,
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": rx.endpoint,
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
    }
    if client:
        env["OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY"] = str(pki.client_key)
        env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = str(pki.client_cert)
    resolved = resolve_otlp(None, env)
    assert resolved is not None and not resolved.plaintext
    return resolved


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_mutual_tls_from_the_standard_variables(protocol: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    rx = TlsReceiver(protocol, pki)
    payload = MetricsBuilder({}, build_labels()).encode(EngineSnapshot((), ReaderStats(), True))
    try:
        good = tx.make_transport(settings(rx, pki, client=True))
        try:
            result = tx.send(good, payload, lambda: time.monotonic() + 10)
        finally:
            good.close()
        assert result.ok and rx.received == 1, result
        # Without a client certificate the receiver refuses the handshake: not delivered.
        bare = tx.make_transport(settings(rx, pki, client=False))
        try:
            result = tx.send(bare, payload, lambda: time.monotonic() + 1.5)
        finally:
            bare.close()
        assert not result.ok and rx.received == 1, result
    finally:
        rx.stop()


def test_a_missing_certificate_file_stops_startup(tmp_path: Path) -> None:
    for protocol, endpoint in (
        ("grpc", "https://127.0.0.1:1"),
        ("http/protobuf", "https://127.0.0.1:1/v1/metrics"),
    ):
        s = OtlpSettings(protocol, endpoint, certificate=str(tmp_path / "missing.pem"))  # type: ignore[arg-type]
        with pytest.raises(OSError):
            tx.make_transport(s)
