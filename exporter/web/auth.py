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
- checks that are not answered from the cache are bounded per client address
  (`AddressThrottle`: one at a time per address, and a token bucket of AUTH_BURST checks,
  one more every AUTH_INTERVAL seconds; a success gives its token back). Beyond that the
  request is answered THROTTLED (the web server answers 429) without hashing: 40 clients
  guessing from one address cost one bcrypt check at a time, and a few per second.

The rate limit: a token bucket over all requests (golang.org/x/time/rate as the toolkit
uses it): `burst` tokens at most, one more every `interval`; a request without a token is
answered 429. The bucket starts full; burst 0 refuses everything, as in Go.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import ipaddress
import threading
import time
from collections import OrderedDict

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
# Per client address (an IPv6 address counts by its /64): uncached checks at once, and the
# bucket of them (a success gives its token back, so only failures use it up).
AUTH_BURST = 20  # a typo or a few wrong tries never meet it; a guessing loop does
AUTH_INTERVAL = 0.5  # seconds per token: 2 failed checks a second from then on
_THROTTLE_MAX = 4096  # addresses remembered; the least recently seen is forgotten first


class AuthResult(enum.Enum):
    OK = "ok"
    DENIED = "denied"  # no, wrong or unknown credentials: 401
    BUSY = "busy"  # no hashing slot within HASH_WAIT: 503, try again
    THROTTLED = "throttled"  # this address has no check left (AddressThrottle): 429


class HashGate:
    """What outlives a web config: the cache of successful checks and the hashing slots,
    shared by every `BasicAuth` built from successive versions of the file."""

    def __init__(self, slots: int = HASH_SLOTS, wait: float = HASH_WAIT) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._wait = wait
        self._cache: set[bytes] = set()
        self._lock = threading.Lock()
        self.throttle = AddressThrottle()

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

    def _key(self, header: str | None) -> tuple[str, bytes, bytes, bool, bytes] | None:
        credentials = _decode_basic(header)
        if credentials is None:
            return None
        user, password = credentials
        hashed = self._users.get(user)
        known = hashed is not None
        if hashed is None:
            hashed = DUMMY_HASH
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed))).digest()
        return user, password, hashed, known, key

    def cached(self, header: str | None) -> bool:
        """Whether `header` holds credentials whose success is cached (no bcrypt needed):
        cheap enough for the event loop."""
        found = self._key(header)
        return found is not None and found[3] and self._gate.cached(found[4])

    def verify(self, header: str | None, client: str | None = None) -> AuthResult:
        """The verdict on `header`; `client` (the peer's address) bounds the checks that
        need bcrypt (AddressThrottle); None: not bounded."""
        found = self._key(header)
        if found is None:
            return AuthResult.DENIED
        _, password, hashed, known, key = found
        if known and self._gate.cached(key):
            return AuthResult.OK
        throttle = self._gate.throttle if client is not None else None
        if throttle is not None and client is not None and not throttle.acquire(client):
            return AuthResult.THROTTLED
        ok: bool | None = False
        try:
            ok = self._gate.check(password[:_BCRYPT_MAX_PASSWORD], hashed)
            ok = ok and known and len(password) <= _BCRYPT_MAX_PASSWORD
        finally:
            if throttle is not None and client is not None:
                throttle.release(client, refund=ok is not False)
        if ok is None:
            return AuthResult.BUSY
        if ok:
            self._gate.remember(key)
            return AuthResult.OK
        return AuthResult.DENIED

    def check(self, header: str | None) -> bool:
        return self.verify(header) is AuthResult.OK

    def costs(self) -> dict[str, int]:
        """Each user's bcrypt cost (a user whose cost is not DUMMY_COST is told apart from
        an unknown name by the time a wrong password takes)."""
        return {user: int(hashed[4:6]) for user, hashed in self._users.items()}


class AddressThrottle:
    """Password checks per client address: one at a time, and a token bucket of `burst`
    checks, one more every `interval` seconds. A check that succeeded (or found no
    hashing slot) gives its token back, so only failed guesses use the bucket up."""

    def __init__(self, burst: int = AUTH_BURST, interval: float = AUTH_INTERVAL) -> None:
        self._burst = float(burst)
        self._interval = interval
        # address -> [tokens, when counted, checks running]; least recently used first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(address: str) -> str:
        """An IPv6 address counts by its /64 (one host usually holds a whole /64)."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
            return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)

    def acquire(self, address: str) -> bool:
        key = self.key(address)
        with self._lock:
            now = time.monotonic()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = [self._burst, now, 0.0]
                self._buckets[key] = bucket
                while len(self._buckets) > _THROTTLE_MAX:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket[0] = min(self._burst, bucket[0] + (now - bucket[1]) / self._interval)
                bucket[1] = now
            if bucket[2] >= 1 or bucket[0] < 1.0:
                return False
            bucket[0] -= 1.0
            bucket[2] += 1
            return True

    def release(self, address: str, refund: bool) -> None:
        key = self.key(address)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return
            bucket[2] = max(0.0, bucket[2] - 1)
            if refund:
                bucket[0] = min(self._burst, bucket[0] + 1.0)


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
