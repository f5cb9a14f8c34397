"""A /probe module's `allowed_targets`: the fence a target, and the address it resolves
to, must pass before the prober opens anything.

A tcp pattern is `tcp://HOST:PORT`. PORT is a port number, `*`, or a shell pattern over
the port's digits. HOST is one of:

- `*`: any host, by address or by name;
- an IPv4 address (`10.20.0.1`), an IPv4 shell pattern made of digits, dots and pattern
  characters only (`10.20.*`), or an IPv4 CIDR block (`10.20.0.0/16`): these match only
  an address literal in the target (or an address a name resolved to), never a name:
  `10.20.*` does not admit `10.20.0.1.evil.test`;
- the same for IPv6, always in brackets as in a target: `[::1]`, `[fd00::*]` (a shell
  pattern over the address's compressed form, e.g. `fd00::1`), `[fd00::/8]`;
- a host name or a shell pattern over host names (`*.orders.internal`): matches a name
  in the target (case-insensitive, one trailing dot ignored), never an address literal.

A name is only half the check: the address it resolves to must itself be allowed by an
address pattern (or a `*` host) of the same fence with the target's port, and that
address is the one connected to (a name cannot be made to resolve past the fence, DNS
rebinding included). An IPv4-mapped IPv6 address (`::ffff:10.20.0.1`) is checked as the
IPv4 address it reaches.

An ipc pattern is `ipc://PATH` with a shell pattern as PATH (`*` crosses `/`). A target's
path is normalised before matching (`//` and `/./` collapsed, as os.path.normpath) and a
path with a `..` segment is refused outright, so `ipc:///dir/*` never admits
`ipc:///dir/../secret.sock`. Matching is lexical: it touches no file, so a refused target
learns nothing about the filesystem. Abstract-namespace names (`ipc://@name`) are matched
as written (they are not paths). Symbolic links are checked by the prober when it
connects (`real_ipc_path`), not here.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import string
from dataclasses import dataclass

from exporter.core.endpoints import host_problem, parse_endpoint

_GLOB = frozenset("*?[]!")
_IPV4_GLOB = frozenset(string.digits + ".") | _GLOB
_IPV6_GLOB = frozenset(string.hexdigits + ":.") | _GLOB
_PORT_GLOB = frozenset(string.digits) | _GLOB

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Pattern:
    text: str
    transport: str  # "tcp" or "ipc"
    kind: str = ""  # tcp: "any", "name", "ipv4" or "ipv6"
    host: str = ""  # tcp: a shell pattern (names lower-cased, addresses as written)
    network: Network | None = None  # tcp: a CIDR block or a single address (/32, /128)
    port: str = "*"  # tcp: a shell pattern over the port's digits
    path: str = ""  # ipc: a shell pattern over the normalised path

    def admits_address(self, address: Address, port: int) -> bool:
        if self.transport != "tcp" or not fnmatch.fnmatchcase(str(port), self.port):
            return False
        if self.kind == "any":
            return True
        if self.kind != f"ipv{address.version}":
            return False
        if self.network is not None:
            return address in self.network
        return fnmatch.fnmatchcase(str(address), self.host)

    def admits_name(self, name: str, port: int) -> bool:
        if self.transport != "tcp" or not fnmatch.fnmatchcase(str(port), self.port):
            return False
        return self.kind == "any" or (
            self.kind == "name" and fnmatch.fnmatchcase(_name(name), self.host)
        )

    def admits_path(self, path: str) -> bool:
        return self.transport == "ipc" and fnmatch.fnmatchcase(path, self.path)


def parse_pattern(text: str) -> Pattern:
    """One `allowed_targets` entry; ValueError says what is wrong with it."""
    transport, sep, rest = text.partition("://")
    if not sep or transport not in ("tcp", "ipc") or not rest:
        raise ValueError(
            "expected tcp://HOST:PORT or ipc://PATH (HOST: *, a name or name pattern, an "
            "address, an address pattern or a CIDR block; IPv6 in brackets)"
        )
    if transport == "ipc":
        if not rest.startswith("@") and ".." in rest.split("/"):
            raise ValueError("an ipc pattern may not contain a `..` segment")
        return Pattern(text, "ipc", path=rest if rest.startswith("@") else _normal(rest))
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ValueError("expected tcp://HOST:PORT (`tcp://*:*` allows every tcp target)")
    if not port or not set(port) <= _PORT_GLOB:
        raise ValueError(f"port {port!r} is neither a port number, `*`, nor a pattern of digits")
    if not set(port) & _GLOB and not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is not 1-65535")
    return _host_pattern(text, host, port)


def _host_pattern(text: str, host: str, port: str) -> Pattern:
    if host == "*":
        return Pattern(text, "tcp", "any", "*", port=port)
    bracketed = host.startswith("[") and host.endswith("]")
    inner = host[1:-1] if bracketed else host
    if "/" in inner:  # a CIDR block
        try:
            network = ipaddress.ip_network(inner, strict=True)
        except ValueError as err:
            raise ValueError(f"{inner!r} is not a CIDR block: {err}") from None
        return _address_pattern(text, network, bracketed, port)
    if set(inner) & _GLOB:
        if bracketed:
            if not set(inner) <= _IPV6_GLOB:
                raise ValueError(f"{host!r}: an IPv6 pattern has hex digits, `:` and `*?[]!` only")
            return Pattern(text, "tcp", "ipv6", inner.lower(), port=port)
        if set(inner) <= _IPV4_GLOB:
            return Pattern(text, "tcp", "ipv4", inner, port=port)
        if not set(inner) <= _NAME_CHARS | _GLOB:
            raise ValueError(f"{host!r}: a name pattern has letters, digits, '-_.' and '*?[]!'")
        return Pattern(text, "tcp", "name", _name(inner), port=port)
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        if bracketed:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        problem = host_problem(inner)
        if problem is not None:
            raise ValueError(f"{host!r} is not a host name: {problem}") from None
        return Pattern(text, "tcp", "name", _name(inner), port=port)
    return _address_pattern(text, ipaddress.ip_network(address), bracketed, port)


_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")


def _address_pattern(text: str, network: Network, bracketed: bool, port: str) -> Pattern:
    if network.version == 6 and not bracketed:
        raise ValueError(f"an IPv6 address or block goes in brackets: tcp://[{network}]:{port}")
    if network.version == 4 and bracketed:
        raise ValueError(f"an IPv4 address or block takes no brackets: tcp://{network}:{port}")
    return Pattern(text, "tcp", f"ipv{network.version}", str(network), network, port)


def _name(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def _normal(path: str) -> str:
    normal = os.path.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def address_of(host: str) -> Address | None:
    """`host` as an address literal (the IPv4 address an IPv4-mapped IPv6 one reaches);
    None for a name. The scope of a link-local IPv6 address is kept."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normal_ipc_path(path: str) -> str | None:
    """The path an ipc target connects to, normalised; None if it has a `..` segment.
    Abstract-namespace names (`@name`) come back as they are."""
    if path.startswith("@"):
        return path
    if ".." in path.split("/"):
        return None
    return _normal(path)


@dataclass(frozen=True)
class Fence:
    patterns: tuple[Pattern, ...]

    @classmethod
    def parse(cls, texts: tuple[str, ...]) -> Fence:
        return cls(tuple(parse_pattern(t) for t in texts))

    def allows(self, target: str) -> bool:
        """Whether the target as written passes: an address literal an address pattern,
        a name a name pattern, an ipc path (normalised, no `..`) an ipc pattern."""
        try:
            endpoint = parse_endpoint(target, "connect")
        except ValueError:
            return False
        if endpoint.transport == "ipc":
            path = normal_ipc_path(endpoint.address)
            return path is not None and self.allows_path(path)
        if endpoint.transport != "tcp" or not endpoint.port.isdigit():
            return False
        host = endpoint.host
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        address = address_of(host)
        if address is not None:
            return self.allows_address(address, int(endpoint.port))
        return any(p.admits_name(host, int(endpoint.port)) for p in self.patterns)

    def allows_address(self, address: Address, port: int) -> bool:
        return any(p.admits_address(address, port) for p in self.patterns)

    def allows_path(self, path: str) -> bool:
        return any(p.admits_path(path) for p in self.patterns)

    def names_without_addresses(self) -> bool:
        """True if a name pattern could never be used: no pattern admits any address."""
        tcp = [p for p in self.patterns if p.transport == "tcp"]
        return any(p.kind == "name" for p in tcp) and not any(p.kind != "name" for p in tcp)
