"""The `relay:` section resolved (issue 16; exporter/relay.py serves it)."""

from __future__ import annotations

import ipaddress
import typing
from dataclasses import dataclass, field

from exporter import metrics
from exporter.config.cardinality import _Connections, _Spec, estimate_series
from exporter.config.files import KEY_MAX_BYTES, FileProblem, read_limited
from exporter.config.model import RelayConfig

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
    parse_secret: typing.Callable[[str], bytes | None],
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> RelaySettings:
    secret = None
    if cfg.curve_secretkey_file is not None:
        where: Path = ("relay", "curve_secretkey_file")
        try:
            text = read_limited(cfg.curve_secretkey_file, KEY_MAX_BYTES).decode("utf-8")
        except (FileProblem, UnicodeDecodeError) as err:
            reason = str(err) if isinstance(err, FileProblem) else "not UTF-8 text"
            fail(where, f"cannot read key file: {reason} (value not shown)")
        secret = parse_secret(text)
        if secret is None:
            fail(where, "key file holds no Z85 CURVE secret key (content not shown)")
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
    )


def relay_series_budget(
    max_series: int, specs: typing.Sequence[_Spec], connections: _Connections
) -> int:
    """What `limits.max_series` leaves to relayed series: the limit less the config's own
    estimate (its sockets and the exporter's own series) and the relay's self-metrics."""
    own = sum(f.series for f in metrics.RELAY_FAMILIES)
    return max(0, max_series - estimate_series(specs, connections) - own)
