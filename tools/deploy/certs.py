"""Test certificates (a private CA and a server certificate) and SuperNode authentication keys.

Made with the `cryptography` package. For local testing only: a real deployment uses a certificate
from a CA the devices already trust (see docs/deployment.md). Private keys are written 0600 and
atomically; existing files are never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.atomic import write_bytes_atomic
from shared.errors import PrivrecError

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.crt", "server.key"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    write_bytes_atomic(path, data)
    if private:
        os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privrec test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(directory: str | Path, hosts: tuple[str, ...] = LOCAL_HOSTS, days: int = 30) -> Path:
    """Write ca.crt, server.crt and server.key (valid for `hosts`) into `directory`."""
    directory = Path(directory)
    existing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if (directory / n).exists()]
    if existing:
        raise PrivrecError(f"{directory / existing[0]}: already exists; certificates are never overwritten")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("privrec test CA")).issuer_name(_name("privrec test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    # The CA's private key is not kept: nothing else should ever be signed with a test CA.
    _write(directory / SERVER_KEY, _pem_key(server_key), private=True)
    _write(directory / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    return directory


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, as Flower's node authentication reads it: (KEY, KEY.pub)."""
    path = Path(path)
    public = path.with_name(path.name + ".pub")
    if path.exists():
        return path, _ensure_public(path, public)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    return path, _ensure_public(path, public)


def _ensure_public(private: Path, public: Path) -> Path:
    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise PrivrecError(f"{private}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PrivrecError(f"{private}: node keys must be EC (NIST curve) keys, e.g. ssh-keygen -t ecdsa -b 384")
    if not public.exists():
        _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return public
