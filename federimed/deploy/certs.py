"""TLS material for the SuperLink and authentication keys for each hospital's SuperNode.

The CA signs one server certificate whose SANs cover every name the SuperLink is reached by.
Each hospital gets an ECDSA P-384 key pair in OpenSSH format, the only format Flower's
SuperNode authentication accepts.  Valid material is never overwritten unless asked, because
replacing a node key silently would lock an enrolled hospital out of the federation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "superlink", "fleet-gateway")
# Server certificates the CA signs, each with the SANs above plus the extra names: the SuperLink's
# and the fleet gateway's (the only address hospitals are given).
SERVER_CERTS = ("superlink", "gateway")
CERT_VALIDITY_DAYS = 365
RENEW_BEFORE_DAYS = 14


@dataclass
class CertsReport:
    """What a run of :func:`ensure_certs` created and what it kept."""

    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def node_key_path(out: Path, hospital: str) -> Path:
    return out / "nodes" / hospital


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with 0600 from the start: no window where it is world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _still_valid(cert: x509.Certificate) -> bool:
    remaining = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return remaining > dt.timedelta(days=RENEW_BEFORE_DAYS)


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _new_ca(out: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FederiMed consortium CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS * 5))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    _write_private(out / "ca.key", _pem_key(key))
    _write_public(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))


def _new_server_cert(out: Path, names: list[str], stem: str) -> None:
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):  # what ensure_certs makes
        raise ValueError(f"{out / 'ca.key'}: not an elliptic-curve key ({type(ca_key).__name__})")
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(out / f"{stem}.key", _pem_key(key))
    _write_public(out / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))


def _server_cert_ok(out: Path, names: list[str], stem: str) -> bool:
    cert = _load_cert(out / f"{stem}.crt")
    ca = _load_cert(out / "ca.crt")
    if cert is None or ca is None or not (out / f"{stem}.key").exists():
        return False
    if cert.issuer != ca.subject or not _still_valid(cert):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    present = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    return set(names) <= present


def _new_node_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(path, private)
    _write_public(path.with_suffix(".pub"), public + f" {path.name}\n".encode())


def _node_key_ok(path: Path) -> bool:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        public = path.with_suffix(".pub").read_bytes().split()
    except (OSError, ValueError):
        return False
    expected = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .split()
    )
    return isinstance(key, ec.EllipticCurvePrivateKey) and public[:2] == expected[:2]


def ensure_certs(
    out: Path, hospitals: list[str], extra_names: tuple[str, ...] = (), force: bool = False
) -> CertsReport:
    """Create whatever is missing or invalid under ``out``; keep the rest unless ``force``."""
    out.mkdir(parents=True, exist_ok=True)
    report = CertsReport()
    names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *extra_names]))
    ca = _load_cert(out / "ca.crt")
    ca_ok = ca is not None and (out / "ca.key").exists() and _still_valid(ca)
    if force or not ca_ok:
        _new_ca(out)
        report.created.append(out / "ca.crt")
    else:
        report.kept.append(out / "ca.crt")
    for stem in SERVER_CERTS:
        if force or not _server_cert_ok(out, names, stem):
            _new_server_cert(out, names, stem)
            report.created.append(out / f"{stem}.crt")
        else:
            report.kept.append(out / f"{stem}.crt")
    for hospital in hospitals:
        path = node_key_path(out, hospital)
        if force or not _node_key_ok(path):
            _new_node_key(path)
            report.created.append(path)
        else:
            report.kept.append(path)
    return report
