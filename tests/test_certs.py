"""Certificates and node keys: right formats, private files 0600, valid material kept."""

from __future__ import annotations

import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federimed.cli import main
from federimed.deploy.certs import ensure_certs, node_key_path


def _sans(path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def test_creates_ca_server_cert_and_p384_openssh_node_keys(tmp_path):
    ensure_certs(tmp_path, ["hospital-1", "hospital-2"], ("fl.example.org",))
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for server in ("superlink", "gateway"):  # the fleet gateway has its own key
        assert _sans(tmp_path / f"{server}.crt") == {
            "localhost",
            "127.0.0.1",
            "superlink",
            "fleet-gateway",
            "fl.example.org",
        }
        x509.load_pem_x509_certificate(
            (tmp_path / f"{server}.crt").read_bytes()
        ).verify_directly_issued_by(ca)
    assert (tmp_path / "gateway.key").read_bytes() != (tmp_path / "superlink.key").read_bytes()
    key = serialization.load_ssh_private_key(
        node_key_path(tmp_path, "hospital-1").read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (
        node_key_path(tmp_path, "hospital-1")
        .with_suffix(".pub")
        .read_text()
        .startswith("ecdsa-sha2-nistp384 ")
    )
    for private in (
        tmp_path / "ca.key",
        tmp_path / "superlink.key",
        tmp_path / "gateway.key",
        node_key_path(tmp_path, "hospital-2"),
    ):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_rerun_keeps_valid_material_and_force_replaces_it(tmp_path):
    ensure_certs(tmp_path, ["hospital-1"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    report = ensure_certs(tmp_path, ["hospital-1"])
    assert report.created == []
    assert {p: p.read_bytes() for p in before} == before
    ensure_certs(tmp_path, ["hospital-1"], force=True)
    assert (
        node_key_path(tmp_path, "hospital-1").read_bytes()
        != before[node_key_path(tmp_path, "hospital-1")]
    )


def test_new_name_reissues_only_the_server_certs(tmp_path):
    ensure_certs(tmp_path, ["hospital-1"])
    ca, key = (tmp_path / "ca.crt").read_bytes(), node_key_path(tmp_path, "hospital-1").read_bytes()
    report = ensure_certs(tmp_path, ["hospital-1"], ("10.0.0.5",))
    assert report.created == [tmp_path / "superlink.crt", tmp_path / "gateway.crt"]
    assert "10.0.0.5" in _sans(tmp_path / "superlink.crt")
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert node_key_path(tmp_path, "hospital-1").read_bytes() == key


def test_corrupt_key_is_replaced(tmp_path):
    ensure_certs(tmp_path, ["hospital-1"])
    node_key_path(tmp_path, "hospital-1").write_text("garbage")
    report = ensure_certs(tmp_path, ["hospital-1"])
    assert report.created == [node_key_path(tmp_path, "hospital-1")]


def test_cli_certs(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--hospitals", "2", "--san", "fl.local"]) == 0
    assert main(["certs", "--out", str(tmp_path), "--hospitals", "2", "--san", "fl.local"]) == 0
    out = capsys.readouterr().out
    assert "kept    " in out and str(node_key_path(tmp_path, "hospital-2")) in out
