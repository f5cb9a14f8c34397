"""How many series a config will export, estimated at load time for `limits.max_series`.

Label values come only from the config (socket name, configured endpoint, configured
labels) and from bounded decodings (event, handshake reason/error, errno name), so the
series of a socket follow from its endpoints. The figures come from the metrics table
(`exporter.core.metrics`): the series each configured endpoint and socket has from start, plus
the series that usually appear later; tests/daemon/test_ops_limits.py compares the estimate with
a scrape.

The connection families (`connections.metrics`) are counted as an upper bound:
all six per tcp endpoint, four per ipc endpoint (the RTT families exist only while the
endpoint has a tcp connection), times `max_peers_per_endpoint + 1` per-peer (`other`), none
with the metrics off. The sampler's self-metrics are in the fixed part.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from exporter.core import metrics

# Series that exist only after an event but usually appear: per endpoint, one error series
# (bind_failed{errno} or handshake_failed{error}); per socket, the socket-wide series
# (endpoint "") of monitor_stopped (the socket closed) and closed (failed binds).
_LATER_PER_ENDPOINT = 1
_LATER_PER_SOCKET = len((metrics.MONITOR_STOPPED, metrics.CLOSED))
BIND_SERIES = metrics.initial_series("bind") + _LATER_PER_ENDPOINT
CONNECT_SERIES = metrics.initial_series("connect") + _LATER_PER_ENDPOINT
SOCKET_SERIES = metrics.initial_series(None) + _LATER_PER_SOCKET
# prometheus_client's process_* (6 on Linux) and python_info.
PLATFORM_SERIES = 7
# Independent of the sockets: the exporter's own series (the OTLP push's included, as if it
# were on), and the platform's.
FIXED_SERIES = (
    sum(f.series for f in metrics.DAEMON_FAMILIES if f.group not in ("socket", "connection"))
    + PLATFORM_SERIES
)
TCP_CONNECTION_SERIES = len(metrics.CONNECTION_FAMILIES)
IPC_CONNECTION_SERIES = len(metrics.CONNECTION_FAMILIES_ALWAYS)


class _Spec(Protocol):
    @property
    def binds(self) -> tuple[str, ...]: ...

    @property
    def connects(self) -> tuple[str, ...]: ...


class _Connections(Protocol):
    @property
    def metrics(self) -> bool: ...

    @property
    def per_peer(self) -> bool: ...

    @property
    def max_peers_per_endpoint(self) -> int: ...


def socket_series(spec: _Spec) -> int:
    return SOCKET_SERIES + BIND_SERIES * len(spec.binds) + CONNECT_SERIES * len(spec.connects)


def connection_series(spec: _Spec, connections: _Connections | None) -> int:
    """Upper bound of the socket's connection family series (None: the defaults, on)."""
    if connections is not None and not connections.metrics:
        return 0
    per_endpoint = 0
    for endpoint in (*spec.binds, *spec.connects):
        if endpoint.startswith("tcp://"):
            per_endpoint += TCP_CONNECTION_SERIES
        elif endpoint.startswith("ipc://"):
            per_endpoint += IPC_CONNECTION_SERIES
    if connections is not None and connections.per_peer:
        return per_endpoint * (connections.max_peers_per_endpoint + 1)
    return per_endpoint


def estimate_series(specs: Iterable[_Spec], connections: _Connections | None = None) -> int:
    """`connections`: the `connections:` section (None: its defaults)."""
    return FIXED_SERIES + sum(
        socket_series(spec) + connection_series(spec, connections) for spec in specs
    )
