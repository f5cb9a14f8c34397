"""`--web.config.file`: the Prometheus exporter-toolkit web config format, validated like
the main config (a pydantic model; every problem one `file:line: key.path: message` line).

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

The result is a plain `WebSettings`: paths resolved against the web config file's directory,
names checked, hashes checked for shape. Nothing here opens a certificate or builds an SSL
context; `exporter.webtls` does that from these settings, and its errors name the same
file:line:key. No message quotes a hash or anything pasted where a key file's name belongs.
"""

from __future__ import annotations

import os
import re
import ssl
import typing
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

from exporter.config.errors import ConfigError, Path, shown
from exporter.config.files import WEB_CONFIG_MAX_BYTES, FileProblem, read_limited
from exporter.config.messages import first_problem
from exporter.config.yamlnodes import decode, line_of, load_with_lines

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
DEFAULT_MIN_VERSION = "TLS12"  # exporter-toolkit's default
DEFAULT_MAX_VERSION = "TLS13"
TLS_SECTION: Path = ("tls_server_config",)
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_PEM = "-----BEGIN"


# -- per-value checks --------------------------------------------------------------------


def _file_name(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty string")
    if _PEM in value or "\n" in value:
        # Never quoted: it may be a private key pasted where its file's name belongs.
        raise ValueError(
            "holds PEM data, not a file name (value not shown): put it in a file and name the file"
        )
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _client_auth_type(value: str) -> str:
    if value in UNSUPPORTED_CLIENT_AUTH_TYPES:
        raise ValueError(
            f"{value} is not supported (Python's ssl cannot request a client certificate "
            "without verifying it); use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
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


def _user_name(value: str) -> str:
    if not value or ":" in value:
        raise ValueError("a user name is a non-empty string without ':'")
    return value


def _bcrypt_hash(value: str) -> str:
    if not _BCRYPT_HASH.match(value):
        # Never echo the value: it may be a plain-text password pasted by mistake.
        raise ValueError("not a bcrypt hash (expected $2a$, $2b$ or $2y$, cost 04-31, 60 chars)")
    return value


FileName = Annotated[str, AfterValidator(_file_name)]
ClientAuthType = Annotated[str, AfterValidator(_client_auth_type)]
TlsVersionName = Annotated[str, AfterValidator(_tls_version)]
UserName = Annotated[str, AfterValidator(_user_name)]
BcryptHash = Annotated[str, AfterValidator(_bcrypt_hash)]


# -- the schema --------------------------------------------------------------------------


class _ToolkitSection(BaseModel):
    """A section of the toolkit format. Keys of the format this implementation does not
    honour are fields too, listed in REFUSED with the reason: refused rather than ignored,
    so that a security setting is never silently dropped. Supporting one later means giving
    its field a real type and taking it out of REFUSED."""

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
    REFUSED = {
        "cert": "inline certificates are not supported; use cert_file",
        "key": "inline keys are not supported; use key_file",
        "client_ca": "inline CA certificates are not supported; use client_ca_file",
        "client_allowed_sans": "not supported",
        "cipher_suites": "not supported (OpenSSL's defaults apply)",
        "curve_preferences": "not supported (OpenSSL's defaults apply)",
        "prefer_server_cipher_suites": "not supported",
    }

    cert_file: FileName | None = None
    key_file: FileName | None = None
    client_auth_type: ClientAuthType | None = None  # None: NoClientCert
    client_ca_file: FileName | None = None
    min_version: TlsVersionName | None = None  # None: DEFAULT_MIN_VERSION
    max_version: TlsVersionName | None = None  # None: DEFAULT_MAX_VERSION
    # Refused (see REFUSED): any value.
    cert: object = None
    key: object = None
    client_ca: object = None
    client_allowed_sans: object = None
    cipher_suites: object = None
    curve_preferences: object = None
    prefer_server_cipher_suites: object = None


class WebConfigFile(_ToolkitSection):
    REFUSED = {
        "http_server_config": "not supported (HTTP/1.1 only, no custom headers)",
        "rate_limit": "not supported",
    }

    tls_server_config: TlsServerConfig | None = None
    basic_auth_users: dict[UserName, BcryptHash] | None = None
    # Refused (see REFUSED): any value.
    http_server_config: object = None
    rate_limit: object = None


# -- the result --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsSettings:
    """Paths as given, resolved against the web config file's directory."""

    cert_file: str
    key_file: str
    client_auth_type: str
    verify_mode: ssl.VerifyMode
    client_ca_file: str | None
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion


@dataclass(frozen=True)
class WebSettings:
    file: str
    tls: TlsSettings | None = None  # None: plain HTTP
    users: dict[str, bytes] = field(default_factory=dict, repr=False)  # name -> bcrypt hash
    lines: dict[Path, int] = field(default_factory=dict, repr=False, compare=False)

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
        return WebSettings(file, lines=lines)  # an empty file: plain HTTP, no auth
    if not isinstance(data, dict):
        raise ConfigError(
            file,
            line_of(lines, ()),
            (),
            "the top level must be a mapping (tls_server_config, basic_auth_users)",
        )
    try:
        model = WebConfigFile.model_validate(data)
    except pydantic.ValidationError as err:
        path, message = first_problem(err, WebConfigFile, is_secret)
        raise ConfigError(file, line_of(lines, path), path, message) from None

    def fail(path: Path, message: str) -> typing.NoReturn:
        raise ConfigError(file, line_of(lines, path), path, message)

    base = os.path.dirname(os.path.abspath(file))
    tls = _tls(model.tls_server_config, base, fail) if model.tls_server_config is not None else None
    users = {name: hashed.encode() for name, hashed in (model.basic_auth_users or {}).items()}
    return WebSettings(file, tls, users, lines)


def _tls(
    tls: TlsServerConfig, base: str, fail: typing.Callable[[Path, str], typing.NoReturn]
) -> TlsSettings | None:
    """Checks across the section's keys; None for a section that asks for no TLS."""
    where = TLS_SECTION
    asked = (tls.cert_file, tls.key_file, tls.client_ca_file, tls.client_auth_type)
    if all(value is None for value in asked):
        return None  # an empty section: plain HTTP, as in exporter-toolkit
    if tls.cert_file is None:
        fail(where, "missing cert_file")
    if tls.key_file is None:
        fail(where, "missing key_file")
    auth = tls.client_auth_type or "NoClientCert"
    verify = CLIENT_AUTH_TYPES[auth]
    if verify != ssl.CERT_NONE and tls.client_ca_file is None:
        fail((*where, "client_auth_type"), f"{auth} needs client_ca_file")
    if verify == ssl.CERT_NONE and tls.client_ca_file is not None:
        fail(
            (*where, "client_ca_file"),
            "client_ca_file is set but client_auth_type is NoClientCert",
        )
    low = TLS_VERSIONS[tls.min_version or DEFAULT_MIN_VERSION]
    high = TLS_VERSIONS[tls.max_version or DEFAULT_MAX_VERSION]
    if low > high:
        fail((*where, "min_version"), "min_version is higher than max_version")
    return TlsSettings(
        cert_file=os.path.join(base, tls.cert_file),
        key_file=os.path.join(base, tls.key_file),
        client_auth_type=auth,
        verify_mode=verify,
        client_ca_file=os.path.join(base, tls.client_ca_file) if tls.client_ca_file else None,
        min_version=low,
        max_version=high,
    )
