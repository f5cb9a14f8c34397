"""`--web.config.file`: the Prometheus exporter-toolkit web config format, validated like
the main config (a pydantic model; every problem one `file:line: key.path: message` line).

```yaml
tls_server_config:
  cert_file: server.crt                          # or cert: <PEM text>
  key_file: server.key                           # or key: <PEM text>
  client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
  client_ca_file: ca.crt                         # or client_ca; neither: the system's CAs
  client_allowed_sans: [prometheus.example.net]
  min_version: TLS12                             # default TLS12
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # Go's names (TLS 1.2)
  curve_preferences: [CurveP256]                 # one curve (Python's ssl sets one)
  prefer_server_cipher_suites: true
http_server_config:
  headers: {X-Frame-Options: deny}               # the toolkit's list of headers
  http2: true                                    # accepted; HTTP/1.1 is served
rate_limit: {interval: 1s, burst: 10}            # interval 0: no limit
basic_auth_users:
  prometheus: $2b$10$...                         # bcrypt hash (htpasswd -nBC 10 "" ...)
```

The result is a plain `WebSettings`: paths resolved against the web config file's directory,
names checked, Go's names mapped to OpenSSL's, hashes checked for shape. Nothing here opens
a certificate or builds an SSL context; `exporter.web.tls` does that from these settings,
and its errors name the same file:line:key. No message quotes a hash, an inline key or
anything pasted where a key file's name belongs.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import typing
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from exporter.config.errors import ConfigError, Path, shown
from exporter.config.files import WEB_CONFIG_MAX_BYTES, FileProblem, read_limited
from exporter.config.messages import first_problem
from exporter.config.yamlnodes import decode, line_of, load_with_lines

CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    # Go asks for a certificate and never verifies it, so it admits every client, as
    # CERT_NONE does (the certificate is not asked for: nothing would look at it).
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go requires a certificate without verifying it; Python's ssl verifies every certificate
# it gets against some CA and has no verify callback to accept one anyway.
UNSUPPORTED_CLIENT_AUTH_TYPES = ("RequireAnyClientCert", "RequireClientCert")
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_MIN_VERSION = "TLS12"  # exporter-toolkit's default
DEFAULT_MAX_VERSION = "TLS13"
# Go's names (crypto/tls CipherSuites(), the ones exporter-toolkit accepts) -> OpenSSL's.
# None: a TLS 1.3 suite, which neither Go nor Python's ssl lets a server configure.
CIPHER_SUITES: dict[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# net/http refuses to serve HTTP/2 with a TLS 1.2 suite list lacking one of these, and so
# exporter-toolkit refuses the file unless http2 is false.
HTTP2_REQUIRED_SUITES = (
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
)
CURVES: dict[str, str] = {  # Go's names -> OpenSSL's
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}
# exporter-toolkit's list: which response headers may be set, and the values of the ones
# that are an enumeration (None: any value).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
TLS_SECTION: Path = ("tls_server_config",)
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_PEM = "-----BEGIN"
# Go's time.ParseDuration: a sequence of decimal numbers, each with a unit.
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
    "m": 60.0, "h": 3600.0,
}  # fmt: skip


# -- per-value checks --------------------------------------------------------------------


def _file_name(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty string")
    if _PEM in value or "\n" in value:
        # Never quoted: it may be a private key pasted where its file's name belongs.
        raise ValueError(
            "holds PEM data, not a file name (value not shown): put it in a file and name "
            "the file, or use the inline key without _file"
        )
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _pem_text(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty string")
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _client_auth_type(value: str) -> str:
    if value in UNSUPPORTED_CLIENT_AUTH_TYPES:
        raise ValueError(
            f"{value} is not supported: Python's ssl cannot require a client certificate "
            "without verifying it against a CA (it has no verify callback); use "
            "RequireAndVerifyClientCert"
        )
    if value not in CLIENT_AUTH_TYPES:
        raise ValueError(
            f"unknown client_auth_type {shown(value)} "
            f"(expected one of {', '.join(CLIENT_AUTH_TYPES)})"
        )
    return value


def _tls_version(value: str) -> str:
    if value not in TLS_VERSIONS:
        raise ValueError(
            f"unknown TLS version {shown(value)} (expected one of {', '.join(TLS_VERSIONS)})"
        )
    return value


def _cipher(value: str) -> str:
    if value not in CIPHER_SUITES:
        raise ValueError(
            f"unknown cipher {shown(value)} (expected a name of Go's crypto/tls "
            "CipherSuites(), such as TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
        )
    return value


def _curve(value: str) -> str:
    if value not in CURVES:
        raise ValueError(f"unknown curve {shown(value)} (expected one of {', '.join(CURVES)})")
    return value


def _user_name(value: str) -> str:
    if not value or ":" in value:
        raise ValueError("a user name is a non-empty string without ':'")
    return value


def _bcrypt_hash(value: str) -> str:
    if not _BCRYPT_HASH.match(value):
        # Never echo the value: it may be a plain-text password pasted by mistake.
        raise ValueError("not a bcrypt hash (expected $2a$, $2b$ or $2y$, cost 04-31, 60 chars)")
    return value


def _scalar_text(value: object) -> object:
    """A YAML scalar as Go's yaml.v2 reads it into a string (`X-XSS-Protection: 1`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value


def _duration(value: object) -> object:
    """Go's time.Duration as yaml.v2 reads it: a string like `1m30s`, or an integer number
    of nanoseconds. Seconds, as a float."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return value  # the type check reports it
    if isinstance(value, int):
        seconds = value * 1e-9
    else:
        text = value.removeprefix("+")
        if text.startswith("-"):
            seconds = -1.0
        elif text == "0":
            seconds = 0.0
        else:
            parts = _DURATION_PART.findall(text)
            joined = "".join(number + unit for number, unit in parts)
            if not parts or joined != text or any(n.strip(".") == "" for n, _ in parts):
                raise ValueError(
                    f"invalid duration {shown(value)} (expected Go's form, e.g. 1s, 500ms, 1m30s)"
                )
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds < 0:
        raise ValueError("must not be negative")
    return float(seconds)


FileName = Annotated[str, AfterValidator(_file_name)]
PemText = Annotated[str, AfterValidator(_pem_text)]
ClientAuthType = Annotated[str, AfterValidator(_client_auth_type)]
TlsVersionName = Annotated[str, AfterValidator(_tls_version)]
CipherName = Annotated[str, AfterValidator(_cipher)]
CurveName = Annotated[str, AfterValidator(_curve)]
UserName = Annotated[str, AfterValidator(_user_name)]
BcryptHash = Annotated[str, AfterValidator(_bcrypt_hash)]
HeaderValue = Annotated[str, BeforeValidator(_scalar_text)]
Interval = Annotated[float, BeforeValidator(_duration)]
Burst = Annotated[int, Field(ge=0)]


# -- the schema --------------------------------------------------------------------------


class _ToolkitSection(BaseModel):
    """A section of the toolkit format. A key of the format this implementation did not
    honour would be a field too, listed in REFUSED with the reason: refused rather than
    ignored, so that a security setting is never silently dropped. Every key of
    exporter-toolkit's format is honoured now (what Python's ssl cannot do is refused by
    value, with the reason)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    REFUSED: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _refuse(cls, value: object, info: ValidationInfo) -> object:
        why = cls.REFUSED.get(info.field_name or "")
        if why is not None:
            raise ValueError(why)
        return value


class TlsServerConfig(_ToolkitSection):
    cert_file: FileName | None = None
    key_file: FileName | None = None
    cert: PemText | None = None  # inline PEM
    key: PemText | None = None  # inline PEM (a secret: never quoted)
    client_auth_type: ClientAuthType | None = None  # None: NoClientCert
    client_ca_file: FileName | None = None
    client_ca: PemText | None = None  # inline PEM
    client_allowed_sans: list[str] | None = None
    min_version: TlsVersionName | None = None  # None: DEFAULT_MIN_VERSION
    max_version: TlsVersionName | None = None  # None: DEFAULT_MAX_VERSION
    cipher_suites: list[CipherName] | None = None
    curve_preferences: list[CurveName] | None = None
    prefer_server_cipher_suites: bool | None = None  # None: true, as exporter-toolkit


class HttpServerConfig(_ToolkitSection):
    http2: bool | None = None  # None: true, as exporter-toolkit (served: HTTP/1.1 only)
    headers: dict[str, HeaderValue] | None = None


class RateLimitConfig(_ToolkitSection):
    interval: Interval | None = None  # seconds; 0 (the default): no limit
    burst: Burst | None = None


class WebConfigFile(_ToolkitSection):
    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig | None = None
    rate_limit: RateLimitConfig | None = None
    basic_auth_users: dict[UserName, BcryptHash] | None = None


# -- the result --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    """A certificate, key or CA bundle: a file (path resolved against the web config's
    directory) or PEM text given inline. `key` is where the file names it."""

    key: str
    path: str | None = None
    text: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TlsSettings:
    cert: Pem
    key: Pem
    client_auth_type: str
    verify_mode: ssl.VerifyMode
    client_ca: Pem | None  # None while verifying clients: the system's CAs, as Go
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    ciphers: tuple[str, ...] = ()  # OpenSSL's names of the TLS 1.2 suites; (): its defaults
    curve: str | None = None  # OpenSSL's name; None: its defaults
    prefer_server_ciphers: bool = True
    allowed_sans: tuple[str, ...] | None = None  # None: any client certificate's SANs

    @property
    def cert_file(self) -> str | None:
        return self.cert.path

    @property
    def key_file(self) -> str | None:
        return self.key.path

    @property
    def client_ca_file(self) -> str | None:
        return self.client_ca.path if self.client_ca is not None else None

    @property
    def files(self) -> tuple[str, ...]:
        """The files read to build the SSL context."""
        pems = (self.cert, self.key, self.client_ca)
        return tuple(p.path for p in pems if p is not None and p.path is not None)


@dataclass(frozen=True)
class RateLimit:
    interval: float  # seconds per token
    burst: int  # bucket size


@dataclass(frozen=True)
class WebSettings:
    file: str
    tls: TlsSettings | None = None  # None: plain HTTP
    users: dict[str, bytes] = field(default_factory=dict, repr=False)  # name -> bcrypt hash
    lines: dict[Path, int] = field(default_factory=dict, repr=False, compare=False)
    headers: dict[str, str] = field(default_factory=dict)  # added to every response
    http2: bool = True  # accepted for the format's sake: HTTP/1.1 is served either way
    rate_limit: RateLimit | None = None  # None: no limit
    # Nothing in the file (empty, blank or comments only): what a file being rewritten
    # looks like once truncated, so it never removes protection at run time (webconfig).
    empty: bool = field(default=False, compare=False)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the settings name (certificates, keys, CAs)."""
        return self.tls.files if self.tls is not None else ()

    def error(self, path: Path, message: str) -> ConfigError:
        """A problem found later (a certificate that does not load), at `path`'s line."""
        return ConfigError(self.file, line_of(self.lines, path), path, message)


def is_secret(path: Path) -> bool:
    # A user's hash (or the password pasted in its place), an inline key.
    return path[:1] == ("basic_auth_users",) or path == (*TLS_SECTION, "key")


def load_web_settings(file: str) -> WebSettings:
    # Bounded, regular files only: /dev/zero or a FIFO here must not eat memory or hang.
    try:
        data = read_limited(file, WEB_CONFIG_MAX_BYTES)
    except FileProblem as err:
        raise ConfigError(file, None, (), f"cannot read web config: {err}") from None
    return parse_web_settings(decode(data, file, "web config"), file)


def parse_web_settings(text: str, file: str) -> WebSettings:
    data, lines = load_with_lines(text, file)
    if data is None:
        return WebSettings(file, lines=lines, empty=True)  # plain HTTP, no auth
    if not isinstance(data, dict):
        raise ConfigError(
            file,
            line_of(lines, ()),
            (),
            "the top level must be a mapping (tls_server_config, http_server_config, "
            "rate_limit, basic_auth_users)",
        )
    try:
        model = WebConfigFile.model_validate(data)
    except pydantic.ValidationError as err:
        path, message = first_problem(err, WebConfigFile, is_secret)
        raise ConfigError(file, line_of(lines, path), path, message) from None

    def fail(path: Path, message: str) -> typing.NoReturn:
        raise ConfigError(file, line_of(lines, path), path, message)

    base = os.path.dirname(os.path.abspath(file))
    http = model.http_server_config or HttpServerConfig()
    http2 = http.http2 is not False
    tls = None
    if model.tls_server_config is not None:
        tls = _tls(model.tls_server_config, base, http2, fail)
    headers = _headers(http.headers or {}, fail)
    rate = model.rate_limit
    rate_limit = None
    if rate is not None and rate.interval:  # interval 0 (or none): off, as exporter-toolkit
        rate_limit = RateLimit(rate.interval, rate.burst or 0)
    users = {name: hashed.encode() for name, hashed in (model.basic_auth_users or {}).items()}
    return WebSettings(file, tls, users, lines, headers, http2, rate_limit)


def _headers(
    headers: dict[str, str], fail: typing.Callable[[Path, str], typing.NoReturn]
) -> dict[str, str]:
    """exporter-toolkit's rules: only the headers it lists, names spelt as it spells them,
    enumerated values checked."""
    where: Path = ("http_server_config", "headers")
    for name, value in headers.items():
        if name not in HEADERS:
            fail((*where, name), f"HTTP header {json.dumps(name)} can not be configured")
        allowed = HEADERS[name]
        if allowed is not None and value not in allowed:
            fail(
                (*where, name),
                f"invalid value for {name}. Expected one of: "
                f"{' '.join(json.dumps(a) for a in allowed)}, but got: {shown(value)}",
            )
        if not all(c == "\t" or " " <= c <= "~" for c in value):
            # A line break would split the response head; it is written as ASCII.
            fail((*where, name), "the value must be ASCII without control characters")
    return dict(headers)


def _tls(
    tls: TlsServerConfig,
    base: str,
    http2: bool,
    fail: typing.Callable[[Path, str], typing.NoReturn],
) -> TlsSettings | None:
    """Checks across the section's keys; None for a section that asks for no TLS."""
    where = TLS_SECTION
    asked = (
        tls.cert_file, tls.cert, tls.key_file, tls.key, tls.client_ca_file, tls.client_ca,
        tls.client_auth_type,
    )  # fmt: skip
    if all(value is None for value in asked):
        return None  # no certificate, key, CA or client auth: plain HTTP, as exporter-toolkit

    def pem(file_key: str, text_key: str) -> Pem | None:
        path, text = getattr(tls, file_key), getattr(tls, text_key)
        if path is not None and text is not None:
            fail((*where, text_key), f"{file_key} and {text_key} are both set: set one")
        if path is not None:
            return Pem(file_key, path=os.path.join(base, path))
        if text is not None:
            return Pem(text_key, text=text)
        return None

    cert = pem("cert_file", "cert")
    if cert is None:
        fail(where, "missing cert_file (or an inline cert)")
    key = pem("key_file", "key")
    if key is None:
        fail(where, "missing key_file (or an inline key)")
    client_ca = pem("client_ca_file", "client_ca")
    auth = tls.client_auth_type or "NoClientCert"
    verify = CLIENT_AUTH_TYPES[auth]
    if auth == "NoClientCert" and client_ca is not None:
        fail(
            (*where, client_ca.key),
            f"{client_ca.key} is set but client_auth_type is NoClientCert "
            "(a client CA without a client auth policy)",
        )
    sans = tls.client_allowed_sans
    if sans is not None:
        if verify == ssl.CERT_NONE:
            fail(
                (*where, "client_allowed_sans"),
                f"needs client certificates that are verified, but client_auth_type is {auth} "
                "(use VerifyClientCertIfGiven or RequireAndVerifyClientCert)",
            )
        if not sans:
            fail((*where, "client_allowed_sans"), "an empty list would refuse every client")
    low = TLS_VERSIONS[tls.min_version or DEFAULT_MIN_VERSION]
    high = TLS_VERSIONS[tls.max_version or DEFAULT_MAX_VERSION]
    if low > high:
        fail((*where, "min_version"), "min_version is higher than max_version")
    suites = tls.cipher_suites or []
    ciphers = tuple(dict.fromkeys(n for n in (CIPHER_SUITES[s] for s in suites) if n))
    if suites and not ciphers:
        # Only TLS 1.3 names: Go has no suite left for TLS 1.2 and below, so neither do we.
        if high < ssl.TLSVersion.TLSv1_3:
            fail((*where, "cipher_suites"), "no TLS 1.2 cipher suite listed for max_version")
        low = ssl.TLSVersion.TLSv1_3
    if (
        http2
        and suites
        and low < ssl.TLSVersion.TLSv1_3
        and not any(s in HTTP2_REQUIRED_SUITES for s in suites)
    ):
        fail(
            (*where, "cipher_suites"),
            "lacks a cipher suite HTTP/2 requires (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 or "
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) while http_server_config.http2 is true "
            "(the default): exporter-toolkit refuses this file, so zmq-exporter does too, "
            "though it serves HTTP/1.1 only; add one, or set http2: false",
        )
    curves = list(dict.fromkeys(tls.curve_preferences or []))
    if len(curves) > 1:
        fail(
            (*where, "curve_preferences"),
            f"{len(curves)} curves are not supported: Python's ssl can restrict the key "
            "exchange to one curve only (SSLContext.set_ecdh_curve), not to a list; name one "
            "curve, or leave curve_preferences out for OpenSSL's defaults",
        )
    return TlsSettings(
        cert=cert,
        key=key,
        client_auth_type=auth,
        verify_mode=verify,
        client_ca=client_ca,
        min_version=low,
        max_version=high,
        ciphers=ciphers,
        curve=CURVES[curves[0]] if curves else None,
        prefer_server_ciphers=tls.prefer_server_cipher_suites is not False,
        allowed_sans=tuple(sans) if sans is not None else None,
    )
