"""Notifier against a real SMTP server (aiosmtpd) on a free loopback port: plain, STARTTLS, implicit TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import notifier as notifier_module
from config import Config
from notifier import EVENTS, KEY_BLOCKED, Notifier, SmtpSender, format_subject, header_safe
from tests.services import free_port, wait_until

USERNAME = "alerts@example.test"
PASSWORD = "s3cret-Pa55word"
TO = ["ops@example.test", "security@example.test"]
# aiosmtpd warns whenever AUTH is allowed without STARTTLS; these tests do that on purpose.
allow_auth_without_starttls = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


def accept_credentials(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USERNAME.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context trusting it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


def make_config(port: int, **changes) -> Config:
    values = dict(
        email_enabled=True,
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_use_tls=False,
        smtp_use_ssl=False,
        smtp_timeout_seconds=5.0,
        email_from="ratelimiter@example.test",
        alert_email_to=list(TO),
        email_event_cooldown_seconds=300,
    )
    values.update(changes)
    return Config(**values)


@pytest.fixture
def make_notifier() -> Iterator[Callable[..., Notifier]]:
    """Build notifiers with fast retries; every one is closed after the test."""
    made: list[Notifier] = []

    def build(config: Config, **kwargs) -> Notifier:
        kwargs.setdefault("backoff", 0.01)
        made.append(Notifier(config, **kwargs))
        return made[-1]

    yield build
    for item in made:
        item.close(timeout=5)


def test_plain_smtp_delivers_to_every_recipient_with_subject_and_body(smtp_server, make_notifier):
    inbox, port = smtp_server()
    notifier = make_notifier(make_config(port))

    assert notifier.notify(KEY_BLOCKED, "rl_ab12cd34", {"reason": "abuse", "actor": "admin"}) is True
    wait_until(lambda: len(inbox.envelopes) == 1)

    envelope, message = inbox.envelopes[0], inbox.messages()[0]
    assert sorted(envelope.rcpt_tos) == sorted(TO)
    assert envelope.mail_from == "ratelimiter@example.test"
    assert message["Subject"] == "[RateLimiter] Key blocked: rl_ab12cd34"
    assert message["From"] == "ratelimiter@example.test"
    body = message.get_content()
    assert "reason: abuse" in body and "actor: admin" in body and "key_blocked" in body
    wait_until(lambda: notifier.stats()["sent"] == 1)


# (server options, config changes) per TLS mode. aiosmtpd counts only STARTTLS as TLS for its
# auth_require_tls check, so that check is relaxed on the implicit-TLS port.
TLS_MODES = {
    "starttls": (dict(require_starttls=True), dict(smtp_use_tls=True)),
    "implicit-ssl": (dict(auth_require_tls=False), dict(smtp_use_ssl=True)),
}


@allow_auth_without_starttls
@pytest.mark.parametrize("mode", sorted(TLS_MODES))
def test_tls_modes_with_login(mode, smtp_server, make_notifier, tls_contexts):
    server_ctx, client_ctx = tls_contexts
    server_options, config_changes = TLS_MODES[mode]
    context_option = "ssl_context" if mode == "implicit-ssl" else "tls_context"
    inbox, port = smtp_server(
        authenticator=accept_credentials, auth_required=True, **{context_option: server_ctx}, **server_options
    )
    config = make_config(port, smtp_username=USERNAME, smtp_password=PASSWORD, **config_changes)
    notifier = make_notifier(config, sender=SmtpSender(config, ssl_context=client_ctx))

    assert notifier.notify("tier_changed", "alice", {"old": "free", "new": "premium"})
    wait_until(lambda: len(inbox.envelopes) == 1)

    message = inbox.messages()[0]
    assert message["Subject"] == "[RateLimiter] Tier changed: alice"
    assert "new: premium" in message.get_content()
    assert notifier.stats()["failed"] == 0


@allow_auth_without_starttls
def test_login_over_plain_smtp_when_server_allows_it(smtp_server, make_notifier):
    inbox, port = smtp_server(authenticator=accept_credentials, auth_required=True, auth_require_tls=False)
    notifier = make_notifier(make_config(port, smtp_username=USERNAME, smtp_password=PASSWORD))

    assert notifier.notify("key_unblocked", "rl_ab12cd34", {})
    wait_until(lambda: len(inbox.envelopes) == 1)


@allow_auth_without_starttls
def test_rejected_login_is_counted_failed_and_password_never_logged(smtp_server, make_notifier, caplog):
    inbox, port = smtp_server(authenticator=accept_credentials, auth_required=True, auth_require_tls=False)
    notifier = make_notifier(make_config(port, smtp_username=USERNAME, smtp_password="wrong-" + PASSWORD))
    caplog.set_level(logging.DEBUG, logger="notifier")

    assert notifier.notify("key_banned", "rl_ab12cd34", {})
    wait_until(lambda: notifier.stats()["failed"] == 1)

    assert inbox.envelopes == []
    assert "sending the key_banned e-mail failed" in caplog.text
    assert PASSWORD not in caplog.text


def test_dead_server_never_slows_notify_and_ends_counted_failed(make_notifier):
    notifier = make_notifier(make_config(free_port()), attempts=3, backoff=0.05)

    started = time.perf_counter()
    accepted = notifier.notify("abuse_alert", "failed_login from 198.51.100.7", {"count": 20})
    elapsed = time.perf_counter() - started

    assert accepted is True
    assert elapsed < 0.05
    wait_until(lambda: notifier.stats()["failed"] == 1)
    assert notifier.stats()["sent"] == 0


def test_retry_succeeds_after_transient_failures(make_notifier):
    calls: list[EmailMessage] = []

    def flaky(message: EmailMessage) -> None:
        calls.append(message)
        if len(calls) < 3:
            raise ConnectionRefusedError("try later")

    sleeps: list[float] = []
    notifier = make_notifier(make_config(1), sender=flaky, attempts=3, backoff=0.5, sleep=sleeps.append)

    assert notifier.notify("rate_limit_spike", "rl_ab12cd34", {"rejected": 120})
    wait_until(lambda: notifier.stats()["sent"] == 1)
    assert sleeps == [0.5, 1.0]
    assert notifier.stats()["failed"] == 0


def test_cooldown_suppresses_repeat_within_window_and_allows_after(smtp_server, make_notifier):
    inbox, port = smtp_server()
    now = [1_000.0]
    notifier = make_notifier(make_config(port, email_event_cooldown_seconds=300), clock=lambda: now[0])

    assert notifier.notify(KEY_BLOCKED, "rl_ab12cd34", {}) is True
    now[0] += 299
    assert notifier.notify(KEY_BLOCKED, "rl_ab12cd34", {}) is False
    assert notifier.notify(KEY_BLOCKED, "rl_99999999", {}) is True  # another subject is not in cooldown
    assert notifier.notify("key_unblocked", "rl_ab12cd34", {}) is True  # nor another event
    now[0] += 1
    assert notifier.notify(KEY_BLOCKED, "rl_ab12cd34", {}) is True

    wait_until(lambda: len(inbox.envelopes) == 4)
    assert notifier.stats()["suppressed"] == 1


def test_header_injection_is_stripped(smtp_server, make_notifier):
    inbox, port = smtp_server()
    config = make_config(port, email_from="rl@example.test\r\nBcc: victim@example.test")
    notifier = make_notifier(config)

    assert notifier.notify(KEY_BLOCKED, "rl_ab12cd34\r\nBcc: attacker@example.test", {"reason": "x\r\nX-Evil: 1"})
    wait_until(lambda: len(inbox.envelopes) == 1)

    raw = inbox.envelopes[0].original_content
    headers = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in headers and b"\nX-Evil:" not in headers
    assert sorted(inbox.envelopes[0].rcpt_tos) == sorted(TO)
    assert "\n" not in inbox.messages()[0]["Subject"]


def test_header_safe_and_subject_format():
    assert header_safe("a\r\nb\x00c") == "a b c"
    assert format_subject(KEY_BLOCKED, "rl_ab12cd34") == "[RateLimiter] Key blocked: rl_ab12cd34"


def test_full_api_key_in_subject_or_details_is_masked(make_notifier):
    sent: list[EmailMessage] = []
    notifier = make_notifier(make_config(1), sender=sent.append)
    full_key = "rl_1a2b3c4d_" + "A" * 43

    notifier.notify(KEY_BLOCKED, full_key, {"api_key": full_key})
    wait_until(lambda: len(sent) == 1)

    assert full_key not in sent[0].as_string()
    assert "rl_1a2b3c4d…" in sent[0]["Subject"]


def test_full_queue_drops_and_counts(make_notifier):
    release = threading.Event()
    notifier = make_notifier(make_config(1), sender=lambda message: release.wait(10), max_queue=2)
    results = [notifier.notify(KEY_BLOCKED, f"rl_{i:08x}", {}) for i in range(10)]
    release.set()

    assert results[:2] == [True, True]
    assert results.count(False) >= 10 - 3  # one may already be in flight, the queue holds two
    assert notifier.stats()["dropped"] == results.count(False)


def test_close_drains_the_queue(smtp_server, make_notifier):
    inbox, port = smtp_server()
    notifier = make_notifier(make_config(port))
    for i in range(5):
        notifier.notify(KEY_BLOCKED, f"rl_{i:08x}", {})

    assert notifier.close(timeout=10) is True
    assert len(inbox.envelopes) == 5
    assert notifier.notify(KEY_BLOCKED, "rl_after000", {}) is False


def test_disabled_notifier_is_a_cheap_no_op(monkeypatch):
    monkeypatch.setattr(notifier_module, "SmtpSender", None)  # building a sender would fail loudly
    notifier = Notifier(make_config(1, email_enabled=False))

    assert notifier.notify(KEY_BLOCKED, "rl_ab12cd34", {}) is False
    assert notifier.stats()["disabled"] == 1
    assert notifier.close() is True


def test_unknown_event_is_logged_and_refused_not_raised(make_notifier, caplog):
    sent: list[EmailMessage] = []
    notifier = make_notifier(make_config(1), sender=sent.append)

    assert notifier.notify("coffee_ready", "x", {}) is False
    assert notifier.stats()["invalid"] == 1
    assert "unknown notification event 'coffee_ready'" in caplog.text
    assert notifier.close() is True and sent == []


def test_every_event_has_a_title():
    assert set(EVENTS) == {
        "tier_changed",
        "key_blocked",
        "key_unblocked",
        "key_banned",
        "ip_banned",
        "abuse_alert",
        "rate_limit_spike",
        "credits_low",
    }


def test_init_app_registers_the_extension():
    from flask import Flask

    app = Flask(__name__)
    notifier = Notifier(make_config(1, email_enabled=False))
    notifier.init_app(app)
    assert app.extensions["notifier"] is notifier
