"""`--web.config.file` at run time: the validated settings (`exporter.config.web`) made
into what the web server uses (the SSL context from `exporter.web.tls`; the basic-auth
checker and the rate limiter from `exporter.web.auth`; the response headers), and read per
use like exporter-toolkit does.

`WebConfigSource.current()` is called by the web server for every TLS handshake and every
request. It stats the web config file and every file it names (certificate, key, CA) and
returns the loaded `WebConfig` while none of them changed (modification time, size, inode,
device): rotated certificates, new users or headers take effect on the next connection or
request, without a restart or SIGHUP. A change that does not load (a broken file, a key
that does not match its certificate yet) keeps the last good config and is logged once
per change; so is a change between TLS and plain HTTP, which needs a restart since the
listener's protocol is fixed. Every problem is one `file:line: key.path: message` line.

A file being rewritten in place (`cat > web.yml`, an editor's save) is read at every
moment of the rewrite: empty, then cut anywhere. Those moments are valid files with less
in them, so a version that lowers protection (`weakens`: basic auth off, TLS settings
changed, rate limit removed or loosened, a response header dropped) is held: it applies
only once the web config and the files it names have not changed for SETTLE_SECONDS and
the file reads the same again; until then every request and handshake gets the last good
version. An empty file (nothing but blanks and comments) never lowers protection: a file
that means "no auth" says so (`{}`, `basic_auth_users: {}`). Anything else (more users,
a password changed, a rotated certificate, a stricter limit) applies at once.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field

from exporter.config.errors import ConfigError
from exporter.config.files import WEB_CONFIG_MAX_BYTES, FileProblem, read_limited
from exporter.config.web import WebSettings, load_web_settings, parse_web_settings
from exporter.config.yamlnodes import decode
from exporter.web.auth import DUMMY_COST, BasicAuth, HashGate, RateLimiter
from exporter.web.tls import server_context

log = logging.getLogger("zmq_exporter.web")

# What identifies a version of a file; None for one that cannot be stat'ed.
FileStamp = tuple[int, int, int, int] | None
# A version that lowers protection applies only once the web config and the files it
# names have not changed for this long (and the file reads the same again).
SETTLE_SECONDS = 1.0


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


@dataclass
class _Held:
    """A version that would lower protection, waiting for its file to hold still."""

    stamps: tuple[FileStamp, ...]
    data: bytes
    config: WebConfig
    since: float
    why: str


class WebConfigSource:
    """The web config as of now: `current()` per handshake and per request."""

    def __init__(self, first: WebConfig, settle: float = SETTLE_SECONDS) -> None:
        self._file = first.file
        self._good = first
        self._gate = first.gate
        self._settle = settle
        self._files: tuple[str, ...] = first.settings.files if first.settings else ()
        self._good_stamps = self._stamps()
        self._seen_stamps = self._good_stamps  # the last version tried, good or not
        self._held: _Held | None = None
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

    def peek(self) -> WebConfig:
        """The version in use, without looking at the files (for the event loop)."""
        return self._good

    def _stamps(self) -> tuple[FileStamp, ...]:
        return tuple(_stamp(p) for p in (self._file, *self._files))

    def current(self) -> WebConfig:
        with self._lock:
            now = time.monotonic()
            stamps = self._stamps()
            if stamps == self._seen_stamps:
                held = self._held
                if held is not None and now - held.since >= self._settle:
                    self._confirm(held, now)
                return self._good
            self._try(stamps, now)
            return self._good

    def _try(self, stamps: tuple[FileStamp, ...], now: float) -> None:
        """A file changed: load the new version, apply it if it lowers no protection,
        else hold it until the file has stayed the same for the settle time."""
        # Stamped before reading: a file that changes while it is read is read again at
        # the next use.
        self._seen_stamps = stamps
        self._held = None
        try:
            data = _read(self._file)
            settings = parse_web_settings(decode(data, self._file, "web config"), self._file)
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
            return
        why = weakens(settings, self._good.settings)
        if why is None:
            self._apply(config, stamps)
            return
        if settings.empty:
            # A truncated file (a rewrite in progress) reads like this: never applied.
            log.error(
                "web config file is empty: not applied, it would remove protection; the "
                "last good one stays in use (a file that means no auth says so, e.g. {})",
                extra={"file": self._file, "change": why},
            )
            return
        log.warning(
            "web config change lowers protection: applied once the file has not changed "
            "for the settle time",
            extra={"file": self._file, "change": why, "settle_seconds": self._settle},
        )
        self._held = _Held(stamps, data, config, now, why)

    def _confirm(self, held: _Held, now: float) -> None:
        """The held version's files have not changed for the settle time: read the file
        again and apply the version if it still reads the same."""
        try:
            same = _read(self._file) == held.data
        except ConfigError:
            same = False
        if not same:  # changed within the same stamp: start over
            self._try(self._stamps(), now)
            return
        self._held = None
        self._apply(held.config, held.stamps)
        log.warning(
            "web config change that lowers protection applied",
            extra={"file": self._file, "change": held.why},
        )

    def _apply(self, config: WebConfig, stamps: tuple[FileStamp, ...]) -> None:
        self._good = config
        self._good_stamps = stamps
        log.info("web config reloaded", extra={"file": self._file})
        _warn_costs(config)


def _read(file: str) -> bytes:
    try:
        return read_limited(file, WEB_CONFIG_MAX_BYTES)
    except FileProblem as err:
        raise ConfigError(file, None, (), f"cannot read web config: {err}") from None


def weakens(new: WebSettings, old: WebSettings | None) -> str | None:
    """What in `new` protects less than `old`, or None. Lowering protection: basic auth
    switched off, any change of the TLS settings (whether a change of client auth, CA,
    versions or suites protects less is not judged: all wait), a rate limit removed or
    loosened, a response header removed or changed. Users added, removed or with a new
    hash are not: a file cut short while it is written names no user the whole file
    does not name (a cut hash is not a 60-character bcrypt hash and does not load), and
    fewer users protect more. The certificate, key and CA files a version names are not
    compared: a cut one does not load, and a rotation must apply at once."""
    if old is None:
        return None
    if old.users and not new.users:
        return "basic auth removed"
    if new.tls != old.tls:
        return "TLS settings changed"
    limit, before = new.rate_limit, old.rate_limit
    if before is not None and (
        limit is None or limit.interval < before.interval or limit.burst > before.burst
    ):
        return "rate_limit removed or loosened"
    if any(new.headers.get(name) != value for name, value in old.headers.items()):
        return "response headers removed or changed"
    return None


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
