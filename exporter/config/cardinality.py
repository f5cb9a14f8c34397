"""How many series a config will export, estimated at load time for `limits.max_series`.

Label values come only from the config (socket name, configured endpoint, configured
labels) and from bounded decodings (event, handshake reason/error, errno name), so the
series of a socket follow from its endpoints. The figures come from the metrics table
(`exporter.metrics`): the series each configured endpoint and socket has from start, plus
the series that usually appear later; tests/test_ops_limits.py compares the estimate with
a scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from exporter import metrics

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
FIXED_SERIES = sum(f.series for f in metrics.FAMILIES if f.group != "socket") + PLATFORM_SERIES


class _Spec(Protocol):
    @property
    def binds(self) -> tuple[str, ...]: ...

    @property
    def connects(self) -> tuple[str, ...]: ...


def socket_series(spec: _Spec) -> int:
    return SOCKET_SERIES + BIND_SERIES * len(spec.binds) + CONNECT_SERIES * len(spec.connects)


def estimate_series(specs: Iterable[_Spec]) -> int:
    return FIXED_SERIES + sum(socket_series(spec) for spec in specs)
