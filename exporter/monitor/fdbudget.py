"""File descriptor budget: refuse a config that cannot fit RLIMIT_NOFILE before it runs.

Out of descriptors, libzmq aborts the whole process (`Too many open files
(src/ip_resolver.cpp:542)`) and the web server cannot accept a health probe, so a start or
reload is checked first. Measured with pyzmq 27.3 / libzmq 4.3.5: a monitored socket costs
3 descriptors (its mailbox, the monitor PAIR's mailbox, the monitor pipe's), each bind one
listener and each connect one connection. Peers accepted on a bind take one each at run
time; they and the web server's connections come out of the reserve.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterable

from exporter.config import SocketSpec
from exporter.monitor.contexts import context_fds

FDS_PER_SOCKET = 3
# Descriptors a process has before any socket: interpreter, logs, the engine's epoll and
# eventfd, the zmq context (measured: ~20), and the 16 the engine holds in reserve for the
# web server while peers exhaust the rest (exporter/monitor/engine.py, SPARE_FDS); rounded up.
BASE_FDS = 48
# Kept free beyond the web server's own connection cap: accepted peers, key and config
# files read at reload, OTLP exporter connections.
MISC_RESERVE = 64
# The least kept free whatever the limit: a few web connections and the files a reload reads.
MIN_RESERVE = 32


def socket_fds(spec: SocketSpec) -> int:
    return FDS_PER_SOCKET + len(spec.binds) + len(spec.connects)


def specs_fds(specs: Iterable[SocketSpec]) -> int:
    """Descriptors that opening `specs` takes: their sockets', and the own contexts of
    sockets that connect to host names (exporter/monitor/contexts.py)."""
    specs = list(specs)
    return sum(map(socket_fds, specs)) + context_fds(specs)


def nofile_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_nofile_limit() -> None:
    """Soft limit up to the hard limit, as Go's runtime does for every Prometheus
    exporter: the soft limit (often 1024) exists for select(), which we do not use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        # A hard limit above the kernel's nr_open is refused: keep the soft one then.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir opened
    except OSError:
        return BASE_FDS


def fd_budget_problem(
    in_use: int, adding: int, reserve: int, limit: int | None = None
) -> str | None:
    """Why `adding` more descriptors on top of `in_use` do not fit the limit with
    `reserve` kept free, or None if they do. A change that adds nothing always fits (a
    reload must not be refused for what is running already), and under a small limit the
    reserve shrinks to a quarter of it: the web server then evicts idle connections
    sooner (it does on EMFILE too) rather than refusing every config."""
    if adding <= 0:
        return None
    limit = nofile_limit() if limit is None else limit
    reserve = min(reserve, max(MIN_RESERVE, limit // 4))
    need = in_use + adding + reserve
    if need <= limit:
        return None
    return (
        f"not enough file descriptors: the sockets need about {adding} more on top of "
        f"{in_use} in use, with {reserve} kept free for HTTP and peers, {need} in all; "
        f"RLIMIT_NOFILE is {limit} (raise it with `ulimit -n` or the container's nofile "
        "limit, or configure fewer sockets)"
    )


def startup_fd_problem(specs: Iterable[SocketSpec], reserve: int) -> str | None:
    """The check done by --config.check and at start, before anything is open."""
    return fd_budget_problem(BASE_FDS, specs_fds(specs), reserve)
