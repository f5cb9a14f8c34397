"""The `relay:` section resolved (exporter/relay/server.py serves it)."""

from __future__ import annotations

import ipaddress
import os
import typing
from dataclasses import dataclass, field

from exporter.config.cardinality import _Connections, _Spec, estimate_series
from exporter.config.files import FileProblem, read_limited
from exporter.config.keys import Z85_KEY, KeyFileError, read_key_file, zpl_key
from exporter.config.model import RelayConfig
from exporter.core import metrics

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class RelaySettings:
    listen: tuple[str, ...]
    expire: float
    ipc_mode: int | None
    max_processes: int
    max_sockets_per_process: int
    max_message_bytes: int
    curve_secretkey: bytes | None = field(default=None, repr=False)
    max_series_per_process: int = 20_000
    # The CURVE client keys allowed (Z85), read again on every reload: not compared, so a
    # changed list is no "section changed, restart" case.
    curve_allowed_clients: frozenset[bytes] | None = field(default=None, repr=False, compare=False)


def is_loopback(endpoint: str) -> bool:
    """tcp://HOST:PORT on a loopback address (ipc is always local)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # `*`, an interface or a host name: not provably loopback


def resolve_relay(
    cfg: RelayConfig,
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> RelaySettings:
    secret = None
    if cfg.curve_secretkey_file is not None:
        try:
            secret = read_key_file(cfg.curve_secretkey_file, "secret")
        except KeyFileError as err:
            fail(("relay", "curve_secretkey_file"), str(err))
    allowed = None
    if cfg.curve_allowed_clients is not None:
        where: Path = ("relay", "curve_allowed_clients")
        if secret is None:
            fail(where, "needs curve_secretkey_file: the allow-list is of CURVE client keys")
        try:
            allowed = read_allowed_clients(cfg.curve_allowed_clients)
        except AllowListError as err:
            fail(where, str(err))
    for index, endpoint in enumerate(cfg.listen):
        if secret is None and not is_loopback(endpoint):
            fail(
                ("relay", "listen", index),
                f"{endpoint}: tcp on a non-loopback address needs CURVE "
                "(`curve_secretkey_file`): relayed state would be open to anyone",
            )
    return RelaySettings(
        listen=tuple(cfg.listen),
        expire=cfg.expire,
        ipc_mode=int(cfg.ipc_mode, 8) if cfg.ipc_mode is not None else None,
        max_processes=cfg.max_processes,
        max_sockets_per_process=cfg.max_sockets_per_process,
        max_message_bytes=cfg.max_message_bytes,
        curve_secretkey=secret,
        max_series_per_process=cfg.max_series_per_process,
        curve_allowed_clients=allowed,
    )


class AllowListError(ValueError):
    pass


ALLOW_LIST_MAX_BYTES = 4 * 1024 * 1024  # 80,000 keys
ALLOW_LIST_MAX_FILES = 10_000


def read_allowed_clients(path: str) -> frozenset[bytes]:
    """The Z85 CURVE public keys in `path`: a file with one key a line (blank lines and
    `#` comments allowed; a ZPL certificate's `public-key = "..."` line counts too), or a
    directory of such files (not hidden ones, nor `*_secret` files). AllowListError names
    the file and line of the first problem."""
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as err:
            raise AllowListError(f"{path}: cannot list: {err.strerror}") from None
        files = [
            os.path.join(path, n)
            for n in names
            if not n.startswith(".") and not n.endswith("_secret")
        ]
        if len(files) > ALLOW_LIST_MAX_FILES:
            raise AllowListError(f"{path}: more than {ALLOW_LIST_MAX_FILES} files")
    else:
        files = [path]
    keys: set[bytes] = set()
    for file in files:
        try:
            text = read_limited(file, ALLOW_LIST_MAX_BYTES).decode("utf-8")
        except FileProblem as err:
            raise AllowListError(f"{file}: cannot read: {err}") from None
        except UnicodeDecodeError:
            raise AllowListError(f"{file}: not UTF-8 text") from None
        lines = text.splitlines()
        # A certificate (zmq.auth.create_certificates): its public-key line is the key.
        certificate = any(zpl_key(line, "public") is not None for line in lines)
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if certificate:
                zpl = zpl_key(stripped, "public")
                if zpl is None:
                    continue  # the certificate's other lines
                stripped = zpl
            elif not stripped or stripped.startswith("#"):
                continue
            if not Z85_KEY.fullmatch(stripped):
                raise AllowListError(f"{file}:{number}: not a Z85 CURVE public key (40 characters)")
            keys.add(stripped.encode())
    if not keys:
        raise AllowListError(f"{path}: no CURVE public key in it: nobody could send")
    return frozenset(keys)


def relay_series_budget(
    max_series: int, specs: typing.Sequence[_Spec], connections: _Connections
) -> int:
    """What `limits.max_series` leaves to relayed series: the limit less the config's own
    estimate (its sockets and the exporter's own series) and the relay's self-metrics."""
    own = sum(f.series for f in metrics.RELAY_FAMILIES)
    return max(0, max_series - estimate_series(specs, connections) - own)
