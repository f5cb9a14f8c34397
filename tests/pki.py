"""Certificates for TLS tests, generated per run: a CA, a server certificate for 127.0.0.1,
a client certificate it signed (with a SAN of each kind `client_allowed_sans` compares), a
second one with other SANs, and a client certificate from a CA the server does not
trust."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path  # a client certificate from a CA the server does not trust
    other_key: Path
    stranger_cert: Path  # from the trusted CA, with SANs no test allows
    stranger_key: Path


# The client certificate's SANs, one of each kind Go compares (client_allowed_sans).
CLIENT_SANS: list[x509.GeneralName] = [
    x509.DNSName("prometheus.example"),
    x509.RFC822Name("prometheus@example.net"),
    x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
    x509.UniformResourceIdentifier("spiffe://example.net/prometheus"),
]
STRANGER_SANS: list[x509.GeneralName] = [x509.DNSName("stranger.example")]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        usage = x509.oid.ExtendedKeyUsageOID
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage.SERVER_AUTH if server else usage.CLIENT_AUTH]),
            critical=False,
        )
    if server:
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(d: Path) -> Pki:
    """Write ca.crt, server.crt/.key, client.crt/.key, other.crt/.key and
    stranger.crt/.key into `d`."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    _write(d / "ca.crt", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "server.crt", _issue("127.0.0.1", server_key, ca.subject, ca_key, server=True),
           server_key)  # fmt: skip
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "client.crt", _issue("prometheus", client_key, ca.subject, ca_key,
           sans=CLIENT_SANS), client_key)  # fmt: skip
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "stranger.crt", _issue("stranger", stranger_key, ca.subject, ca_key,
           sans=STRANGER_SANS), stranger_key)  # fmt: skip
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _issue("other CA", other_ca_key, _name("other CA"), other_ca_key, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "other.crt", _issue("intruder", other_key, other_ca.subject, other_ca_key),
           other_key)  # fmt: skip
    return Pki(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
        d / "other.crt", d / "other.key", d / "stranger.crt", d / "stranger.key",
    )  # fmt: skip
