"""ssl_setup: certificate generation, pair verification, info output, and the CLI's exit codes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import ssl_setup

SCRIPT = Path(__file__).resolve().parent.parent / "ssl_setup.py"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def pair(tmp_path: Path) -> ssl_setup.CertPair:
    return ssl_setup.generate_self_signed(tmp_path / "certs")


@pytest.fixture
def expired_pair(tmp_path: Path) -> ssl_setup.CertPair:
    """A certificate that was valid for one day, a year ago."""
    key = ec.generate_private_key(ec.SECP256R1())
    year_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=365)
    cert = ssl_setup.build_certificate(key, "localhost", days=1, now=year_ago)
    cert_path, key_path = tmp_path / "old-cert.pem", tmp_path / "old-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ssl_setup.CertPair(cert_path, key_path)


def test_generate_writes_private_key_with_mode_0600(pair: ssl_setup.CertPair) -> None:
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    assert pair.created


def test_generated_certificate_is_a_tls_server_leaf_for_local_names(pair: ssl_setup.CertPair) -> None:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)


def test_generate_refuses_to_overwrite_without_force(pair: ssl_setup.CertPair) -> None:
    before = pair.cert.read_bytes()
    with pytest.raises(ssl_setup.CertError, match="--force"):
        ssl_setup.generate_self_signed(pair.cert.parent)
    assert pair.cert.read_bytes() == before
    replaced = ssl_setup.generate_self_signed(pair.cert.parent, force=True)
    assert replaced.cert.read_bytes() != before


def test_generate_rejects_unreasonable_validity(tmp_path: Path) -> None:
    with pytest.raises(ssl_setup.CertError, match="--days"):
        ssl_setup.generate_self_signed(tmp_path, days=5000)


def test_verify_accepts_matching_pair(pair: ssl_setup.CertPair) -> None:
    report = ssl_setup.verify_pair(pair.cert, pair.key)
    assert report.subject == "CN=localhost"
    assert 363 <= report.days_left <= 365


def test_verify_rejects_mismatched_pair(tmp_path: Path, pair: ssl_setup.CertPair) -> None:
    other = ssl_setup.generate_self_signed(tmp_path / "other")
    with pytest.raises(ssl_setup.CertError, match="does not match"):
        ssl_setup.verify_pair(pair.cert, other.key)


def test_verify_rejects_expired_certificate(expired_pair: ssl_setup.CertPair) -> None:
    with pytest.raises(ssl_setup.CertError, match="expired"):
        ssl_setup.verify_pair(expired_pair.cert, expired_pair.key)


def test_ensure_dev_cert_reuses_a_valid_pair_and_replaces_an_expired_one(
    tmp_path: Path, expired_pair: ssl_setup.CertPair
) -> None:
    directory = tmp_path / "dev"
    first = ssl_setup.ensure_dev_cert(directory)
    assert first.created
    assert not ssl_setup.ensure_dev_cert(directory).created
    (directory / ssl_setup.CERT_NAME).write_bytes(expired_pair.cert.read_bytes())
    (directory / ssl_setup.KEY_NAME).write_bytes(expired_pair.key.read_bytes())
    renewed = ssl_setup.ensure_dev_cert(directory)
    assert renewed.created
    ssl_setup.verify_pair(renewed.cert, renewed.key)


def test_info_reports_subject_sans_validity_and_fingerprint(pair: ssl_setup.CertPair) -> None:
    info = ssl_setup.cert_info(pair.cert)
    assert info["subject"] == "CN=localhost"
    assert info["subject_alt_names"] == ["localhost", "127.0.0.1", "::1"]
    assert info["self_signed"] is True
    assert len(str(info["sha256_fingerprint"]).split(":")) == 32
    assert info["not_after"] > info["not_before"]


def test_cli_generate_verify_info_succeed_on_a_good_pair(tmp_path: Path) -> None:
    out_dir = tmp_path / "cli"
    assert run_cli("generate", "--out-dir", str(out_dir), "--days", "30").returncode == 0
    cert, key = str(out_dir / "cert.pem"), str(out_dir / "key.pem")
    verified = run_cli("verify", cert, key)
    assert verified.returncode == 0, verified.stderr
    assert "expires" in verified.stdout
    info = run_cli("info", cert)
    assert info.returncode == 0
    assert "127.0.0.1" in info.stdout and "sha256_fingerprint" in info.stdout


@pytest.mark.parametrize("case", ["mismatch", "expired", "unreadable"])
def test_cli_verify_fails_with_one_line(
    case: str, tmp_path: Path, pair: ssl_setup.CertPair, expired_pair: ssl_setup.CertPair
) -> None:
    other = ssl_setup.generate_self_signed(tmp_path / "other")
    args = {
        "mismatch": (pair.cert, other.key),
        "expired": (expired_pair.cert, expired_pair.key),
        "unreadable": (tmp_path / "missing.pem", pair.key),
    }[case]
    result = run_cli("verify", *map(str, args))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_guide_covers_proxy_acme_hsts_and_tls_versions() -> None:
    result = run_cli("guide")
    assert result.returncode == 0
    for phrase in ("reverse proxy", "Let's Encrypt", "certbot", "Caddy", "Strict-Transport-Security", "TLS 1.2"):
        assert phrase in result.stdout


def test_cli_without_command_prints_usage_and_fails() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr
