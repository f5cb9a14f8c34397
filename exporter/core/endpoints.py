"""Endpoint syntax, and mapping monitor event endpoints back to configured ones.

libzmq does not report endpoints as configured: a bind reports the resolved address
(`tcp://*:5555` -> `tcp://0.0.0.0:5555`, `tcp://127.0.0.1:*` -> the chosen port),
BIND_FAILED drops the scheme (`127.0.0.1:5555`), and connect-side strings drift between
`localhost` and `127.0.0.1` (libzmq #4056). Label values must be the configured strings,
so `EndpointMap` translates. It is pure data: the I/O layer feeds it resolved addresses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["bind", "connect"]
TRANSPORTS = ("tcp", "ipc", "inproc")

# Endpoint label value of events that belong to no configured endpoint (for example
# MONITOR_STOPPED, which names none). Bounded by construction.
SOCKET_WIDE = ""
UNMAPPED = "unmapped"

_IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
# One DNS label or interface name: ASCII letters, digits, '_' and '-', not at the ends.
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?")
_DOTTED = re.compile(r"[0-9.]+")  # all digits and dots: must be an IPv4 address
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII only: str.isdigit() accepts any script's digits


def shown(value: str, limit: int = 80) -> str:
    """`repr(value)` cut to a readable length (this module imports nothing from config)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 10]}... ({len(value)} characters)"


@dataclass(frozen=True)
class Endpoint:
    transport: str
    address: str  # everything after "://"
    host: str = ""
    port: str = ""  # "*" for an ephemeral bind port


def parse_endpoint(text: str, role: Role) -> Endpoint:
    """Parse and check one endpoint; ValueError says what is wrong."""
    if "\0" in text:
        raise ValueError(f"malformed endpoint {shown(text)}: contains a NUL byte")
    if "://" not in text:
        raise ValueError(f"malformed endpoint {shown(text)}: expected transport://address")
    transport, address = text.split("://", 1)
    if transport not in TRANSPORTS:
        raise ValueError(
            f"malformed endpoint {shown(text)}: unsupported transport {shown(transport)} "
            f"(expected one of {', '.join(TRANSPORTS)})"
        )
    if not address:
        raise ValueError(f"malformed endpoint {shown(text)}: empty address")
    if transport == "ipc":
        if len(address.encode("utf-8", "surrogatepass")) > _IPC_PATH_MAX:
            raise ValueError(f"malformed endpoint {shown(text)}: ipc path longer than 107 bytes")
        if address == "*" and role == "connect":
            raise ValueError(f"malformed endpoint {shown(text)}: cannot connect to ipc://*")
        return Endpoint(transport, address)
    if transport == "inproc":
        return Endpoint(transport, address)
    return _parse_tcp(text, address, role)


def _parse_tcp(text: str, address: str, role: Role) -> Endpoint:
    target = address
    if role == "connect" and ";" in address:  # "source;destination" form of zmq_connect
        source, target = address.split(";", 1)
        _split_host_port(text, source, "bind")
    host, port = _split_host_port(text, target, role)
    return Endpoint("tcp", address, host, port)


def _split_host_port(text: str, address: str, role: Role) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"malformed endpoint {shown(text)}: expected tcp://host:port")
    if port == "*":
        if role == "connect":
            raise ValueError(f"malformed endpoint {shown(text)}: a connect needs a numeric port")
    elif not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"malformed endpoint {shown(text)}: port {shown(port)} is not 1-65535")
    if host == "*":
        if role == "connect":
            raise ValueError(f"malformed endpoint {shown(text)}: cannot connect to host '*'")
    else:
        problem = host_problem(host)
        if problem:
            raise ValueError(f"malformed endpoint {shown(text)}: bad host {shown(host)}: {problem}")
    return host, port


def host_problem(host: str) -> str | None:
    """Why `host` is not an IPv4 address, a [bracketed IPv6] address, a DNS name or an
    interface name; None if it is one."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "not an IPv6 address"
        return None
    if _DOTTED.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address (four numbers 0-255, no leading zeros)"
        return None
    if len(host) > 253:
        return "longer than 253 characters"
    for label in host.split("."):
        if not label:
            return "empty name between dots"
        if not _LABEL.fullmatch(label):
            return "expected letters, digits, '-' and '_' between dots"
    return None


@dataclass
class EndpointMap:
    """Maps endpoint strings seen in monitor events to configured endpoint strings."""

    binds: tuple[str, ...]
    connects: tuple[str, ...]
    _exact: dict[str, str] = field(default_factory=dict)
    _by_port: dict[tuple[str, str], str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for configured in (*self.binds, *self.connects):
            self._exact[configured] = configured
            # BIND_FAILED reports the address without "tcp://" or "ipc://".
            self._exact.setdefault(configured.split("://", 1)[1], configured)
        for configured in self.connects:
            if configured.startswith("tcp://"):
                key = ("tcp", configured.rsplit(":", 1)[1])
                # Two connects to the same port on different hosts are ambiguous: None.
                self._by_port[key] = None if key in self._by_port else configured

    @property
    def learning(self) -> bool:
        """Whether endpoints not configured are learned (`LearningEndpointMap`)."""
        return False

    def learn(self, seen: str, role: Role | None) -> str:
        return UNMAPPED

    def add(self, endpoint: str, role: Role | None) -> bool:
        return False

    def add_resolved(self, resolved: str, configured: str) -> None:
        """Record what a bind resolved to (socket.last_endpoint right after bind())."""
        self._exact[resolved] = configured
        self._exact.setdefault(resolved.split("://", 1)[-1], configured)

    def lookup(self, seen: str) -> str:
        if not seen:
            return SOCKET_WIDE
        found = self._exact.get(seen)
        if found is not None:
            return found
        # Connect-side drift (localhost <-> 127.0.0.1): match on transport and port.
        if seen.startswith("tcp://"):
            found = self._by_port.get(("tcp", seen.rsplit(":", 1)[1]))
            if found is not None:
                return found
        return UNMAPPED


# Library mode: distinct endpoints one socket learns from its events at most; the events
# of any further endpoint count under `unmapped` (label values stay bounded).
LEARN_LIMIT = 64


@dataclass
class LearningEndpointMap(EndpointMap):
    """Library mode (exporter/library.py): the application's endpoints are not configured
    but learned, each the first time an event names it (or when the application binds or
    connects through `Instrumentation.bind/connect`, which records the string it gave,
    mapped from what the bind resolved to, as the daemon does).

    The label of a learned endpoint is the string libzmq reports: a connect as given, a
    bind as resolved (`tcp://*:5555` is `tcp://0.0.0.0:5555`), a BIND_FAILED string with
    `tcp://` put back. Connect-side drift (`localhost` <-> `127.0.0.1`, libzmq #4056) maps
    to the connect endpoint first learned on that port. At most `limit` endpoints are
    learned; further ones are `unmapped`."""

    limit: int = LEARN_LIMIT
    learned: list[str] = field(default_factory=list)
    # Drifted connect-side strings -> the connect endpoint they belong to. Kept apart from
    # the exact strings: a bind event naming the same string is not that connect.
    _aliases: dict[str, str] = field(default_factory=dict)

    @property
    def learning(self) -> bool:
        return True

    def lookup(self, seen: str) -> str:
        # Exact strings only: a new endpoint is learned (`learn`) with the role of the
        # event that names it, and port matching is never for bind events (a new bind on
        # a port that a connect also uses is not that connect).
        if not seen:
            return SOCKET_WIDE
        return self._exact.get(seen, UNMAPPED)

    def learn(self, seen: str, role: Role | None) -> str:
        """The label of `seen`, an endpoint string that `lookup` did not know."""
        label = seen if "://" in seen else _with_scheme(seen)
        found = self._exact.get(label)
        if found is not None:
            self._exact[seen] = found
            return found
        if role != "bind" and label.startswith("tcp://"):
            found = self._aliases.get(label)
            if found is None:
                found = self._by_port.get(("tcp", label.rsplit(":", 1)[1]))
            if found is not None:
                if len(self._aliases) < self.limit:  # bounded too; past it, looked up again
                    self._aliases[label] = found  # costs no label
                return found
        if not self.add(label, role):
            return UNMAPPED
        self._exact[seen] = label
        return label

    def add(self, endpoint: str, role: Role | None) -> bool:
        """Learn `endpoint` as a label of its own; False once `limit` are learned."""
        if endpoint in self.learned:
            return True
        if len(self.learned) >= self.limit:
            return False
        self.learned.append(endpoint)
        self._exact[endpoint] = endpoint
        if "://" in endpoint:
            self._exact.setdefault(endpoint.split("://", 1)[1], endpoint)  # BIND_FAILED form
        if role == "bind":
            self.binds = (*self.binds, endpoint)
        elif role == "connect":
            self.connects = (*self.connects, endpoint)
            if endpoint.startswith("tcp://"):
                key = ("tcp", endpoint.rsplit(":", 1)[1])
                self._by_port[key] = None if key in self._by_port else endpoint
        return True


def _with_scheme(seen: str) -> str:
    """BIND_FAILED reports a bind's address without its transport: `host:port` is tcp
    (IPv6 hosts are bracketed), anything else an ipc path."""
    host, sep, port = seen.rpartition(":")
    if sep and host and (port == "*" or _PORT.fullmatch(port)) and not host.startswith(("/", "@")):
        return "tcp://" + seen
    return "ipc://" + seen
