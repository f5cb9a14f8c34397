"""The `zmtp` prober: DNS (tcp:// only), raw connect, the peer's greeting, then a libzmq
handshake; each step in its own module, each timed. The first step that fails decides the
reason, and the later steps do not run."""

from __future__ import annotations

import socket

from exporter.config.modules import ProbeModule
from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult
from exporter.prober.connect import connect
from exporter.prober.dns import resolve
from exporter.prober.greeting import read_greeting
from exporter.prober.handshake import handshake
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
        raw = connect(family, address, deadline, log, result)
        try:
            read_greeting(raw, module, deadline, log, result)
        finally:
            raw.close()
        handshake(family, address, module, deadline, log, result)
    except ProbeFailed as failure:
        result.reason = failure.reason
        log.error("Probe step failed", reason=failure.reason, err=str(failure))
        return result
    result.success = True
    return result


PROBERS = {"zmtp": probe_zmtp}
