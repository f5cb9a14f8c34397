"""Basic auth for the web server: `Authorization: Basic ...` checked against the bcrypt
hashes of `basic_auth_users` (validated in `exporter.config.web`).

client_python's HTTP server has no auth (declined upstream, PRs #292 and #610), so the
exporter-toolkit semantics are rebuilt here: an unknown user is checked against a dummy
bcrypt hash so that the answer takes as long as for a known user, and successful checks
are cached (a bcrypt check costs ~50 ms at cost 10).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading

import bcrypt

# bcrypt only reads the first 72 bytes; Go's bcrypt refuses longer passwords, so do we.
_BCRYPT_MAX_PASSWORD = 72
_CACHE_MAX = 1024


class BasicAuth:
    """Checks `Authorization: Basic ...` headers against bcrypt hashes."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        # Unknown users are checked against this hash, at the cost of the real ones.
        cost = max((int(h[4:6]) for h in users.values()), default=10)
        self._dummy = bcrypt.hashpw(b"zmq-exporter dummy password", bcrypt.gensalt(cost))
        self._cache: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        credentials = _decode_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        known = hashed is not None
        if hashed is None:
            hashed = self._dummy
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed))).digest()
        with self._lock:
            if known and key in self._cache:
                return True
        try:
            ok = bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
        except ValueError:
            ok = False
        ok = ok and known and len(password) <= _BCRYPT_MAX_PASSWORD
        if ok:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache.add(key)
        return ok


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
