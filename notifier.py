"""E-mail notifications for admin actions, bans and abuse alerts, sent off the request path.

``Notifier.notify`` only checks the cooldown and puts the event on a bounded queue; a daemon
thread builds the message and sends it over SMTP (plain, STARTTLS or implicit TLS), retrying
with exponential backoff. Delivery failures are logged and counted, never raised.
"""

from __future__ import annotations

import collections
import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any

from log_manager import mask_api_key, utc_iso

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger(__name__)

TIER_CHANGED = "tier_changed"
KEY_BLOCKED = "key_blocked"
KEY_UNBLOCKED = "key_unblocked"
KEY_BANNED = "key_banned"
IP_BANNED = "ip_banned"
ABUSE_ALERT = "abuse_alert"
RATE_LIMIT_SPIKE = "rate_limit_spike"
CREDITS_LOW = "credits_low"
EVENT_TITLES: dict[str, str] = {
    TIER_CHANGED: "Tier changed",
    KEY_BLOCKED: "Key blocked",
    KEY_UNBLOCKED: "Key unblocked",
    KEY_BANNED: "Key banned",
    IP_BANNED: "IP banned",
    ABUSE_ALERT: "Abuse alert",
    RATE_LIMIT_SPIKE: "Rate-limit spike",
    CREDITS_LOW: "Credits running low",
}
EVENTS: tuple[str, ...] = tuple(EVENT_TITLES)
# Admin actions that are audited and shown on the live feed but not e-mailed.
USER_DELETED = "user_deleted"
IP_UNBANNED = "ip_unbanned"
OVERRIDE_CREATED = "override_created"
OVERRIDE_DELETED = "override_deleted"
CREDITS_SET = "credits_set"
FEED_ONLY_EVENTS: tuple[str, ...] = (USER_DELETED, IP_UNBANNED, OVERRIDE_CREATED, OVERRIDE_DELETED, CREDITS_SET)
SUBJECT_TAG = "[RateLimiter]"

Sender = Callable[[EmailMessage], None]
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


def header_safe(value: object) -> str:
    """``value`` as one header-safe line: CR, LF and other control characters become a space."""
    return _HEADER_UNSAFE.sub(" ", str(value)).strip()


def format_subject(event: str, subject: str) -> str:
    """The Subject header, e.g. ``[RateLimiter] Key blocked: rl_ab12cd34``."""
    return header_safe(f"{SUBJECT_TAG} {EVENT_TITLES[event]}: {mask_api_key(str(subject))}")


def format_body(event: str, subject: str, details: Mapping[str, str], timestamp: str) -> str:
    """Plain-text body listing the event and every detail, one ``name: value`` per line."""
    lines = [
        f"{EVENT_TITLES[event]}: {subject}",
        "",
        f"event:   {event}",
        f"subject: {subject}",
        f"time:    {timestamp}",
    ]
    if details:
        lines += ["", "Details:"]
        for name, value in details.items():
            lines.append(f"  {name}: " + value.replace("\n", "\n    "))
    lines += ["", "-- ", "Sent by the API Rate Limiter notifier."]
    return mask_api_key("\n".join(lines)) + "\n"


def is_permanent(exc: BaseException) -> bool:
    """True for failures a retry cannot fix: a 5xx reply, refused addresses, a missing extension."""
    if isinstance(exc, smtplib.SMTPNotSupportedError | smtplib.SMTPRecipientsRefused):
        return True
    return isinstance(exc, smtplib.SMTPResponseException) and 500 <= exc.smtp_code < 600


class SmtpSender:
    """Sends one message per connection with the SMTP settings of a Config.

    Implicit TLS when ``smtp_use_ssl``, STARTTLS when ``smtp_use_tls``, plain otherwise; logs in
    when a username is set. ``ssl_context`` defaults to the system trust store.
    """

    def __init__(self, config: Config, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._host = config.smtp_host
        self._port = config.smtp_port
        self._timeout = config.smtp_timeout_seconds
        self._use_ssl = config.smtp_use_ssl
        self._use_tls = config.smtp_use_tls and not config.smtp_use_ssl
        self._username = config.smtp_username
        self._password = config.smtp_password or ""
        self._context = ssl_context

    def __call__(self, message: EmailMessage) -> None:
        context = self._context or ssl.create_default_context()
        if self._use_ssl:
            client: smtplib.SMTP = smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout, context=context)
        else:
            client = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        with client:
            if self._use_tls:
                client.starttls(context=context)
            if self._username:
                client.login(self._username, self._password)
            client.send_message(message)

    def redact(self, text: str) -> str:
        """``text`` with the SMTP password removed, for log lines about failures."""
        return text.replace(self._password, "***") if self._password else text


class Notifier:
    """Queues notification e-mails and sends them from one daemon thread.

    Cooldown: an (event, subject) pair that was queued less than ``email_event_cooldown_seconds``
    ago (by ``clock``) is suppressed. ``attempts`` sends are tried per message, waiting
    ``backoff``, then twice that, and so on between them.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        sender: Sender | None = None,
        attempts: int = 3,
        backoff: float = 0.5,
        max_queue: int = 1000,
        sleep: Callable[[float], None] = time.sleep,
        autostart: bool = True,
    ) -> None:
        self.enabled = bool(config.email_enabled and config.alert_email_to)
        if config.email_enabled and not config.alert_email_to:
            log.warning("EMAIL_NOTIFICATIONS_ENABLED is set but ALERT_EMAIL_TO is empty: e-mail stays off")
        self._from = header_safe(config.email_from)
        self._to = [header_safe(addr) for addr in config.alert_email_to if header_safe(addr)]
        self._domain = self._from.rpartition("@")[2] or "localhost"
        self._cooldown = config.email_event_cooldown_seconds
        self._clock = clock
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._max_queue = max_queue
        self._sleep = sleep
        self._sender: Sender | None = None
        self._queue: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._last_queued: dict[tuple[str, str], float] = {}
        self._counts = dict(sent=0, failed=0, suppressed=0, dropped=0, disabled=0, invalid=0)
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._sender = sender if sender is not None else SmtpSender(config)
            self._thread = threading.Thread(target=self._run, name="email-notifier", daemon=True)
            if autostart:
                self.start()

    def start(self) -> None:
        """Start the sender thread (once, and only when e-mail is enabled); until then mail only queues."""
        with self._cond:
            if self._thread is None or self._thread.ident is not None or self._closed:
                return
            self._thread.start()

    def init_app(self, app: Any) -> None:
        """Register as ``app.extensions["notifier"]`` (Flask extension style)."""
        app.extensions["notifier"] = self

    def notify(self, event: str, subject: str, details: Mapping[str, Any] | None = None) -> bool:
        """Queue an e-mail about ``event`` concerning ``subject`` (a key prefix, an IP, a user).

        Never blocks, never raises and never sends on the caller's thread. Returns False when
        e-mail is disabled, the (event, subject) pair is in its cooldown, the queue is full or
        closed, or ``event`` is not one of EVENTS (logged as an error: a programming mistake
        must not turn an admin action that already happened into a 500).
        """
        if event not in EVENT_TITLES:
            log.error("unknown notification event %r; expected one of %s", event, ", ".join(EVENTS))
            self._count("invalid")
            return False
        with self._cond:
            if not self.enabled:
                self._counts["disabled"] += 1
                return False
            now = self._clock()
            key = (event, str(subject))
            if self._in_cooldown(key, now):
                self._counts["suppressed"] += 1
                return False
            if self._closed or len(self._queue) >= self._max_queue:
                self._counts["dropped"] += 1
                return False
            self._last_queued[key] = now
            texts = {str(k): str(v) for k, v in (details or {}).items()}
            self._queue.append((event, str(subject), texts, now))
            self._cond.notify()
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Send what is queued, then stop the thread; True when it stopped within ``timeout``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is None or self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Counters: sent, failed, suppressed, dropped, disabled, invalid, and queued (waiting now)."""
        with self._cond:
            return dict(self._counts, queued=len(self._queue))

    def build_message(self, event: str, subject: str, details: Mapping[str, str], when: float) -> EmailMessage:
        """The e-mail for one event: From, all recipients in To, a tagged Subject, a plain-text body."""
        message = EmailMessage()
        message["From"] = self._from
        message["To"] = ", ".join(self._to)
        message["Subject"] = format_subject(event, subject)
        message["Date"] = formatdate(when, usegmt=True)
        message["Message-ID"] = make_msgid(domain=self._domain)
        message.set_content(format_body(event, subject, details, utc_iso(when)))
        return message

    def _in_cooldown(self, key: tuple[str, str], now: float) -> bool:
        last = self._last_queued.get(key)
        if last is not None and now - last < self._cooldown:
            return True
        if len(self._last_queued) > 10_000:  # keep memory bounded: forget pairs whose cooldown is over
            self._last_queued = {k: t for k, t in self._last_queued.items() if now - t < self._cooldown}
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
            self._deliver(*item)

    def _deliver(self, event: str, subject: str, details: Mapping[str, str], when: float) -> None:
        try:
            message = self.build_message(event, subject, details, when)
        except Exception:
            log.exception("could not build the %s e-mail", event)
            self._count("failed")
            return
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                self._send(message)
            except Exception as exc:  # any failure is logged and counted, never raised
                self._log_failure(event, attempt, exc)
                if is_permanent(exc):
                    break
                if attempt < self._attempts:
                    self._sleep(delay)
                    delay *= 2
                continue
            self._count("sent")
            log.info("sent %s e-mail to %d recipient(s)", event, len(self._to))
            return
        self._count("failed")
        log.error("giving up on the %s e-mail about %s", event, mask_api_key(subject))

    def _send(self, message: EmailMessage) -> None:
        if self._sender is None:
            raise RuntimeError("no sender: e-mail is disabled")
        self._sender(message)

    def _log_failure(self, event: str, attempt: int, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        redact = getattr(self._sender, "redact", None)
        if callable(redact):
            text = redact(text)
        log.warning("sending the %s e-mail failed (attempt %d of %d): %s", event, attempt, self._attempts, text)

    def _count(self, name: str) -> None:
        with self._cond:
            self._counts[name] += 1
