"""Web config files (`--web.config.file`), a testdata set like blackbox_exporter's: every
file in testdata/webconfigs/good/ loads to the settings its `# expect:` header names and
serves TLS and basic auth accordingly; every file in bad/ fails with the one-line message
its header names (`{dir}`: the file's directory), in-process and through
`zmq-exporter --config.check`, and never quotes what its `# secret:` header names.

Each file is copied next to certificates generated for the run (pki.py), so that the
relative names in it (server.crt, server.key, ca.crt, client.key) resolve there.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from pki import Pki, make_pki

from exporter.config.errors import ConfigError
from exporter.config.web import TLS_VERSIONS, WebSettings, load_web_settings, parse_web_settings
from exporter.web.app import WebServer
from exporter.web.auth import AuthResult, BasicAuth, HashGate
from exporter.web.live_config import load_web_config

from helpers import ROOT, bare_web_app, check_in_process, run_cli, write_atomic
from testkit import free_port, wait_until

DATA = Path(__file__).parent.parent / "testdata" / "webconfigs"
GOOD = sorted((DATA / "good").glob("*.yml"))
BAD = sorted((DATA / "bad").glob("*.yml"))
MAIN_CONFIG = Path(__file__).parent.parent / "testdata" / "configs" / "good" / "minimal.yml"
PASSWORD = "changeme"  # every hash in good/ is of this password
VERSION_NAMES = {version: name for name, version in TLS_VERSIONS.items()}
OPENSSL_NAMES = {"TLS12": "TLSv1.2", "TLS13": "TLSv1.3"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("webconfigs"))


def headers(path: Path) -> dict[str, str]:
    """The `# name: value` lines at the top of a testdata file."""
    found = {}
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        name, sep, value = line[2:].partition(": ")
        if sep and name in ("expect", "secret"):
            found[name] = value
    assert "expect" in found, f"{path} lacks an '# expect:' header"
    return found


def placed(path: Path, pki: Pki) -> Path:
    target = pki.ca.parent / f"{path.parent.name}-{path.name}"
    shutil.copyfile(path, target)
    return target


def summary(settings: WebSettings, base: Path) -> dict[str, Any]:
    def name(path: str | None) -> str | None:
        return None if path is None else os.path.relpath(path, base)

    tls = settings.tls
    out: dict[str, Any] = {"tls": None, "users": sorted(settings.users)}
    if tls is not None:
        out["tls"] = {
            "cert_file": name(tls.cert_file),
            "key_file": name(tls.key_file),
            "client_auth_type": tls.client_auth_type,
            "client_ca_file": name(tls.client_ca_file),
            "min_version": VERSION_NAMES[tls.min_version],
            "max_version": VERSION_NAMES[tls.max_version],
        }
        # The other settings, where not the default.
        extra = {
            "ciphers": list(tls.ciphers),
            "curve": tls.curve,
            "prefer_server_ciphers": tls.prefer_server_ciphers,
            "allowed_sans": None if tls.allowed_sans is None else list(tls.allowed_sans),
        }
        defaults: dict[str, Any] = {"ciphers": [], "curve": None, "prefer_server_ciphers": True}
        out["tls"].update({k: v for k, v in extra.items() if v != defaults.get(k)})
    if settings.headers:
        out["headers"] = settings.headers
    if settings.rate_limit is not None:
        limit = settings.rate_limit
        out["rate_limit"] = {"interval": limit.interval, "burst": limit.burst}
    if not settings.http2:
        out["http2"] = False
    return out


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """The TLS version `client` and `server` agree on over a socket pair, after the server
    sent two bytes; raises what either side raised when the server refuses the client."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.settimeout(5)
    failures: list[Exception] = []

    def serve() -> None:
        try:
            with server.wrap_socket(ours, server_side=True) as tls:
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as err:
            failures.append(err)

    thread = threading.Thread(target=serve, name="tls-server", daemon=True)
    thread.start()
    try:
        with client.wrap_socket(theirs, server_hostname="127.0.0.1") as tls:
            data = tls.recv(2)
            version = tls.version()
    finally:
        thread.join(10)
        ours.close()
        theirs.close()
    assert not thread.is_alive(), "the TLS server side did not finish within 10 s"
    if failures:
        raise failures[0]
    assert data == b"ok" and version is not None
    return version


def cipher_of(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """The cipher suite the server picks for `client` (OpenSSL's name)."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.settimeout(5)
    picked: list[str] = []

    def serve() -> None:
        with contextlib.suppress(OSError), server.wrap_socket(ours, server_side=True) as tls:
            picked.append((tls.cipher() or ("",))[0])
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, name="tls-server", daemon=True)
    thread.start()
    try:
        with client.wrap_socket(theirs, server_hostname="127.0.0.1") as tls:
            tls.recv(2)
    finally:
        thread.join(10)
        ours.close()
        theirs.close()
    assert picked, "the server did not finish the handshake"
    return picked[0]


def client_context(pki: Pki, cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_web_config(path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    # The system's CAs (what client auth without a client CA falls back to, as in Go) are
    # the test CA: OpenSSL reads SSL_CERT_FILE when they are loaded.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    file = placed(path, pki)
    expect = json.loads(headers(path)["expect"])
    settings = load_web_settings(str(file))
    assert settings.file == str(file)
    assert summary(settings, file.parent) == expect

    # The runtime side: what the web server gets from the same file.
    config = load_web_config(str(file))
    auth = config.basic_auth()
    assert (auth is None) == (not expect["users"])
    if auth is not None:
        for user in expect["users"]:
            assert auth.check(basic(user, PASSWORD)), user
            assert not auth.check(basic(user, PASSWORD + "x")), user
        assert not auth.check(basic("nobody", PASSWORD))
    tls = expect["tls"]
    context = config.ssl_context
    assert (context is None) == (tls is None)
    if context is None:
        return
    assert context.minimum_version == TLS_VERSIONS[tls["min_version"]]
    assert context.maximum_version == TLS_VERSIONS[tls["max_version"]]
    # A real handshake: the certificate chain, the version, and client certificates.
    assert handshake(context, client_context(pki, cert=True)) == OPENSSL_NAMES[tls["max_version"]]
    if tls["client_auth_type"] == "RequireAndVerifyClientCert":
        assert context.verify_mode == ssl.CERT_REQUIRED
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(context, client_context(pki, cert=False))
    else:
        assert handshake(context, client_context(pki, cert=False))
        optional = tls["client_auth_type"] == "VerifyClientCertIfGiven"
        assert context.verify_mode == (ssl.CERT_OPTIONAL if optional else ssl.CERT_NONE)
    # A client certificate from a CA the server does not trust is refused where client
    # certificates are verified (RequestClientCert, as Go, lets every client in).
    intruder = ssl.create_default_context(cafile=str(pki.ca))
    intruder.load_cert_chain(str(pki.other_cert), str(pki.other_key))
    if context.verify_mode == ssl.CERT_NONE:
        assert handshake(context, intruder)
    else:
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(context, intruder)
    if tls.get("ciphers"):
        # A TLS 1.2 client offering every suite gets one of the listed ones; one offering
        # none of them is refused.
        client = client_context(pki, cert=True)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, OSError)):
            unlisted = client_context(pki, cert=True)
            unlisted.maximum_version = ssl.TLSVersion.TLSv1_2
            unlisted.set_ciphers("ECDHE-ECDSA-AES128-SHA")
            handshake(context, unlisted)
        assert cipher_of(context, client) in tls["ciphers"]
    if tls.get("curve"):
        # Only that curve is agreed to: a client offering another one only is refused.
        same, other = client_context(pki, cert=True), client_context(pki, cert=True)
        same.set_ecdh_curve(tls["curve"])
        other.set_ecdh_curve("prime256v1" if tls["curve"] != "prime256v1" else "secp384r1")
        assert handshake(context, same)
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(context, other)


def expected_message(path: Path, file: Path) -> str:
    return f"{file}:{headers(path)['expect'].replace('{dir}', str(file.parent))}"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_web_config(path: Path, pki: Pki) -> None:
    file = placed(path, pki)
    with pytest.raises(ConfigError) as info:
        load_web_config(str(file))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected_message(path, file)), message
    secret = headers(path).get("secret")
    assert secret is None or secret not in message


# Through a real process (interpreter, argparse, exit status) once per error class: YAML
# syntax, the schema, a file the config names, a secret that must not be echoed. The others
# go through cli.main in this process, which writes the same line.
CLI_CASES = ["yaml-syntax.yml", "top-unknown-key.yml", "cert-file-missing.yml"]
CLI_CASES += ["user-plaintext-password.yml"]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_web_config_check_is_one_line(path: Path, pki: Pki) -> None:
    args = ("--config.check", f"--config.file={MAIN_CONFIG}")
    assert_one_line_refusal(
        check_in_process(*args, f"--web.config.file={placed(path, pki)}"), path, pki
    )


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_web_config_check_in_a_process(name: str, pki: Pki) -> None:
    path = DATA / "bad" / name
    args = ("--config.check", f"--config.file={MAIN_CONFIG}")
    assert_one_line_refusal(run_cli(*args, f"--web.config.file={placed(path, pki)}"), path, pki)


def assert_one_line_refusal(proc: subprocess.CompletedProcess[str], path: Path, pki: Pki) -> None:
    file = placed(path, pki)
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"zmq-exporter: bad --web.config.file: {expected_message(path, file)}"
    assert lines[0].startswith(prefix), lines[0]
    secret = headers(path).get("secret")
    assert secret is None or secret not in proc.stderr


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_web_config_check(path: Path, pki: Pki) -> None:
    args = (
        "--config.check",
        f"--config.file={MAIN_CONFIG}",
        f"--web.config.file={placed(path, pki)}",
    )
    proc = run_cli(*args) if path == GOOD[0] else check_in_process(*args)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_relative_names_resolve_against_the_file_not_the_cwd(pki: Pki, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    file = placed(DATA / "good" / "mtls.yml", pki)
    cwd = Path.cwd()
    os.chdir(elsewhere)
    try:
        settings = load_web_settings(os.path.relpath(file))
    finally:
        os.chdir(cwd)
    assert settings.tls is not None
    assert settings.tls.cert_file == str(pki.server_cert)
    assert settings.tls.client_ca_file == str(pki.ca)


def test_error_lines_name_the_key_in_flow_style() -> None:
    # One line per problem even when the whole file is one line of flow YAML.
    text = '{tls_server_config: {cert_file: a, key_file: b, min_version: "TLS9"}}'
    with pytest.raises(ConfigError, match=r"^w\.yml:1: tls_server_config\.min_version: unknown"):
        parse_web_settings(text, "w.yml")


def test_config_web_imports_no_runtime_module() -> None:
    """exporter/config/web.py (and the message helper it uses) import only exporter.config:
    the SSL context and the bcrypt checks live next to the web server."""
    for name in ("web.py", "messages.py"):
        tree = ast.parse((ROOT / "exporter" / "config" / name).read_text())
        imported = [
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        ] + [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        ours = [m for m in imported if m == "exporter" or m.startswith("exporter.")]
        assert all(m.startswith("exporter.config.") for m in ours), (name, ours)
        assert "bcrypt" not in imported, name


# -- read per use ------------------------------------------------------------------------


@contextlib.contextmanager
def web_server(file: Path) -> Iterator[WebServer]:
    server = WebServer(bare_web_app(), f"127.0.0.1:{free_port()}", load_web_config(str(file)))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(
    port: int,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    path: str = "/",
) -> tuple[int, dict[str, str], bytes | None]:
    """Status, headers and the server's certificate (DER) of one request."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        sock = conn.sock
        cert = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        return response.status, dict(response.getheaders()), cert
    finally:
        conn.close()


def hashed(password: str, cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": basic(user, password)}


def test_users_and_headers_change_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "web.yml"
    file.write_text(f"basic_auth_users:\n  alice: {hashed('one')}\n")
    with web_server(file) as server:
        assert get(server.port, auth("alice", "one"))[0] == 200
        write_atomic(
            file,
            f"basic_auth_users:\n  alice: {hashed('two')}\n  bob: {hashed('three')}\n"
            "http_server_config:\n  headers: {X-Frame-Options: deny}\n",
        )
        # The next request reads the new file: no restart, no SIGHUP.
        status, headers, _ = get(server.port, auth("alice", "two"))
        assert (status, headers.get("X-Frame-Options")) == (200, "deny")
        assert get(server.port, auth("alice", "one"))[0] == 401  # even though it was cached
        assert get(server.port, auth("bob", "three"))[0] == 200
        # Headers go on refusals too, as with the toolkit (set before its auth check).
        status, headers, _ = get(server.port)
        assert (status, headers.get("X-Frame-Options")) == (401, "deny")

        # A broken version keeps the last good one, and is logged once for that change.
        caplog.clear()
        file.write_text("basic_auth_users:\n  alice: not-a-hash\n")
        for _ in range(5):
            assert get(server.port, auth("alice", "two"))[0] == 200
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "not a bcrypt hash" in str(getattr(errors[0], "err", ""))
        assert "not-a-hash" not in str(getattr(errors[0], "err", ""))
        # Fixed: applied at the next request (the header stays: dropping it would lower
        # protection, which waits for the file to hold still; tests/web/test_web_auth_attack.py).
        write_atomic(
            file,
            f"basic_auth_users:\n  carol: {hashed('four')}\n"
            "http_server_config:\n  headers: {X-Frame-Options: deny}\n",
        )
        assert get(server.port, auth("carol", "four"))[0] == 200
        assert get(server.port, auth("alice", "two"))[0] == 401

        # Plain HTTP cannot become TLS without a restart: kept, and said so.
        caplog.clear()
        write_atomic(file, "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n")
        assert get(server.port, auth("carol", "four"))[0] == 200
        assert any("cannot read" in str(getattr(r, "err", "")) for r in caplog.records)


def test_rotated_certificate_is_served_at_the_next_handshake(pki: Pki, tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    first = make_pki(tmp_path / "one")
    d = tmp_path / "live"
    d.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copyfile(first.ca.parent / name, d / name)
    file = d / "web.yml"
    file.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    with web_server(file) as server:
        client = ssl.create_default_context(cafile=str(first.ca))
        status, _, cert = get(server.port, context=client)
        assert status == 200 and cert == ssl.PEM_cert_to_DER_cert(first.server_cert.read_text())
        second = make_pki(tmp_path / "two")
        renewed = ssl.create_default_context(cafile=str(second.ca))
        # Half a rotation (new certificate, old key) does not load: the old pair serves.
        write_atomic(d / "server.crt", second.server_cert.read_text())
        assert get(server.port, context=client)[0] == 200
        # The key follows: the next handshake has the new certificate, no restart.
        write_atomic(d / "server.key", second.server_key.read_text())
        status, _, cert = get(server.port, context=renewed)
        assert status == 200 and cert == ssl.PEM_cert_to_DER_cert(second.server_cert.read_text())
        with pytest.raises(ssl.SSLError):
            get(server.port, context=client)  # the old CA no longer verifies it


# -- client_allowed_sans, inline PEM, rate limit -----------------------------------------


@pytest.mark.parametrize(
    "allowed",
    ["prometheus.example", "prometheus@example.net", "2001:db8::1",
     "spiffe://example.net/prometheus"],
)  # fmt: skip
def test_client_allowed_sans(pki: Pki, allowed: str) -> None:
    file = pki.ca.parent / "sans.yml"
    file.write_text(
        f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n"
        f"  client_allowed_sans: [{json.dumps(allowed)}]\n"
    )
    with web_server(file) as server:
        assert get(server.port, context=client_context(pki, cert=True))[0] == 200
        stranger = ssl.create_default_context(cafile=str(pki.ca))
        stranger.load_cert_chain(str(pki.stranger_cert), str(pki.stranger_key))
        for refused in (stranger, client_context(pki, cert=False)):
            with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
                get(server.port, context=refused)


def test_inline_cert_key_and_client_ca(pki: Pki, tmp_path: Path) -> None:
    def block(path: Path) -> str:
        return "|\n" + "".join(f"    {line}\n" for line in path.read_text().splitlines())

    file = tmp_path / "inline.yml"  # no file of the PKI next to it
    file.write_text(
        f"tls_server_config:\n  cert: {block(pki.server_cert)}  key: {block(pki.server_key)}"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca: {block(pki.ca)}"
    )
    before = set(Path(tempfile.gettempdir()).iterdir())
    with web_server(file) as server:
        assert get(server.port, context=client_context(pki, cert=True))[0] == 200
        with pytest.raises((ssl.SSLError, OSError)):
            get(server.port, context=client_context(pki, cert=False))
    # Loaded from memory (memfd): nothing was written to the temp directory.
    assert set(Path(tempfile.gettempdir()).iterdir()) - before == set()


def test_rate_limit_is_a_token_bucket(tmp_path: Path) -> None:
    file = tmp_path / "web.yml"
    file.write_text("rate_limit:\n  interval: 1s\n  burst: 3\n")
    with web_server(file) as server:
        assert [get(server.port)[0] for _ in range(4)] == [200, 200, 200, 429]
        # Health probes are not limited (a liveness probe answered 429 restarts pods).
        assert get(server.port, path="/-/healthy")[0] == 200
        started = time.monotonic()
        wait_until(lambda: get(server.port)[0] == 200, timeout=3, what="a token after 1 s")
        assert time.monotonic() - started > 0.5  # one token per second, not sooner
        assert get(server.port)[0] == 429


# -- bcrypt ------------------------------------------------------------------------------


def cpu_times(check: Callable[[], object], tries: int) -> list[float]:
    times = []
    for _ in range(tries):
        start = time.thread_time()
        check()
        times.append(time.thread_time() - start)
    return times


def test_unknown_user_costs_what_a_wrong_password_costs() -> None:
    """docs/operations.md's claim, measured: an unknown name costs the CPU time of a wrong
    password for a user hashed at cost 10 (the dummy's cost), even with a user of a
    higher cost in the file (it set the dummy's cost before: 4x for cost 12)."""
    users = {"dave": hashed("dave123", 10).encode(), "alice": hashed("alice123", 12).encode()}
    checker = BasicAuth(users)
    wrong, unknown = [], []
    for i in range(8):  # interleaved: a slow phase of the machine hits both alike
        wrong += cpu_times(partial(checker.check, basic("dave", f"bad{i}")), 1)
        unknown += cpu_times(partial(checker.check, basic(f"nobody{i}", "bad")), 1)
    w, u = statistics.median(wrong), statistics.median(unknown)
    print(f"\nbcrypt CPU: wrong password {w * 1000:.1f} ms, unknown user {u * 1000:.1f} ms")
    assert w > 0.01  # a real cost-10 check
    assert abs(u - w) / w < 0.2, (wrong, unknown)


def test_a_high_cost_user_does_not_slow_loading(tmp_path: Path) -> None:
    # exporter-toolkit's users file has a cost-18 user (~15 s per check).
    started = time.monotonic()
    load_web_config(str(DATA / "toolkit" / "web_config_users_noTLS.good.yml"))
    assert time.monotonic() - started < 1.0


def test_hashing_is_bounded_and_cached_users_are_served_meanwhile() -> None:
    gate = HashGate(slots=1, wait=0.2)
    users = {"slow": hashed("x", 13).encode(), "fast": hashed("ok", 4).encode()}
    checker = BasicAuth(users, gate)
    assert checker.verify(basic("fast", "ok")) is AuthResult.OK  # now cached
    results: list[AuthResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(checker.verify(basic("slow", "no"))))
        for _ in range(4)
    ]
    cpu = time.process_time()
    for thread in threads:
        thread.start()
    started = time.monotonic()
    assert checker.verify(basic("fast", "ok")) is AuthResult.OK  # no slot needed
    assert time.monotonic() - started < 0.1
    for thread in threads:
        thread.join(30)
    # One check ran; the others waited 0.2 s for the slot and were answered BUSY.
    assert sorted(r.value for r in results) == ["busy", "busy", "busy", "denied"]
    spent = time.process_time() - cpu
    single = statistics.median(cpu_times(partial(bcrypt.checkpw, b"no", users["slow"]), 1))
    print(f"\n4 concurrent checks: {spent:.2f} s of CPU, one check {single:.2f} s")
    assert spent < 1.5 * single  # about one check's CPU, not four
