"""The `zmtp` prober: DNS (tcp:// only), raw connect, the peer's greeting, and the ZMTP
handshake; each step in its own module, each timed. The first step that fails, in that
order, decides the reason.

NULL and PLAIN modules finish the handshake themselves on the raw connection that carried
the greeting (`wire`): one connection per probe. CURVE modules (no crypto library here)
use a real libzmq socket (`handshake`), which needs a second connection: it is started
right after DNS and runs concurrently with the raw connect and greeting (it is closed
unused when they fail).

A peer whose greeting is ZMTP/2.0 (libzmq 3.x) has no security handshake, only NULL (a
module with another mechanism fails as `mechanism_mismatch` on its greeting): its greeting
is the whole handshake. libzmq 4.3.5 cannot time one for us: it reports
HANDSHAKE_SUCCEEDED only from `mechanism_ready`, which a ZMTP < 3 connection never reaches,
so a libzmq socket's handshake with such a peer always ran into the deadline."""

from __future__ import annotations

import os
import socket
import time

from exporter.config.fence import normal_ipc_path
from exporter.config.modules import ProbeModule
from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult
from exporter.prober.connect import connect
from exporter.prober.dns import resolve
from exporter.prober.greeting import read_greeting
from exporter.prober.handshake import Handshake
from exporter.prober.target import parse_target
from exporter.prober.wire import OWN_MECHANISMS, handshake_over


def probe_zmtp(target: str, module: ProbeModule, deadline: Deadline, log: ProbeLog) -> ProbeResult:
    result = ProbeResult()
    parsed = parse_target(target)  # the handler checked it: a ValueError here is a bug
    address: tuple[str, int] | str
    own = module.mechanism in OWN_MECHANISMS
    try:
        if parsed.transport == "ipc":
            family, address = int(socket.AF_UNIX), ipc_path(parsed.path, module, log)
        else:
            family, ip = resolve(parsed, module, deadline, log, result)
            address = (ip, parsed.port)
        # CURVE: the libzmq handshake runs on libzmq's I/O thread while this thread
        # connects and reads the greeting; its outcome counts only once those passed.
        pending = None if own else Handshake(family, address, module, deadline, log)
        try:
            raw = connect(family, address, deadline, log, result)
            connected_at = time.monotonic()
            try:
                greeting = read_greeting(raw, module, deadline, log, result)
                if int(greeting.version.split(".")[0]) < 3:
                    result.handshake_seconds = time.monotonic() - connected_at
                    log.debug(
                        "ZMTP < 3: no security handshake; the greeting completes it",
                        seconds=f"{result.handshake_seconds:.6f}",
                    )
                elif own:
                    handshake_over(raw, module, connected_at, deadline, log, result)
            finally:
                raw.close()
            if pending is not None:
                pending.wait(deadline, log, result)
        finally:
            if pending is not None:
                pending.close()
    except ProbeFailed as failure:
        result.reason = failure.reason
        log.error("Probe step failed", reason=failure.reason, err=str(failure))
        return result
    result.success = True
    return result


def ipc_path(path: str, module: ProbeModule, log: ProbeLog) -> str:
    """The path to connect to. A module with `allowed_targets` has already matched the
    normalised path (no `..`) without touching the filesystem; here, with the target
    allowed, symbolic links are followed (os.path.realpath) and the path they lead to must
    pass the fence too, and is the one connected to. What remains unchecked: a link or
    directory swapped between this check and connect() by someone who can write to an
    allowed directory (allowed directories must be writable by trusted users only)."""
    normal = normal_ipc_path(path)
    if module.fence is None or normal is None or normal.startswith("@"):
        return path if normal is None else normal
    real = os.path.realpath(normal)
    if real != os.path.abspath(normal):
        if not module.allows_path(real):
            # The link's destination is not shown: it lies outside the fence.
            raise ProbeFailed(
                "connect_refused",
                "the path leads through a symbolic link outside the module's allowed_targets",
            )
        log.debug("Followed symbolic links", path=real)
        return real
    return normal


PROBERS = {"zmtp": probe_zmtp}
