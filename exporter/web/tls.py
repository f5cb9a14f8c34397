"""The web server's `ssl.SSLContext`, built from the validated `tls_server_config`
(`exporter.config.web`), and the client-SAN check that exporter-toolkit makes in the
handshake and the web server makes right after it (`check_client_sans`).

Certificate, key and CA files are read here, bounded and regular files only (OpenSSL would
read /dev/zero for ever and block on a FIFO); a file that cannot be read or loaded is a
`ConfigError` naming the web config's file, line and key. OpenSSL's reasons never include
a file's content, so a key is never echoed.

`load_cert_chain` takes file names only. PEM text (an inline `cert`/`key`, or a file
already read) reaches it through an anonymous memory file (`memfd_create`, reached as
/proc/self/fd/N): nothing is written to disk, and a read-only root file system is fine.
Where there is no memfd, a file of mode 0600 in a private directory, removed at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator

from exporter.config.files import FileProblem, read_limited
from exporter.config.web import TLS_SECTION, Pem, TlsSettings, WebSettings

PEM_MAX_BYTES = 4 * 1024 * 1024  # a system CA bundle is ~220 KB


class ServerContext(ssl.SSLContext):
    """An SSLContext that carries the `client_allowed_sans` it was built with, so that a
    connection is checked against the settings of its own handshake even after the web
    config changed."""

    allowed_sans: frozenset[str] | None = None


def server_context(settings: WebSettings) -> ServerContext | None:
    """The context for `settings.tls`, None for plain HTTP."""
    tls = settings.tls
    if tls is None:
        return None
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = tls.min_version
        context.maximum_version = tls.max_version
    except (ValueError, ssl.SSLError) as err:
        raise settings.error(
            (*TLS_SECTION, "min_version"), f"this OpenSSL refuses the TLS version range: {err}"
        ) from None
    _options(context, tls, settings)
    cert = _read(tls.cert, settings)
    key = _read(tls.key, settings)
    try:
        with _memory_file(cert) as cert_path, _memory_file(key) as key_path:
            context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as err:
        raise settings.error(
            (*TLS_SECTION, tls.cert.key),
            f"cannot load certificate {_name(tls.cert)} with key {_name(tls.key)}: {_reason(err)}",
        ) from None
    context.verify_mode = tls.verify_mode
    if tls.client_ca is not None:
        ca = _read(tls.client_ca, settings)
        try:
            with _memory_file(ca) as ca_path:
                context.load_verify_locations(cafile=ca_path)
        except (OSError, ssl.SSLError) as err:
            raise settings.error(
                (*TLS_SECTION, tls.client_ca.key),
                f"cannot load {_name(tls.client_ca)}: {_reason(err)}",
            ) from None
    elif tls.verify_mode != ssl.CERT_NONE:
        # No client CA: the system's, as Go (OpenSSL's default paths, SSL_CERT_FILE and
        # SSL_CERT_DIR honoured).
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    if tls.allowed_sans is not None:
        context.allowed_sans = frozenset(tls.allowed_sans)
    return context


def _options(context: ssl.SSLContext, tls: TlsSettings, settings: WebSettings) -> None:
    if tls.ciphers:
        # TLS 1.2 and below only: OpenSSL's TLS 1.3 suites stay (Go does not let a server
        # choose them either).
        try:
            context.set_ciphers(":".join(tls.ciphers))
        except ssl.SSLError as err:
            raise settings.error(
                (*TLS_SECTION, "cipher_suites"), f"this OpenSSL refuses them: {_reason(err)}"
            ) from None
    if tls.prefer_server_ciphers:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve is not None:
        try:
            context.set_ecdh_curve(tls.curve)
        except (ValueError, ssl.SSLError) as err:
            raise settings.error(
                (*TLS_SECTION, "curve_preferences"), f"this OpenSSL refuses it: {err}"
            ) from None


def _read(pem: Pem, settings: WebSettings) -> bytes:
    if pem.text is not None:
        return pem.text.encode("utf-8", "surrogateescape")
    assert pem.path is not None
    try:
        return read_limited(pem.path, PEM_MAX_BYTES)
    except FileProblem as err:
        raise settings.error((*TLS_SECTION, pem.key), f"cannot read {pem.path!r}: {err}") from None


def _name(pem: Pem) -> str:
    return repr(pem.path) if pem.path is not None else f"(inline {pem.key})"


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data`, for as long as the block runs."""
    fd = -1
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            fd = os.memfd_create("zmq-exporter-pem", os.MFD_CLOEXEC)
    if fd >= 0 and os.path.exists(f"/proc/self/fd/{fd}"):
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    if fd >= 0:
        os.close(fd)
    directory = tempfile.mkdtemp(prefix="zmq-exporter-")  # mode 0700
    try:
        path = os.path.join(directory, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def check_client_sans(sock: ssl.SSLSocket) -> bool:
    """After the handshake: False when the web config's `client_allowed_sans` applies to
    this connection and the client's (verified) certificate has none of those names;
    the web server then closes the connection unanswered. exporter-toolkit makes the
    same check inside the handshake (a client without a certificate fails it too).

    Compared as Go writes them: DNS names, e-mail addresses, IP addresses (canonical
    text: 2001:db8::1) and URIs, each exactly."""
    context = sock.context
    allowed = context.allowed_sans if isinstance(context, ServerContext) else None
    if allowed is None:
        return True
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return False
    names: object = (cert or {}).get("subjectAltName", ())
    for entry in names if isinstance(names, tuple) else ():
        kind, value = entry if len(entry) == 2 else ("", "")
        if not isinstance(value, str):
            continue  # a directory name: not compared by Go either
        if kind == "IP Address":
            value = _ip_text(value)
        elif kind not in ("DNS", "email", "URI"):
            continue
        if value in allowed:
            return True
    return False


def _ip_text(value: str) -> str:
    """Python writes an IPv6 SAN as eight uppercase groups; Go as net.IP.String()."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return value
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    if isinstance(err, OSError):
        return str(err.strerror or err)
    return type(err).__name__
