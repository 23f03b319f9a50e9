"""TLS helper: self-signed development certificates, checks, and production guidance.

``python ssl_setup.py {generate,verify,info,guide}``. Each sub-command is a thin wrapper
around a plain function (``generate_self_signed``, ``verify_pair``, ``cert_info``,
``production_guide``) so that run_system.py can call them directly. Development
certificates only: in production TLS ends at a reverse proxy with a CA-issued certificate.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
MAX_DAYS = 825  # longest validity browsers accept for a TLS server certificate
RENEW_MARGIN = dt.timedelta(days=1)
CLOCK_SKEW = dt.timedelta(minutes=5)


class CertError(Exception):
    """A certificate or key is missing, unreadable, mismatched, expired or not yet valid."""


@dataclasses.dataclass(frozen=True)
class CertPair:
    """Paths of a certificate and its private key; ``created`` if this call wrote them."""

    cert: Path
    key: Path
    created: bool = False


@dataclasses.dataclass(frozen=True)
class PairReport:
    """Outcome of ``verify_pair``: when the certificate expires and how far away that is."""

    subject: str
    not_after: dt.datetime
    days_left: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the SubjectAlternativeName extension, deduplicated."""
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def build_certificate(
    key: ec.EllipticCurvePrivateKey, cn: str, days: int, now: dt.datetime | None = None
) -> x509.Certificate:
    """A self-signed TLS server certificate for ``cn`` plus localhost, 127.0.0.1 and ::1."""
    start = (now or _now()) - CLOCK_SKEW
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CLOCK_SKEW + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries([cn, *DEFAULT_SANS])), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte on, replacing atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_self_signed(
    out_dir: str | Path = "certs", cn: str = "localhost", days: int = 365, force: bool = False
) -> CertPair:
    """Create ``cert.pem`` and ``key.pem`` (mode 0600) in ``out_dir``; refuse to overwrite unless ``force``."""
    if not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    directory = Path(out_dir)
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    if not force and (cert_path.exists() or key_path.exists()):
        raise CertError(f"{cert_path} or {key_path} already exists (use --force to replace them)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"cannot create {directory}: {exc.strerror}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_certificate(key, cn, days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_atomic(key_path, key_pem, 0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise CertError(f"cannot write certificate files in {directory}: {exc.strerror}") from None
    return CertPair(cert_path, key_path, created=True)


def ensure_dev_cert(out_dir: str | Path = "certs") -> CertPair:
    """Reuse a matching, unexpired pair in ``out_dir``; otherwise generate a fresh one."""
    directory = Path(out_dir)
    pair = CertPair(directory / CERT_NAME, directory / KEY_NAME)
    try:
        report = verify_pair(pair.cert, pair.key)
    except CertError:
        return generate_self_signed(directory, force=True)
    if report.not_after - _now() < RENEW_MARGIN:
        return generate_self_signed(directory, force=True)
    return pair


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read one PEM (or DER) certificate, turning every failure into a one-line CertError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read certificate {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertError(f"{path} is not a valid X.509 certificate") from None


def load_private_key(path: str | Path) -> object:
    """Read an unencrypted PEM private key, turning every failure into a one-line CertError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{path} is encrypted; the server needs an unencrypted key") from None
    except ValueError:
        raise CertError(f"{path} is not a valid PEM private key") from None


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_pair(cert_path: str | Path, key_path: str | Path, now: dt.datetime | None = None) -> PairReport:
    """Check that the key belongs to the certificate and that the certificate is valid now."""
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    if not hasattr(key, "public_key") or _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise CertError(f"{key_path} does not match {cert_path} (different public keys)")
    moment = now or _now()
    if cert.not_valid_after_utc <= moment:
        raise CertError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > moment:
        raise CertError(f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    days_left = (cert.not_valid_after_utc - moment).days
    return PairReport(cert.subject.rfc4514_string(), cert.not_valid_after_utc, days_left)


def _subject_alt_names(cert: x509.Certificate) -> list[str]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    san = extension.value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def cert_info(cert_path: str | Path) -> dict[str, object]:
    """Subject, issuer, SANs, validity window and SHA-256 fingerprint of a certificate."""
    cert = load_certificate(cert_path)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    public = cert.public_key()
    key_desc = type(public).__name__
    if isinstance(public, ec.EllipticCurvePublicKey):
        key_desc = f"EC {public.curve.name}"
    elif isinstance(public, rsa.RSAPublicKey):
        key_desc = f"RSA {public.key_size}"
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "self_signed": cert.subject == cert.issuer,
        "subject_alt_names": _subject_alt_names(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "serial": format(cert.serial_number, "x"),
        "key": key_desc,
        "sha256_fingerprint": fingerprint,
    }


def production_guide() -> str:
    """How to run TLS in production, as plain text."""
    return """\
TLS in production
-----------------
1. Terminate TLS in front of the app: a reverse proxy (Caddy, nginx, Traefik) or your
   platform's load balancer (Railway, Fly, AWS ALB, Cloudflare). Run gunicorn on plain HTTP
   on a private interface behind it, and set TRUSTED_PROXIES to the number of proxy hops so
   rate limits see the real client IP from X-Forwarded-For.
2. Use certificates from a CA over ACME, renewed automatically:
     Caddy:    obtains and renews Let's Encrypt certificates by itself for each site name.
     certbot:  certbot certonly --webroot -w /var/www/html -d api.example.com
               (renewal runs from its systemd timer; reload the proxy afterwards).
   Never ship the self-signed development certificate from `ssl_setup.py generate`.
3. Allow TLS 1.2 and 1.3 only, with the proxy's modern cipher defaults
   (nginx: ssl_protocols TLSv1.2 TLSv1.3;). Redirect port 80 to 443.
4. Send HSTS once HTTPS works everywhere:
     Strict-Transport-Security: max-age=31536000; includeSubDomains
   (start with a short max-age; add `preload` only when you mean it).
5. Keep private keys readable by the proxy user only (mode 0600), out of the image and the
   repository; mount them as secrets. Monitor expiry (`python ssl_setup.py verify CERT KEY`
   exits non-zero on an expired or mismatched pair).
6. Check the result with `openssl s_client -connect api.example.com:443 -tls1_2` or an
   external scanner such as SSL Labs.
"""


def _cmd_generate(args: argparse.Namespace) -> int:
    pair = generate_self_signed(args.out_dir, cn=args.cn, days=args.days, force=args.force)
    print(f"wrote {pair.cert} and {pair.key} (key mode 0600), valid {args.days} days for {args.cn}, 127.0.0.1, ::1")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    report = verify_pair(args.cert, args.key)
    expiry = f"{report.not_after:%Y-%m-%d %H:%M} UTC ({report.days_left} days left)"
    print(f"ok: key matches {report.subject}; expires {expiry}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    for field, value in cert_info(args.cert).items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{field + ':':<20}{shown}")
    return 0


def _cmd_guide(args: argparse.Namespace) -> int:
    print(production_guide(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl_setup.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,verify,info,guide}")
    generate = commands.add_parser("generate", help="create a self-signed development certificate and key")
    generate.add_argument("--out-dir", default="certs", help="directory for cert.pem and key.pem [certs]")
    generate.add_argument("--cn", default="localhost", help="common name, also added as a SAN [localhost]")
    generate.add_argument("--days", type=int, default=365, help=f"validity in days, 1-{MAX_DAYS} [365]")
    generate.add_argument("--force", action="store_true", help="replace existing files")
    generate.set_defaults(handler=_cmd_generate)
    verify = commands.add_parser("verify", help="check that CERT and KEY match and CERT is valid now")
    verify.add_argument("cert")
    verify.add_argument("key")
    verify.set_defaults(handler=_cmd_verify)
    info = commands.add_parser("info", help="print subject, SANs, validity and fingerprint of CERT")
    info.add_argument("cert")
    info.set_defaults(handler=_cmd_info)
    guide = commands.add_parser("guide", help="print production TLS guidance")
    guide.set_defaults(handler=_cmd_guide)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CertError as exc:
        print(f"ssl_setup: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
