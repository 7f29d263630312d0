from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from xmpp_ha.certs import CertError, ensure_node_cert, init_certs


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_creates_ca_and_node_files(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "certs", node_names=["n1", "n2"])
    names = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert names == ["ca-key.pem", "ca.pem", "n1-key.pem", "n1.pem", "n2-key.pem", "n2.pem"]
    assert paths.ca_file == tmp_path / "certs" / "ca.pem"
    assert paths.nodes["n2"].cert_file == tmp_path / "certs" / "n2.pem"
    assert paths.nodes["n2"].key_file == tmp_path / "certs" / "n2-key.pem"


def test_keys_are_private(tmp_path: Path) -> None:
    init_certs(tmp_path, node_names=["n1"])
    for name in ("ca-key.pem", "n1-key.pem"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_node_cert_content(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, node_names=["n1"], hosts=["localhost", "127.0.0.1", "::1"])
    cert = _load(paths.nodes["n1"].cert_file)
    ca = _load(paths.ca_file)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "n1"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_validity_days(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, node_names=["n1"], days=10)
    cert = _load(paths.nodes["n1"].cert_file)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 10 * 86400 <= lifetime.total_seconds() <= 10 * 86400 + 600


def test_ca_is_reused_for_new_nodes(tmp_path: Path) -> None:
    first = init_certs(tmp_path, node_names=["n1"])
    ca_before = first.ca_file.read_bytes()
    n1_before = first.nodes["n1"].cert_file.read_bytes()
    second = init_certs(tmp_path, node_names=["n1", "n2"])
    assert second.ca_file.read_bytes() == ca_before
    assert second.nodes["n1"].cert_file.read_bytes() == n1_before
    _load(second.nodes["n2"].cert_file).verify_directly_issued_by(_load(second.ca_file))


def test_overwrite_replaces_everything(tmp_path: Path) -> None:
    first = init_certs(tmp_path, node_names=["n1"])
    ca_before = first.ca_file.read_bytes()
    n1_before = first.nodes["n1"].cert_file.read_bytes()
    second = init_certs(tmp_path, node_names=["n1"], overwrite=True)
    assert second.ca_file.read_bytes() != ca_before
    assert second.nodes["n1"].cert_file.read_bytes() != n1_before
    _load(second.nodes["n1"].cert_file).verify_directly_issued_by(_load(second.ca_file))


def test_ensure_node_cert_creates_only_missing(tmp_path: Path) -> None:
    cert_path, key_path = ensure_node_cert(tmp_path, "n1", ["localhost"])
    assert cert_path == tmp_path / "n1.pem" and key_path == tmp_path / "n1-key.pem"
    stamp = (cert_path.stat().st_mtime_ns, (tmp_path / "ca.pem").stat().st_mtime_ns)
    again = ensure_node_cert(tmp_path, "n1", ["localhost"])
    assert again == (cert_path, key_path)
    assert (cert_path.stat().st_mtime_ns, (tmp_path / "ca.pem").stat().st_mtime_ns) == stamp
    key_path.unlink()
    ensure_node_cert(tmp_path, "n1", ["localhost"])
    assert key_path.exists()
    assert (tmp_path / "ca.pem").stat().st_mtime_ns == stamp[1]


def test_half_a_ca_is_an_error(tmp_path: Path) -> None:
    init_certs(tmp_path, node_names=[])
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(CertError, match="ca.pem exists without its pair"):
        init_certs(tmp_path, node_names=["n1"])


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="days must be positive"):
        init_certs(tmp_path, node_names=["n1"], days=0)
    with pytest.raises(CertError, match="invalid node name"):
        init_certs(tmp_path, node_names=["../evil"])


def test_stdlib_ssl_accepts_the_files(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, node_names=["n1"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(paths.nodes["n1"].cert_file, paths.nodes["n1"].key_file)
    client = ssl.create_default_context(cafile=str(paths.ca_file))
    client.load_cert_chain(paths.nodes["n1"].cert_file, paths.nodes["n1"].key_file)
    # A full in-memory handshake, checking the hostname against the SAN.
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_obj = client.wrap_bio(c_in, c_out, server_hostname="n1")
    server_obj = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client_obj, server_obj):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client_obj.version() is not None
    assert server_obj.version() is not None
