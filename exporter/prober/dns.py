"""Step 1 (tcp:// only): resolve the host, timed, within the deadline, honouring the
module's `ip_protocol` preference and fallback as blackbox_exporter's `chooseProtocol`."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import time

from exporter.config.modules import ProbeModule
from exporter.prober.base import Deadline, ProbeFailed, ProbeLog, ProbeResult
from exporter.prober.target import Target

# getaddrinfo cannot be cancelled: it runs on these threads and the probe stops waiting at
# its deadline. A lookup that hangs holds one thread until the resolver gives up (glibc:
# timeout x attempts); when all are held, later lookups wait in the queue and time out as
# `dns` too, instead of each taking a thread of its own.
LOOKUP_THREADS = 8
_lookups = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS, "zmq-exporter-dns")

_FAMILIES = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}


def resolve(
    target: Target, module: ProbeModule, deadline: Deadline, log: ProbeLog, result: ProbeResult
) -> tuple[int, str]:
    """(address family, IP address) to connect to; ProbeFailed("dns") otherwise."""
    preferred = _FAMILIES[module.ip_protocol]
    family = socket.AF_UNSPEC if module.ip_protocol_fallback else preferred
    log.debug(
        "Resolving target address",
        host=target.host,
        ip_protocol=module.ip_protocol,
        fallback=module.ip_protocol_fallback,
    )
    started = time.monotonic()
    try:
        infos = _lookup(target.host, family, deadline)
    finally:
        result.dns_seconds = time.monotonic() - started
    if not infos:
        raise ProbeFailed("dns", f"no {module.ip_protocol} address for {target.host}")
    # The preferred family first. The address chosen is the one connected to, and it must
    # pass the module's allowed_targets itself: a name that matched a name pattern cannot
    # lead past the fence by what it resolves to (DNS rebinding included).
    ordered = [i for i in infos if i[0] == preferred] + [i for i in infos if i[0] != preferred]
    choices = [i for i in ordered if module.allows_address(i[1][0], target.port)]
    if not choices:
        shown = ", ".join(sorted({i[1][0] for i in ordered}))
        raise ProbeFailed(
            "dns", f"{target.host} resolved to {shown}: not allowed by the module's allowed_targets"
        )
    chosen_family, address = choices[0][0], choices[0][1][0]
    log.debug(
        "Resolved target address", host=target.host, ip=address, seconds=f"{result.dns_seconds:.6f}"
    )
    return chosen_family, address


def _lookup(host: str, family: int, deadline: Deadline) -> list[tuple[int, tuple[str, int]]]:
    # RFC 6761 6.4: ".invalid" names never resolve, and applications may say so without
    # asking a resolver (which may be slow or unreachable).
    if host.rstrip(".").lower().endswith(".invalid") or host.lower() == "invalid":
        raise ProbeFailed("dns", f"{host}: a .invalid name never resolves (RFC 6761)")
    try:  # an address literal needs no resolver, nor a thread hand-off (~0.1 ms)
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        kind = socket.AF_INET if literal.version == 4 else socket.AF_INET6
        return [(kind, (str(literal), 0))] if family in (socket.AF_UNSPEC, kind) else []
    future = _lookups.submit(socket.getaddrinfo, host, None, family, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=deadline.remaining())
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise ProbeFailed("dns", f"{host}: no answer before the deadline") from None
    except (socket.gaierror, UnicodeError, OSError) as err:
        raise ProbeFailed("dns", f"{host}: {err}") from None
    return [(int(i[0]), (str(i[4][0]), 0)) for i in infos if i[0] in _FAMILIES.values()]
