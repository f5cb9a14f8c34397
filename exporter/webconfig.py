"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit format.

```yaml
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
  client_ca_file: ca.crt
  min_version: TLS12                             # default TLS12
basic_auth_users:
  prometheus: $2b$10$...                         # bcrypt hash (htpasswd -nBC 10 "" ...)
```

client_python's HTTP server has neither (declined upstream, PRs #292 and #610), so the
semantics are rebuilt here: relative paths are relative to the web config file, an unknown
user is checked against a dummy bcrypt hash so that the answer takes as long as for a
known user, and successful checks are cached (a bcrypt check costs ~50 ms at cost 10).
Every problem is one `file:line: key.path: message` line, like the main config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import ssl
import threading
import typing
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from exporter.config.errors import ConfigError, Path
from exporter.config.yamlnodes import line_of, load_with_lines

CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go can ask for a client certificate without verifying it; Python's ssl module cannot.
UNSUPPORTED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
TLS_KEYS = (
    "cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
)  # fmt: skip
TOP_KEYS = ("tls_server_config", "basic_auth_users")
# exporter-toolkit keys this implementation does not honour: refused, never ignored, so a
# security setting is not silently dropped.
UNSUPPORTED_KEYS = {
    ("tls_server_config", "cert"): "inline certificates are not supported; use cert_file",
    ("tls_server_config", "key"): "inline keys are not supported; use key_file",
    ("tls_server_config", "cipher_suites"): "not supported (OpenSSL's defaults apply)",
    ("tls_server_config", "curve_preferences"): "not supported (OpenSSL's defaults apply)",
    ("tls_server_config", "prefer_server_cipher_suites"): "not supported",
    ("tls_server_config", "client_allowed_sans"): "not supported",
    ("http_server_config",): "not supported (HTTP/1.1 only, no custom headers)",
    ("rate_limit",): "not supported",
}
_BCRYPT_HASH = re.compile(rb"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
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


@dataclass(frozen=True)
class WebConfig:
    file: str
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict, repr=False)

    def basic_auth(self) -> BasicAuth | None:
        return BasicAuth(self.users) if self.users else None


def load_web_config(file: str) -> WebConfig:
    # Bounded, regular files only: /dev/zero or a FIFO here must not eat memory or hang.
    from exporter.config.files import WEB_CONFIG_MAX_BYTES, FileProblem, read_limited
    from exporter.config.yamlnodes import decode

    try:
        data = read_limited(file, WEB_CONFIG_MAX_BYTES)
    except FileProblem as err:
        raise ConfigError(file, None, (), f"cannot read web config: {err}") from None
    return parse_web_config(decode(data, file, "web config"), file)


def parse_web_config(text: str, file: str) -> WebConfig:
    data, lines = load_with_lines(text, file)

    def fail(path: Path, message: str) -> typing.NoReturn:
        raise ConfigError(file, line_of(lines, path), path, message)

    if data is None:
        return WebConfig(file)
    if not isinstance(data, dict):
        fail((), "the top level must be a mapping (tls_server_config, basic_auth_users)")
    _check_keys(data, (), TOP_KEYS, fail)
    base = os.path.dirname(os.path.abspath(file))
    context = None
    tls = data.get("tls_server_config")
    if tls is not None:
        context = _tls_context(tls, base, fail)
    users = _users(data.get("basic_auth_users"), fail)
    return WebConfig(file, context, users)


def _check_keys(
    data: dict[Any, Any],
    where: Path,
    allowed: tuple[str, ...],
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> None:
    for key in data:
        path = (*where, key)
        if path in UNSUPPORTED_KEYS:
            fail(path, UNSUPPORTED_KEYS[path])
        if key not in allowed:
            fail(path, f"unknown key (expected one of: {', '.join(allowed)})")


def _string(
    data: dict[str, Any], key: str, where: Path, fail: typing.Callable[[Path, str], typing.NoReturn]
) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        fail((*where, key), f"expected a non-empty string, got {value!r}")
    return value


def _tls_context(
    tls: object, base: str, fail: typing.Callable[[Path, str], typing.NoReturn]
) -> ssl.SSLContext | None:
    where: Path = ("tls_server_config",)
    if not isinstance(tls, dict):
        fail(where, "expected a mapping")
    _check_keys(tls, where, TLS_KEYS, fail)
    cert = _string(tls, "cert_file", where, fail)
    key = _string(tls, "key_file", where, fail)
    auth = _string(tls, "client_auth_type", where, fail) or "NoClientCert"
    ca = _string(tls, "client_ca_file", where, fail)
    if cert is None and key is None and ca is None and "client_auth_type" not in tls:
        return None  # an empty section: plain HTTP, as in exporter-toolkit
    if cert is None:
        fail(where, "missing cert_file")
    if key is None:
        fail(where, "missing key_file")
    if auth in UNSUPPORTED_CLIENT_AUTH_TYPES:
        fail(
            (*where, "client_auth_type"),
            f"{auth} is not supported (Python's ssl cannot request a client certificate "
            "without verifying it); use VerifyClientCertIfGiven or RequireAndVerifyClientCert",
        )
    if auth not in CLIENT_AUTH_TYPES:
        fail(
            (*where, "client_auth_type"),
            f"unknown client_auth_type {auth!r} (expected one of {', '.join(CLIENT_AUTH_TYPES)})",
        )
    verify = CLIENT_AUTH_TYPES[auth]
    if verify != ssl.CERT_NONE and ca is None:
        fail((*where, "client_auth_type"), f"{auth} needs client_ca_file")
    if verify == ssl.CERT_NONE and ca is not None:
        fail(
            (*where, "client_ca_file"),
            "client_ca_file is set but client_auth_type is NoClientCert",
        )
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        text = _string(tls, name, where, fail) or default
        if text not in TLS_VERSIONS:
            fail(
                (*where, name),
                f"unknown TLS version {text!r} (expected one of {', '.join(TLS_VERSIONS)})",
            )
        versions[name] = TLS_VERSIONS[text]
    if versions["min_version"] > versions["max_version"]:
        fail((*where, "min_version"), "min_version is higher than max_version")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = versions["min_version"]
        context.maximum_version = versions["max_version"]
    except (ValueError, ssl.SSLError) as err:
        fail((*where, "min_version"), f"this OpenSSL refuses the TLS version range: {err}")
    cert_path = os.path.join(base, cert)
    key_path = os.path.join(base, key)
    for name, path in (("cert_file", cert_path), ("key_file", key_path)):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            fail((*where, name), f"cannot read {path!r}")
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as err:
        fail(
            (*where, "cert_file"),
            f"cannot load certificate {cert_path!r} with key {key_path!r}: {_ssl_reason(err)}",
        )
    context.verify_mode = verify
    if ca is not None:
        ca_path = os.path.join(base, ca)
        try:
            context.load_verify_locations(cafile=ca_path)
        except (OSError, ssl.SSLError) as err:
            fail((*where, "client_ca_file"), f"cannot load {ca_path!r}: {_ssl_reason(err)}")
    return context


def _ssl_reason(err: OSError) -> str:
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    return str(err.strerror or err)


def _users(users: object, fail: typing.Callable[[Path, str], typing.NoReturn]) -> dict[str, bytes]:
    where: Path = ("basic_auth_users",)
    if users is None:
        return {}
    if not isinstance(users, dict):
        fail(where, "expected a mapping of user name to bcrypt hash")
    out: dict[str, bytes] = {}
    for name, hashed in users.items():
        path = (*where, name)
        if not isinstance(name, str) or not name or ":" in name:
            fail(path, "a user name is a non-empty string without ':'")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed.encode()):
            # Never echo the value: it may be a plain-text password pasted by mistake.
            fail(path, "not a bcrypt hash (expected $2a$, $2b$ or $2y$, cost 04-31, 60 chars)")
        out[name] = hashed.encode()
    return out
