"""How many series a config will export, estimated at load time for `limits.max_series`.

Label values come only from the config (socket name, configured endpoint, configured
labels) and from bounded decodings (event, handshake reason/error, errno name), so the
series of a socket follow from its endpoints. The figures mirror what
`exporter.render.prometheus` emits for a configured endpoint from the start, plus one
error series per endpoint for the failures that usually appear (bind_failed{errno},
handshake_failed{error}); tests/test_ops_limits.py compares the estimate with a scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from exporter.events import HANDSHAKE_REASONS
from exporter.state import BIND_COUNTERS, CONNECT_COUNTERS

# zmq_connections, zmq_last_event_timestamp_seconds, and zmq_listening (bind) or
# zmq_reconnect_interval_seconds (connect)
_GAUGES = 3
_ERROR_ROWS = 1
BIND_SERIES = len(BIND_COUNTERS) + len(HANDSHAKE_REASONS) + _GAUGES + _ERROR_ROWS
CONNECT_SERIES = len(CONNECT_COUNTERS) + len(HANDSHAKE_REASONS) + _GAUGES + _ERROR_ROWS
# zmq_socket_info, and the socket-wide row (zmq_monitor_stopped_total, zmq_closed_total of
# failed binds)
SOCKET_SERIES = 3
# Self-metrics, process and platform metrics: independent of the config.
FIXED_SERIES = 64


class _Spec(Protocol):
    @property
    def binds(self) -> tuple[str, ...]: ...

    @property
    def connects(self) -> tuple[str, ...]: ...


def socket_series(spec: _Spec) -> int:
    return SOCKET_SERIES + BIND_SERIES * len(spec.binds) + CONNECT_SERIES * len(spec.connects)


def estimate_series(specs: Iterable[_Spec]) -> int:
    return FIXED_SERIES + sum(socket_series(spec) for spec in specs)
