"""A /probe target: `tcp://host:port` or `ipc://path`, checked before anything is opened."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.core.endpoints import parse_endpoint


@dataclass(frozen=True)
class Target:
    text: str
    transport: str  # "tcp" or "ipc"
    host: str = ""  # brackets removed: "::1", "example.com"
    port: int = 0
    path: str = ""  # ipc: the socket path ("@name": abstract namespace)


def parse_target(text: str) -> Target:
    """ValueError says what is wrong; the message is safe to send back to the client."""
    endpoint = parse_endpoint(text, "connect")
    if endpoint.transport == "ipc":
        return Target(text, "ipc", path=endpoint.address)
    if endpoint.transport != "tcp":
        # inproc:// would reach into the prober's own context, never a remote peer.
        raise ValueError(f"unsupported transport {endpoint.transport!r} (expected tcp or ipc)")
    if ";" in endpoint.address:
        raise ValueError("a source address (`source;destination`) is not supported")
    port = int(endpoint.port) if endpoint.port.isdigit() else 0
    if not 1 <= port <= 65535:
        raise ValueError(f"expected a port from 1 to 65535, got {endpoint.port!r}")
    host = endpoint.host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Target(text, "tcp", host=host, port=port)
