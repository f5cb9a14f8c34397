"""Sending serialized OTLP export requests, as the OTLP specification says an exporter does
(https://opentelemetry.io/docs/specs/otlp/): over gRPC through grpcio's public generic
unary call (the request is already bytes, so no serializer), over HTTP/protobuf through
urllib3; each with TLS and client certificates, headers, gzip compression and a timeout
per attempt. `send` retries what the specification calls retryable, with capped
exponential backoff and jitter, or after the receiver's own hint (HTTP `Retry-After`, gRPC
`google.rpc.RetryInfo`), within the deadline it is given; a partial success is reported
with its rejected points.

Why urllib3 for HTTP: a connection pool with keep-alive, TLS with client certificates
through an `ssl.SSLContext`, and total timeouts per request, in one small package without
dependencies of its own (httpx would bring httpcore, h11, anyio, idna, sniffio), maintained
as the transport of requests and pip. Its own retries and redirects are turned off: the
specification's rules are applied here.
"""

from __future__ import annotations

import email.utils
import gzip
import os
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from exporter._version import __version__
from exporter.config.otlp import OtlpSettings

GRPC_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
USER_AGENT = f"zmq-exporter/{__version__}"

# HTTP statuses the specification says to retry ("Retryable Response Codes").
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})
# gRPC codes the specification says to retry; RESOURCE_EXHAUSTED only with a RetryInfo
# (the server says it will recover), by name as grpc.StatusCode spells them.
GRPC_RETRYABLE = frozenset(
    {"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"}
)
GRPC_RETRYABLE_WITH_HINT = frozenset({"RESOURCE_EXHAUSTED"})

# Backoff between attempts without a hint from the receiver: 1 s, doubled each time, capped
# at 32 s, each delay drawn between half and all of it (jitter, so that exporters failed
# by one outage do not come back in step). The deadline bounds the whole.
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 32.0
# Attempts per request at most: bounds a receiver that asks for a retry at once, forever.
MAX_ATTEMPTS = 64


@dataclass(frozen=True)
class Answer:
    """What one attempt got."""

    ok: bool
    retryable: bool = False
    reason: str = ""  # why it failed, for the log
    retry_after: float | None = None  # the receiver's hint, seconds
    rejected: int = 0  # partial success: data points the receiver rejected
    message: str = ""  # partial success: the receiver's message


@dataclass(frozen=True)
class Result:
    """One request, after its retries."""

    ok: bool
    reason: str = ""
    attempts: int = 0
    rejected: int = 0
    message: str = ""


class Transport(Protocol):
    def attempt(self, payload: bytes, timeout: float) -> Answer: ...

    def close(self) -> None: ...


def backoff(retry: int, rng: random.Random) -> float:
    """Seconds to wait before retry number `retry` (0 for the first) without a hint."""
    base = min(MAX_BACKOFF, INITIAL_BACKOFF * 2**retry)
    return float(base * (0.5 + 0.5 * rng.random()))


def send(
    transport: Transport,
    payload: bytes,
    deadline: Callable[[], float],
    interrupt: threading.Event | None = None,
    rng: random.Random | None = None,
) -> Result:
    """Send one request, retrying while the answer is retryable and `deadline()` (a
    `time.monotonic` value, read before each attempt: it may move closer) leaves time for
    the wait. Each attempt's timeout is the time left. `interrupt` set during a wait ends
    the request there (the daemon stopping: its final export follows)."""
    rng = rng or random.Random()
    reason = ""
    for attempt in range(MAX_ATTEMPTS):
        left = deadline() - time.monotonic()
        if left <= 0:
            return Result(False, reason or "deadline passed before the request", attempt)
        answer = transport.attempt(payload, left)
        if answer.ok:
            return Result(True, "", attempt + 1, answer.rejected, answer.message)
        reason = answer.reason
        if not answer.retryable:
            return Result(False, reason, attempt + 1)
        delay = answer.retry_after if answer.retry_after is not None else backoff(attempt, rng)
        if time.monotonic() + delay >= deadline():
            return Result(False, f"{reason}; no time left to retry in {delay:.3g} s", attempt + 1)
        waiter = interrupt or threading.Event()
        if waiter.wait(delay):
            return Result(False, f"{reason}; stopped before retrying", attempt + 1)
    return Result(False, f"{reason}; gave up after {MAX_ATTEMPTS} attempts", MAX_ATTEMPTS)


def _partial(body: bytes) -> Answer:
    """A success, with the partial-success fields of its response if any."""
    try:
        response = ExportMetricsServiceResponse.FromString(body)
    except DecodeError:
        return Answer(True, message="unreadable response body")
    partial = response.partial_success
    return Answer(True, rejected=partial.rejected_data_points, message=partial.error_message)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()


def make_transport(settings: OtlpSettings) -> Transport:
    """The transport for the protocol; reads the certificate files now (a missing or bad
    one raises here, at startup)."""
    if settings.protocol == "grpc":
        return GrpcTransport(settings)
    return HttpTransport(settings)


# ---------------------------------------------------------------------------------------
# gRPC


def _retry_info(metadata: Any) -> float | None:
    """The `google.rpc.RetryInfo` delay in a failed call's `grpc-status-details-bin`
    trailer (a `google.rpc.Status`), in seconds; None without one."""
    for key, value in metadata or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay = info.retry_delay
                return max(0.0, float(delay.seconds + delay.nanos / 1e9))
    return None


class GrpcTransport:
    def __init__(self, settings: OtlpSettings) -> None:
        # grpc core prints its own INFO lines (a GOAWAY from a restarting collector) to
        # stderr unless told otherwise; it reads this when first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        import grpc

        self._grpc = grpc
        endpoint = settings.endpoint
        target = urlsplit(endpoint).netloc if "://" in endpoint else endpoint
        options = [
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.enable_retries", 0),  # retries are ours, by the specification's rules
            ("grpc.max_send_message_length", -1),  # max_request_bytes bounds requests
        ]
        compression = (
            grpc.Compression.Gzip
            if settings.compression == "gzip"
            else grpc.Compression.NoCompression
        )
        if settings.plaintext:
            self._channel = grpc.insecure_channel(target, options, compression)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.certificate),
                private_key=_read(settings.client_key),
                certificate_chain=_read(settings.client_certificate),
            )
            self._channel = grpc.secure_channel(target, credentials, options, compression)
        # A generic unary call: bytes in (the request is serialized), bytes out.
        self._export = self._channel.unary_unary(GRPC_METHOD)
        self._metadata = tuple(settings.headers.items())  # lowercase (resolve_otlp)

    def attempt(self, payload: bytes, timeout: float) -> Answer:
        grpc = self._grpc
        try:
            response, _ = self._export.with_call(payload, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:  # also a grpc.Call: code, details, trailers
            code = err.code()
            name = code.name if code is not None else "UNKNOWN"
            hint = _retry_info(err.trailing_metadata())
            retryable = name in GRPC_RETRYABLE or (
                name in GRPC_RETRYABLE_WITH_HINT and hint is not None
            )
            return Answer(False, retryable, f"gRPC {name}: {err.details()}", hint)
        except ValueError as err:  # the channel was closed (shutdown)
            return Answer(False, False, f"gRPC: {err}")
        return _partial(response)

    def close(self) -> None:
        self._channel.close()  # also cancels a call in flight


# ---------------------------------------------------------------------------------------
# HTTP/protobuf


def _retry_after(value: str | None) -> float | None:
    """`Retry-After`: seconds, or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_message(body: bytes) -> str:
    """The message of an error response: a `google.rpc.Status` (the specification's), or
    the start of the body as text."""
    try:
        status = status_pb2.Status.FromString(body)
        if status.message:
            return str(status.message)
    except DecodeError:
        pass
    return body[:200].decode("utf-8", "replace").strip()


class HttpTransport:
    def __init__(self, settings: OtlpSettings) -> None:
        import urllib3

        self._urllib3 = urllib3
        self._url = settings.endpoint
        self._gzip = settings.compression == "gzip"
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": USER_AGENT,
            **settings.headers,
        }
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        context = None
        if self._url.startswith("https://"):
            context = ssl.create_default_context(cafile=settings.certificate or None)
            if settings.client_certificate:
                context.load_cert_chain(settings.client_certificate, settings.client_key or None)
        self._pool = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False, ssl_context=context)

    def attempt(self, payload: bytes, timeout: float) -> Answer:
        urllib3 = self._urllib3
        body = gzip.compress(payload, compresslevel=6) if self._gzip else payload
        try:
            response = self._pool.request(
                "POST",
                self._url,
                body=body,
                headers=self._headers,
                timeout=urllib3.Timeout(total=timeout),
                retries=False,
                redirect=False,
            )
            data = response.data
        except urllib3.exceptions.HTTPError as err:  # refused, reset, timed out, TLS
            return Answer(False, True, f"HTTP: {err}")
        status = response.status
        if 200 <= status < 300:
            return _partial(data)
        return Answer(
            False,
            status in HTTP_RETRYABLE,
            f"HTTP {status}: {_status_message(data)}",
            _retry_after(response.headers.get("Retry-After")) if status in HTTP_RETRYABLE else None,
        )

    def close(self) -> None:
        self._pool.clear()
