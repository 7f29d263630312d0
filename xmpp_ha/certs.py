"""Cluster certificates: one CA and one certificate per node.

Rules:
- Keys are ECDSA P-256 (cheap handshakes) and are written with mode 0600,
  created that way rather than chmod-ed afterwards.
- Node certificates carry EKU serverAuth and clientAuth: the same certificate
  serves c2s TLS and both ends of the mutually authenticated peer link.
- SANs: a DNS name per host name, an IPAddress per IP literal, and the node
  name as a DNS name.
- An existing CA is reused; an existing node certificate is kept unless
  `overwrite` is set. Nothing here touches the network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 825
_CA_DAYS = 3650
# Tolerates small clock differences between the nodes and the clients.
_BACKDATE = datetime.timedelta(minutes=5)


class CertError(ValueError):
    """A certificate could not be created or an existing file is unusable."""


@dataclass(frozen=True)
class NodeCertPaths:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class CertPaths:
    directory: Path
    ca_file: Path
    ca_key_file: Path
    nodes: dict[str, NodeCertPaths] = field(default_factory=dict)


def node_cert_paths(directory: Path, node_name: str) -> NodeCertPaths:
    return NodeCertPaths(directory / f"{node_name}.pem", directory / f"{node_name}-key.pem")


def init_certs(
    directory: Path,
    *,
    node_names: list[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> CertPaths:
    """Create (or reuse) the cluster CA and a certificate for each node name.

    With `overwrite`, the CA and every listed node certificate are created anew.
    """
    if days <= 0:
        raise CertError(f"days must be positive, got {days}")
    for name in node_names:
        _check_node_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ensure_ca(directory, overwrite=overwrite)
    nodes: dict[str, NodeCertPaths] = {}
    for name in node_names:
        paths = node_cert_paths(directory, name)
        if overwrite or not (paths.cert_file.exists() and paths.key_file.exists()):
            _write_node_cert(paths, name, hosts, days, ca_cert, ca_key)
        nodes[name] = paths
    return CertPaths(directory, directory / CA_CERT_NAME, directory / CA_KEY_NAME, nodes)


def ensure_node_cert(
    directory: Path, node_name: str, hosts: Sequence[str] = DEFAULT_HOSTS
) -> tuple[Path, Path]:
    """Return (cert_path, key_path) for `node_name`, creating only what is missing."""
    result = init_certs(directory, node_names=[node_name], hosts=hosts)
    paths = result.nodes[node_name]
    return paths.cert_file, paths.key_file


def _check_node_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or os.sep in name:
        raise CertError(f"invalid node name for a certificate file: {name!r}")


def _ensure_ca(
    directory: Path, *, overwrite: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = directory / CA_CERT_NAME
    key_path = directory / CA_KEY_NAME
    if not overwrite and cert_path.exists() and key_path.exists():
        return _load_ca(cert_path, key_path)
    if not overwrite and (cert_path.exists() != key_path.exists()):
        present = cert_path if cert_path.exists() else key_path
        raise CertError(f"{present} exists without its pair; remove it or pass overwrite=True")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xmpp-ha cluster CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise CertError(f"cannot load the CA from {cert_path} / {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    if cert.public_key() != key.public_key():
        raise CertError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _subject_alt_names(node_name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, node_name]:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_node_cert(
    paths: NodeCertPaths,
    node_name: str,
    hosts: Sequence[str],
    days: int,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(_subject_alt_names(node_name, hosts)), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths.key_file, key)
    _write_public(paths.cert_file, cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    _atomic_write(path, data, mode=0o644)


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    # The file is created with its final mode so a key is never world-readable,
    # and renamed into place so a reader never sees half a PEM.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have cleared bits we want
            handle.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
