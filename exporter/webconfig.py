"""`--web.config.file` at run time: the validated settings (`exporter.config.web`) made
into what the web server uses (the SSL context from `exporter.webtls`; the basic-auth
checker and the rate limiter from `exporter.webauth`; the response headers), and read per
use like exporter-toolkit does.

`WebConfigSource.current()` is called by the web server for every TLS handshake and every
request. It stats the web config file and every file it names (certificate, key, CA) and
returns the loaded `WebConfig` while none of them changed (modification time, size, inode,
device): rotated certificates, new users or headers take effect on the next connection or
request, without a restart or SIGHUP. A change that does not load (a broken file, a key
that does not match its certificate yet) keeps the last good config and is logged once
per change; so is a change between TLS and plain HTTP, which needs a restart since the
listener's protocol is fixed. Every problem is one `file:line: key.path: message` line.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass, field

from exporter.config.errors import ConfigError
from exporter.config.web import WebSettings, load_web_settings
from exporter.webauth import DUMMY_COST, BasicAuth, HashGate, RateLimiter
from exporter.webtls import server_context

log = logging.getLogger("zmq_exporter.web")

# What identifies a version of a file; None for one that cannot be stat'ed.
FileStamp = tuple[int, int, int, int] | None


@dataclass(frozen=True)
class WebConfig:
    file: str
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict, repr=False)
    auth: BasicAuth | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict)  # to add to every response
    rate_limiter: RateLimiter | None = None
    settings: WebSettings | None = field(default=None, repr=False, compare=False)
    # The bcrypt cache and hashing slots, shared with the versions that follow.
    gate: HashGate = field(default_factory=HashGate, repr=False, compare=False)

    def basic_auth(self) -> BasicAuth | None:
        return self.auth


def load_web_config(
    file: str, gate: HashGate | None = None, previous: WebConfig | None = None
) -> WebConfig:
    """Read, validate and load `file`; a `ConfigError` for anything wrong with it.
    `gate` (the bcrypt cache and slots) and, if the limit is unchanged, the rate limiter
    of `previous` carry over to the new version."""
    settings = load_web_settings(file)
    return _build(settings, gate or HashGate(), previous)


def _build(settings: WebSettings, gate: HashGate, previous: WebConfig | None) -> WebConfig:
    context = server_context(settings)
    auth = BasicAuth(settings.users, gate) if settings.users else None
    limiter = None
    if settings.rate_limit is not None:
        old = previous.rate_limiter if previous is not None else None
        keep = old is not None and old.limit == settings.rate_limit
        limiter = old if keep else RateLimiter(settings.rate_limit)
    return WebConfig(
        settings.file, context, settings.users, auth, settings.headers, limiter, settings, gate
    )


def _stamp(path: str) -> FileStamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev)


class WebConfigSource:
    """The web config as of now: `current()` per handshake and per request."""

    def __init__(self, first: WebConfig) -> None:
        self._file = first.file
        self._good = first
        self._gate = first.gate
        self._files: tuple[str, ...] = first.settings.files if first.settings else ()
        self._good_stamps = self._stamps()
        self._seen_stamps = self._good_stamps  # the last version tried, good or not
        self._lock = threading.Lock()
        _warn_costs(first)

    @classmethod
    def load(cls, file: str) -> WebConfigSource:
        """The first version must load: a `ConfigError` otherwise (start-up refuses it)."""
        return cls(load_web_config(file))

    @property
    def tls(self) -> bool:
        """Fixed for the life of the listener."""
        return self._good.ssl_context is not None

    def _stamps(self) -> tuple[FileStamp, ...]:
        return tuple(_stamp(p) for p in (self._file, *self._files))

    def current(self) -> WebConfig:
        with self._lock:
            stamps = self._stamps()
            if stamps == self._seen_stamps:
                return self._good
            # Stamped before reading: a file that changes while it is read is read again
            # at the next use.
            self._seen_stamps = stamps
            try:
                settings = load_web_settings(self._file)
                self._files = settings.files
                stamps = self._stamps()  # the files this version names
                self._seen_stamps = stamps
                config = _build(settings, self._gate, self._good)
                if (config.ssl_context is None) != (self._good.ssl_context is None):
                    raise ConfigError(
                        self._file,
                        None,
                        (),
                        "switching between TLS and plain HTTP needs a restart",
                    )
            except ConfigError as err:
                log.error(
                    "web config change not applied, the last good one stays in use",
                    extra={"err": str(err)},
                )
                return self._good
            self._good = config
            self._good_stamps = stamps
            log.info("web config reloaded", extra={"file": self._file})
            _warn_costs(config)
            return config


def _warn_costs(config: WebConfig) -> None:
    if config.auth is None:
        return
    other = sorted(user for user, cost in config.auth.costs().items() if cost != DUMMY_COST)
    if other:
        # A wrong password for them takes a different time than for an unknown user
        # (checked at DUMMY_COST), which tells their names apart.
        log.warning(
            "basic_auth_users hashed at a bcrypt cost other than 10 can be told apart from "
            "unknown names by timing; hash them with cost 10",
            extra={"users": ",".join(other)},
        )
