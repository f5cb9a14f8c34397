"""Parity with exporter-toolkit: every web config file of its test data (vendored unchanged
in testdata/webconfigs/toolkit/, with its certificates; README.md there says where from)
is loaded the way `zmq-exporter` loads `--web.config.file`, and the verdict must be the
toolkit's: a file it rejects is refused with a message that gives the same reason, and a
file it serves is served by a real web server with the behaviour the toolkit's own tests
check (client certificates, cipher suites, curves, headers, users, rate limit).

The few files Python's `ssl` cannot serve as Go does are in CANNOT: they must be refused
with a message that says so, and README.md there lists them. A test also checks that the
README's verdict table says what TOOLKIT says.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import re
import ssl
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from exporter.config.errors import ConfigError
from exporter.web.app import WebApp, WebServer
from exporter.web.live_config import load_web_config

from helpers import bare_web_app
from testkit import free_port

TOOLKIT = Path(__file__).parent.parent / "testdata" / "webconfigs" / "toolkit"
FILES = sorted(p for p in TOOLKIT.iterdir() if p.suffix in (".yml", ".yaml"))
SERVES, REJECTS = "serves", "rejects"


# -- talking to a served file ------------------------------------------------------------


@dataclass
class Served:
    port: int
    tls: bool

    def client(
        self,
        cert: str | None = None,
        ciphers: str | None = None,
        curve: str | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A client that trusts the toolkit's server certificate, with the options of the
        toolkit tests' clients. The certificate itself is the trust anchor: OpenSSL, unlike
        Go, finds its intermediate CA (tls-ca-chain.pem, extended key usage "any") unfit
        for a server, and the client's chain checks are not what is tested here."""
        context = ssl.create_default_context(cafile=str(TOOLKIT / "server.crt"))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if cert is not None:
            context.load_cert_chain(str(TOOLKIT / f"{cert}.pem"), str(TOOLKIT / f"{cert}.key"))
        if ciphers is not None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers)
        if curve is not None:
            context.set_ecdh_curve(curve)
        if max_version is not None:
            with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                context.maximum_version = max_version
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1
        return context

    def get(
        self,
        context: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None,
        plain: bool = False,
    ) -> tuple[int, dict[str, str], str | None]:
        """Status, headers and negotiated cipher of GET / (as the toolkit's tests)."""
        conn: http.client.HTTPConnection
        if self.tls and not plain:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=5, context=context or self.client()
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/", headers=headers or {})
            response = conn.getresponse()
            response.read()
            sock = conn.sock
            suite = sock.cipher() if isinstance(sock, ssl.SSLSocket) else None
            cipher = suite[0] if suite else None
            return response.status, dict(response.getheaders()), cipher
        finally:
            conn.close()


Check = Callable[[Served], None]


def ok(served: Served, **client: Any) -> None:
    status, _, _ = served.get(served.client(**client) if served.tls else None)
    assert status == 200, (client, status)


def refused(served: Served, **client: Any) -> None:
    """The toolkit's client gets an error: a failed handshake or a closed connection."""
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        served.get(served.client(**client))


def tls11_refused(served: Served) -> None:
    with pytest.raises((ssl.SSLError, OSError)):
        served.get(served.client(max_version=ssl.TLSVersion.TLSv1_1))


def plain_http_not_served(served: Served) -> None:
    try:
        status, _, _ = served.get(plain=True)
    except (OSError, http.client.HTTPException):
        return  # no answer at all
    assert status == 400, status  # Go's "Client sent an HTTP request to an HTTPS server"


def cipher_chosen(served: Served, offered: str, chosen: str) -> None:
    status, _, cipher = served.get(served.client(ciphers=offered))
    assert (status, cipher) == (200, chosen)


def sends_headers(served: Served, expected: dict[str, str]) -> None:
    status, headers, _ = served.get()
    assert status == 200
    assert {k: headers.get(k) for k in expected} == expected


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def users(served: Served) -> None:
    # The toolkit's TestUsers: two users' passwords, a wrong one, an unknown user.
    assert served.get()[0] == 401
    assert served.get(headers=basic("dave", "dave123"))[0] == 200
    assert served.get(headers=basic("carol", "carol123"))[0] == 200
    assert served.get(headers=basic("dave", "bad"))[0] == 401
    assert served.get(headers=basic("nonexistent", "nonexistent"))[0] == 401


def requests_answered(served: Served, count: int, limited: bool) -> None:
    statuses = [served.get()[0] for _ in range(count)]
    if limited:  # burst 0: golang.org/x/time/rate refuses every request, the first too
        assert statuses == [429] * count, statuses
    else:
        assert statuses == [200] * count


TOOLKIT_HEADERS = {
    "X-Frame-Options": "deny",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-XSS-Protection": "1",
    "Content-Security-Policy": "default-src 'self' *.test.example.net",
}
AES128 = "ECDHE-RSA-AES128-GCM-SHA256"
AES256 = "ECDHE-RSA-AES256-GCM-SHA384"


# -- the toolkit's verdicts --------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    toolkit: str  # SERVES or REJECTS, as exporter-toolkit does (tls_config_test.go, the code)
    why: str  # for REJECTS: a regular expression our message must match (the same reason)
    checks: tuple[Check, ...] = field(default=())  # for SERVES: the toolkit tests' clients


def serves(*checks: Check) -> Case:
    return Case(SERVES, "", checks)


def rejects(why: str) -> Case:
    return Case(REJECTS, why)


SELF_SIGNED = partial(ok, cert="client_selfsigned")
NO_CERT_REFUSED = refused

TOOLKIT_CASES: dict[str, Case] = {
    "tls_config_noAuth.requireandverifyclientcert.good.yml": serves(SELF_SIGNED, refused),
    "tls_config_noAuth.requireanyclientcert.good.yml": serves(SELF_SIGNED, refused),
    "tls_config_noAuth.requireanyclientcertkeyinline.good.yml": serves(SELF_SIGNED, refused),
    # The toolkit reads the missing file before it sees there is no client auth policy;
    # we check the keys first. Either reason refuses it.
    "web_config_auth_clientCAs_invalid.bad.yml": rejects(r"client_ca_file: .*NoClientCert"),
    # Named .bad, but the toolkit's code serves it (system CAs), exactly as the identical
    # web_config_noAuth.good.blocking.yml that its TestConfigReloading starts.
    "web_config_auth_clientCAs_missing.bad.yml": serves(
        refused, partial(refused, cert="client_selfsigned")
    ),
    "web_config_auth_client_san.bad.yaml": serves(partial(refused, cert="client2_selfsigned")),
    "web_config_auth_client_san.good.yaml": serves(partial(ok, cert="client2_selfsigned"), refused),
    "web_config_auth_user_list_invalid.bad.yml": rejects(r"basic_auth_users\.john: not a bcrypt"),
    "web_config_empty.yml": serves(ok),
    "web_config_headers.good.yml": serves(partial(sends_headers, expected=TOOLKIT_HEADERS)),
    "web_config_headers_content_type_options.bad.yml": rejects(
        r"X-Content-Type-Options: invalid value for X-Content-Type-Options"
    ),
    "web_config_headers_extra_header.bad.yml": rejects(
        r'Content-Type: HTTP header "Content-Type" can not be configured'
    ),
    "web_config_headers_frame_options.bad.yml": rejects(
        r"X-Frame-Options: invalid value for X-Frame-Options"
    ),
    "web_config_junk.yml": rejects(r"the top level must be a mapping"),
    "web_config_junk_key.yml": rejects(r"tls_server_config\.cert_filse: unknown key"),
    "web_config_noAuth.bad.yml": rejects(r"client_ca_file.* client_auth_type is NoClientCert"),
    "web_config_noAuth.good.blocking.yml": serves(refused),
    "web_config_noAuth.good.yml": serves(ok, tls11_refused, plain_http_not_served),
    "web_config_noAuth_allCiphers.good.yml": serves(ok),
    "web_config_noAuth_allCurves.good.yml": serves(ok),
    "web_config_noAuth_certPath_empty.bad.yml": rejects(r"cert_file: expected a non-empty"),
    "web_config_noAuth_certPath_invalid.bad.yml": rejects(r"cert_file: cannot read"),
    "web_config_noAuth_certPath_keyPath_empty.bad.yml": rejects(r"cert_file: expected a non-empty"),
    "web_config_noAuth_certPath_keyPath_invalid.bad.yml": rejects(r"cert_file: cannot read"),
    "web_config_noAuth_cert_empty.bad.yml": rejects(r"cert: expected a non-empty"),
    "web_config_noAuth_inventedCiphers.bad.yml": rejects(r"cipher_suites\[0\]: unknown cipher"),
    "web_config_noAuth_inventedCurves.bad.yml": rejects(r"curve_preferences\[0\]: unknown curve"),
    "web_config_noAuth_keyPath_empty.bad.yml": rejects(r"key_file: expected a non-empty"),
    "web_config_noAuth_keyPath_invalid.bad.yml": rejects(r"cannot read"),
    "web_config_noAuth_key_empty.bad.yml": rejects(r"key: expected a non-empty"),
    "web_config_noAuth_noHTTP2.good.yml": serves(partial(ok, ciphers=AES256)),
    "web_config_noAuth_noHTTP2Cipher.bad.yml": rejects(r"cipher_suites: .*HTTP/2"),
    "web_config_noAuth_someCiphers.good.yml": serves(
        partial(ok, ciphers=AES128),
        partial(refused, ciphers="ECDHE-RSA-AES256-SHA"),
        partial(cipher_chosen, offered=f"{AES128}:{AES256}", chosen=AES128),
    ),
    "web_config_noAuth_someCiphers_noOrder.good.yml": serves(
        partial(cipher_chosen, offered=f"{AES128}:{AES256}", chosen=AES128),
    ),
    "web_config_noAuth_someCurves.good.yml": serves(
        partial(ok, curve="secp521r1"), partial(refused, curve="secp384r1")
    ),
    "web_config_noAuth_tlsInline.good.yml": serves(ok),
    "web_config_noAuth_wrongTLSVersion.bad.yml": rejects(r"min_version: unknown TLS version"),
    "web_config_rate_limiter_nonblocking.yaml": serves(
        partial(requests_answered, count=11, limited=False)
    ),
    "web_config_rate_limiter_one_second.yaml": serves(
        partial(requests_answered, count=11, limited=True)
    ),
    "web_config_users.good.yml": serves(users),
    "web_config_users_noTLS.good.yml": serves(users),
}

# What Python's ssl cannot do as Go does: refused, with a message that says so.
CANNOT: dict[str, str] = {
    "tls_config_noAuth.requireanyclientcert.good.yml": r"client_auth_type: RequireAnyClientCert "
    r"is not supported: Python's ssl cannot",
    "tls_config_noAuth.requireanyclientcertkeyinline.good.yml": r"client_auth_type: "
    r"RequireAnyClientCert is not supported: Python's ssl cannot",
    "web_config_noAuth_allCurves.good.yml": r"curve_preferences: .*Python's ssl",
}


def test_every_toolkit_file_has_a_verdict() -> None:
    assert [p.name for p in FILES] == sorted(TOOLKIT_CASES)
    assert set(CANNOT) <= {name for name, case in TOOLKIT_CASES.items() if case.toolkit == SERVES}


@pytest.fixture
def app() -> WebApp:
    return bare_web_app()


@contextlib.contextmanager
def serving(file: Path, app: WebApp) -> Iterator[Served]:
    server = WebServer(app, f"127.0.0.1:{free_port()}", load_web_config(str(file)))
    server.start()
    try:
        yield Served(server.port, server.tls)
    finally:
        server.stop()


def verdict(file: Path, app: WebApp) -> tuple[str, str]:
    """Ours, as (SERVES or REJECTS, the message or the first failed check)."""
    try:
        config = load_web_config(str(file))
    except ConfigError as err:
        return REJECTS, str(err)
    del config
    with serving(file, app) as served:
        for check in TOOLKIT_CASES[file.name].checks:
            try:
                check(served)
            except AssertionError as err:
                return SERVES, f"but {getattr(check, 'func', check).__name__}: {err}"
    return SERVES, ""


@pytest.mark.parametrize("file", FILES, ids=lambda p: p.name)
def test_toolkit_verdict(file: Path, app: WebApp) -> None:
    case = TOOLKIT_CASES[file.name]
    ours, detail = verdict(file, app)
    cannot = CANNOT.get(file.name)
    if cannot is not None:
        assert ours == REJECTS, f"{file.name}: served; CANNOT says it must be refused"
        assert re.search(cannot, detail), detail
        return
    assert (ours, detail if ours == SERVES else "") == (case.toolkit, ""), detail
    if case.toolkit == REJECTS:
        assert "\n" not in detail
        assert re.search(case.why, detail), detail


def test_readme_lists_the_verdicts() -> None:
    """The README beside the files says what this test expects, file by file."""
    rows = re.findall(
        r"^\| `([^`]+)` \| (\w+) \| ([^|]+?) \|$", (TOOLKIT / "README.md").read_text(), re.M
    )
    expected = [
        (name, case.toolkit, "refused: Python's ssl cannot" if name in CANNOT else case.toolkit)
        for name, case in TOOLKIT_CASES.items()
    ]
    assert rows == expected
