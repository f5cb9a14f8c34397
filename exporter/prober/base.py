"""What every probe step shares: the deadline, the step-by-step log, the result, the
failure reasons and the one-line function type of a prober (as blackbox_exporter's
`ProbeFn`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from exporter.config.modules import ProbeModule
from exporter.core import metrics

# `probe_zmtp_failure_info{reason}`: the closed set, defined in the metrics table. The
# first eight are the issue's; `handshake_timeout` is libzmq's own handshake error
# (stream_engine_base_t::timer_event: the handshake_ivl timer fires, error(timeout_error)):
# the greeting came, the security handshake did not finish in time.
REASONS = metrics.PROBE_FAILURE_INFO.values

log = logging.getLogger("zmq_exporter.probe")


class Deadline:
    """A point in monotonic time every step of one probe shares."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at


class ProbeLog:
    """The probe's log, kept for `debug=true` (logfmt lines) and passed to the logger at
    debug level (a probe is a scrape: failing targets must not flood the daemon's log).
    Entries are formatted only when asked for: formatting every line of every probe cost
    more than a third of a probe's time."""

    def __init__(self, module: str, target: str) -> None:
        self.entries: list[tuple[float, str, str, dict[str, object]]] = []
        self._start = time.monotonic()
        self._context = {"module": module, "target": target}

    def debug(self, msg: str, **kv: object) -> None:
        self._add("debug", msg, kv)

    def error(self, msg: str, **kv: object) -> None:
        self._add("error", msg, kv)

    def _add(self, level: str, msg: str, kv: dict[str, object]) -> None:
        self.entries.append((time.monotonic() - self._start, level, msg, kv))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(msg, extra={**self._context, **kv})

    def text(self) -> str:
        lines = []
        for elapsed, level, msg, kv in self.entries:
            fields = {"t": f"{elapsed * 1000:.3f}ms", "level": level, "msg": msg, **kv}
            lines.append(" ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()) + "\n")
        return "".join(lines)


def _logfmt(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass
class Greeting:
    """The peer's ZMTP greeting (RFC 23/ZMTP: signature, version, mechanism, as-server)."""

    version: str  # "3.1"
    mechanism: str  # "NULL", "CURVE", ... as sent, NULs stripped
    as_server: bool


@dataclass
class ProbeResult:
    success: bool = False
    reason: str | None = None  # one of REASONS when not successful
    dns_seconds: float | None = None  # None: the step did not run (ipc://)
    connect_seconds: float | None = None
    handshake_seconds: float | None = None
    greeting: Greeting | None = None


class ProbeFailed(Exception):
    """A step failed: `reason` is one of REASONS, the message goes to the probe's log."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


# A prober: target, module, deadline, log -> result. Never raises for a failing target.
ProbeFn = Callable[[str, ProbeModule, Deadline, ProbeLog], ProbeResult]
