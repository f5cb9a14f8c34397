"""The `zmtp` prober: DNS (tcp:// only), raw connect, the peer's greeting, and a libzmq
handshake; each step in its own module, each timed. The first step that fails, in that
order, decides the reason. The handshake is started right after DNS and runs concurrently
with the raw connect and greeting (it is closed unused when they fail)."""

from __future__ import annotations

import socket

from exporter.config.modules import ProbeModule
from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult
from exporter.prober.connect import connect
from exporter.prober.dns import resolve
from exporter.prober.greeting import read_greeting
from exporter.prober.handshake import Handshake
from exporter.prober.target import parse_target


def probe_zmtp(target: str, module: ProbeModule, deadline: Deadline, log: ProbeLog) -> ProbeResult:
    result = ProbeResult()
    parsed = parse_target(target)  # the handler checked it: a ValueError here is a bug
    address: tuple[str, int] | str
    try:
        if parsed.transport == "ipc":
            family, address = int(socket.AF_UNIX), parsed.path
        else:
            family, ip = resolve(parsed, module, deadline, log, result)
            address = (ip, parsed.port)
        # The libzmq handshake runs on libzmq's I/O thread while this thread connects and
        # reads the greeting: a probe costs about one handshake, not two connections in a
        # row. Its outcome counts only once the earlier steps passed.
        pending = Handshake(family, address, module, deadline, log)
        try:
            raw = connect(family, address, deadline, log, result)
            try:
                read_greeting(raw, module, deadline, log, result)
            finally:
                raw.close()
            pending.wait(deadline, log, result)
        finally:
            pending.close()
    except ProbeFailed as failure:
        result.reason = failure.reason
        log.error("Probe step failed", reason=failure.reason, err=str(failure))
        return result
    result.success = True
    return result


PROBERS = {"zmtp": probe_zmtp}
