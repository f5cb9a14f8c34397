"""The web server's `ssl.SSLContext`, built from the validated `tls_server_config`
(`exporter.config.web`). Certificate, key and CA files are loaded here; a file that cannot
be read or loaded is a `ConfigError` naming the web config's file, line and key. OpenSSL's
reasons never include a file's content, so a key is never echoed.
"""

from __future__ import annotations

import os
import ssl

from exporter.config.web import TLS_SECTION, WebSettings


def server_context(settings: WebSettings) -> ssl.SSLContext | None:
    """The context for `settings.tls`, None for plain HTTP."""
    tls = settings.tls
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = tls.min_version
        context.maximum_version = tls.max_version
    except (ValueError, ssl.SSLError) as err:
        raise settings.error(
            (*TLS_SECTION, "min_version"), f"this OpenSSL refuses the TLS version range: {err}"
        ) from None
    files = [("cert_file", tls.cert_file), ("key_file", tls.key_file)]
    if tls.client_ca_file is not None:
        files.append(("client_ca_file", tls.client_ca_file))
    for key, path in files:
        # A regular file only: OpenSSL would read /dev/zero for ever and block on a FIFO.
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise settings.error((*TLS_SECTION, key), f"cannot read {path!r}")
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as err:
        raise settings.error(
            (*TLS_SECTION, "cert_file"),
            f"cannot load certificate {tls.cert_file!r} with key {tls.key_file!r}: {_reason(err)}",
        ) from None
    context.verify_mode = tls.verify_mode
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise settings.error(
                (*TLS_SECTION, "client_ca_file"),
                f"cannot load {tls.client_ca_file!r}: {_reason(err)}",
            ) from None
    return context


def _reason(err: OSError) -> str:
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    return str(err.strerror or err)
