"""Basic auth and the rate limit of the web config, as exporter-toolkit has them.

Basic auth: `Authorization: Basic ...` checked against the bcrypt hashes of
`basic_auth_users` (validated in `exporter.config.web`). client_python's HTTP server has
no auth (declined upstream, PRs #292 and #610), so the toolkit's semantics are rebuilt:

- an unknown user is checked against a fixed dummy hash of cost 10 (the toolkit's cost),
  so that it costs what a wrong password costs a user hashed at cost 10, whatever the
  other users' costs (a cost-18 user no longer makes every unknown name cost 15 s);
- successful checks are cached (keyed by user, password and hash, so a changed hash or a
  removed user never hits): a scrape every 15 s does not pay ~55 ms of CPU each time;
- at most HASH_SLOTS bcrypt checks run at once (the toolkit: one, behind a mutex). A check
  waits at most HASH_WAIT seconds for a slot and is then answered BUSY (the web server
  answers 503): requests with wrong passwords, or a user of a high cost, cannot hold the
  worker threads, and cached users keep being served meanwhile.

The rate limit: a token bucket over all requests (golang.org/x/time/rate as the toolkit
uses it): `burst` tokens at most, one more every `interval`; a request without a token is
answered 429. The bucket starts full; burst 0 refuses everything, as in Go.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import threading
import time

import bcrypt

from exporter.config.web import RateLimit

# bcrypt only reads the first 72 bytes; Go's bcrypt refuses longer passwords, so do we.
_BCRYPT_MAX_PASSWORD = 72
_CACHE_MAX = 1024
# A cost-10 hash of a random password nobody knows (generated once, kept constant: no
# start-up cost). Its cost is the toolkit's.
DUMMY_HASH = b"$2b$10$o9SrCIhEqzJSqn8dFpAP3ucRJJfZzAnrlKVwANDa9UTitI5BGUbAi"
DUMMY_COST = 10
HASH_SLOTS = 1  # one core at most for bcrypt, as the toolkit's mutex
HASH_WAIT = 1.0  # seconds a check waits for a slot (a cost-10 check takes ~55 ms)


class AuthResult(enum.Enum):
    OK = "ok"
    DENIED = "denied"  # no, wrong or unknown credentials: 401
    BUSY = "busy"  # no hashing slot within HASH_WAIT: 503, try again


class HashGate:
    """What outlives a web config: the cache of successful checks and the hashing slots,
    shared by every `BasicAuth` built from successive versions of the file."""

    def __init__(self, slots: int = HASH_SLOTS, wait: float = HASH_WAIT) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._wait = wait
        self._cache: set[bytes] = set()
        self._lock = threading.Lock()

    def cached(self, key: bytes) -> bool:
        with self._lock:
            return key in self._cache

    def remember(self, key: bytes) -> None:
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache.add(key)

    def check(self, password: bytes, hashed: bytes) -> bool | None:
        """bcrypt's verdict, or None when no slot freed within the wait."""
        if not self._slots.acquire(timeout=self._wait):
            return None
        try:
            return bcrypt.checkpw(password, hashed)
        except ValueError:
            return False
        finally:
            self._slots.release()


class BasicAuth:
    """Checks `Authorization: Basic ...` headers against bcrypt hashes."""

    def __init__(self, users: dict[str, bytes], gate: HashGate | None = None) -> None:
        self._users = users
        self._gate = gate if gate is not None else HashGate()

    def verify(self, header: str | None) -> AuthResult:
        credentials = _decode_basic(header)
        if credentials is None:
            return AuthResult.DENIED
        user, password = credentials
        hashed = self._users.get(user)
        known = hashed is not None
        if hashed is None:
            hashed = DUMMY_HASH
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed))).digest()
        if known and self._gate.cached(key):
            return AuthResult.OK
        ok = self._gate.check(password[:_BCRYPT_MAX_PASSWORD], hashed)
        if ok is None:
            return AuthResult.BUSY
        if ok and known and len(password) <= _BCRYPT_MAX_PASSWORD:
            self._gate.remember(key)
            return AuthResult.OK
        return AuthResult.DENIED

    def check(self, header: str | None) -> bool:
        return self.verify(header) is AuthResult.OK

    def costs(self) -> dict[str, int]:
        """Each user's bcrypt cost (a user whose cost is not DUMMY_COST is told apart from
        an unknown name by the time a wrong password takes)."""
        return {user: int(hashed[4:6]) for user, hashed in self._users.items()}


class RateLimiter:
    """A token bucket: at most `burst` requests at once, one more per `interval`."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            refill = (now - self._last) / self.limit.interval
            self._tokens = min(float(self.limit.burst), self._tokens + refill)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


def _decode_basic(header: str | None) -> tuple[str, bytes] | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None
