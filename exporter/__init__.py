"""zmq-exporter: ZeroMQ socket-monitor events as exact Prometheus/OpenTelemetry metrics.

`exporter.instrument(socket, name, ...)` and `exporter.connections_table(...)` (library
mode, exporter/library.py) are loaded on first use: importing `exporter` imports nothing
else and starts nothing.
"""

from __future__ import annotations

from exporter._version import __version__

# Not `typing.TYPE_CHECKING`: importing typing would be most of this module's import time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from exporter.instrument.hooks import instrument_sockets
    from exporter.library import (
        Instrumentation,
        InstrumentError,
        configure_connections,
        connections_table,
        instrument,
    )

__all__ = [
    "InstrumentError",
    "Instrumentation",
    "__version__",
    "configure_connections",
    "connections_table",
    "instrument",
    "instrument_sockets",
]
_LAZY = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    # PEP 562: library mode costs nothing until an application asks for it.
    if name == "instrument_sockets":
        from exporter.instrument import hooks

        return hooks.instrument_sockets
    if name in _LAZY:
        from exporter import library

        return getattr(library, name)
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")
