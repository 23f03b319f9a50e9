"""One configuration object, read from the environment with explicit coercion.

Every variable of the API contract is read here and nowhere else. ``Config.from_env``
never touches the network or the disk; ``Config.validate`` raises ``ConfigError`` with a
one-line message that entry points print before exiting non-zero.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

from redis_wire import parse_store_url, redact_url
from store import CLUSTER, MEMORY, url_kind, valid_schemes

log = logging.getLogger(__name__)

TIER_ORDER: tuple[str, ...] = ("free", "basic", "premium", "enterprise")  # the one list of tier names
DEFAULT_TIER = TIER_ORDER[0]  # new accounts; the limit of an unknown or missing tier
DEFAULT_TIER_LIMITS: dict[str, int] = dict(zip(TIER_ORDER, (5, 20, 100, 1000), strict=True))
STRATEGIES: tuple[str, ...] = ("sliding_window", "sliding_window_counter", "fixed_window", "gcra")
FAIL_MODES: tuple[str, ...] = ("memory", "open", "closed")
# Coarser than a /32 (an ISP's whole allocation) would put unrelated networks in one subject.
MIN_IPV6_PREFIX = 32


class ConfigError(ValueError):
    """The environment describes a configuration the service cannot run with."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (true/false), got {raw!r}")


def _number(env: Mapping[str, str], name: str, default: Any, minimum: Any, kind: type) -> Any:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {noun}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, minimum, int)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum, float)


def _ipv6_prefix(env: Mapping[str, str]) -> int:
    value = _int(env, "IPV6_PREFIX_LENGTH", 64, MIN_IPV6_PREFIX)
    if value > 128:
        raise ConfigError(f"IPV6_PREFIX_LENGTH must be between {MIN_IPV6_PREFIX} and 128, got {value}")
    return value


def parse_tier_limits(raw: str | None) -> dict[str, int]:
    """Parse ``free=5,basic=20`` into a dict over the defaults; unknown tiers are errors."""
    limits = dict(DEFAULT_TIER_LIMITS)
    if not raw or not raw.strip():
        return limits
    for part in raw.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in limits:
            raise ConfigError(
                f"TIER_LIMITS entry {part.strip()!r} must be tier=N with tier in {', '.join(TIER_ORDER)}"
            )
        try:
            limits[name] = int(value)
        except ValueError:
            raise ConfigError(f"TIER_LIMITS value for {name} must be an integer, got {value!r}") from None
        if limits[name] < 1:
            raise ConfigError(f"TIER_LIMITS value for {name} must be >= 1")
    return limits


def _csv(raw: str | None) -> list[str]:
    return [item.strip() for item in (raw or "").split(",") if item.strip()]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one API process. Frozen: config is not changed after setup."""

    env: str = "development"
    testing: bool = False
    jwt_secret_key: str = ""
    jwt_secret_generated: bool = False
    admin_token: str | None = None
    bcrypt_rounds: int = 12
    access_token_ttl: int = 15 * 60
    refresh_token_ttl: int = 7 * 24 * 3600
    database_url: str = "sqlite:///ratelimiter.db"
    redis_url: str | None = None
    storage_url: str = "memory://"
    strategy: str = "sliding_window"
    key_prefix: str = "rl"
    fail_mode: str = "memory"
    refusal_cache: bool = True
    tier_limits: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TIER_LIMITS))
    policy_path: str | None = None  # RATELIMIT_POLICY: TOML policy file (policy.py), read by create_app
    window_seconds: int = 60
    ip_rate_limit: int = 100
    ip_window: int = 60
    temp_ban_seconds: int = 300
    ban_multiplier: float = 2.0
    trusted_proxies: int = 0
    # IPv6 clients are one subject per network of this many leading bits (a /64 is one host's LAN).
    ipv6_prefix_length: int = 64
    cors_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    enable_socketio: bool = True
    port: int = 5000
    log_dir: str = "logs"
    log_level: str = "INFO"
    log_retention_days: int = 14
    log_max_bytes: int = 10 * 1024 * 1024
    log_backup_count: int = 5
    geoip_db_path: str | None = None
    max_content_length: int = 64 * 1024
    web_concurrency: int = 1
    flush_interval: float = 1.0
    # Abuse detection thresholds: events per window from one source.
    abuse_window_seconds: int = 300
    abuse_failed_logins: int = 20
    abuse_invalid_keys: int = 20
    abuse_429_storm: int = 50
    abuse_auto_ban: bool = False
    # Registration throttle per IP per hour (resource consumption guard).
    register_per_ip_per_hour: int = 20
    login_failures_per_ip: int = 10
    login_failure_window: int = 300
    # E-mail
    email_enabled: bool = False
    smtp_host: str = "localhost"
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_use_tls: bool = True
    smtp_use_ssl: bool = False
    smtp_timeout_seconds: float = 10.0
    email_from: str = "ratelimiter@localhost"
    alert_email_to: list[str] = dataclasses.field(default_factory=list)
    email_event_cooldown_seconds: int = 300

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def store_kind(self) -> str:
        return "memory" if url_kind(self.storage_url) == MEMORY else "redis"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``environ`` (default ``os.environ``) plus keyword overrides."""
        env = os.environ if environ is None else environ
        flask_env = (env.get("FLASK_ENV") or "development").strip().lower()
        secret = env.get("JWT_SECRET_KEY") or ""
        generated = False
        if not secret and flask_env != "production":
            secret = secrets.token_urlsafe(48)
            generated = True
        database_url = env.get("DATABASE_URL") or f"sqlite:///{env.get('DB_PATH') or 'ratelimiter.db'}"
        redis_url = env.get("REDIS_URL") or None
        cors = _csv(env.get("CORS_ORIGINS")) or ["*"]
        smtp_tls = _bool(env, "SMTP_USE_TLS", True)
        smtp_ssl = _bool(env, "SMTP_USE_SSL", False)
        email_enabled = _bool(env, "EMAIL_NOTIFICATIONS_ENABLED", False)
        socketio = _bool(env, "ENABLE_SOCKETIO", flask_env != "production")
        auto_ban = _bool(env, "ABUSE_AUTO_BAN", False)
        values: dict[str, Any] = dict(
            env=flask_env,
            jwt_secret_key=secret,
            jwt_secret_generated=generated,
            admin_token=env.get("ADMIN_TOKEN") or None,
            bcrypt_rounds=_int(env, "BCRYPT_ROUNDS", 12, 4),
            access_token_ttl=_int(env, "ACCESS_TOKEN_TTL", 15 * 60, 1),
            refresh_token_ttl=_int(env, "REFRESH_TOKEN_TTL", 7 * 24 * 3600, 1),
            database_url=database_url,
            redis_url=redis_url,
            storage_url=redis_url or "memory://",
            strategy=(env.get("RATELIMIT_STRATEGY") or "sliding_window").strip().lower(),
            key_prefix=(env.get("RATELIMIT_KEY_PREFIX") or "rl").strip(),
            fail_mode=(env.get("RATELIMIT_FAIL_MODE") or "memory").strip().lower(),
            refusal_cache=_bool(env, "RATELIMIT_REFUSAL_CACHE", True),
            tier_limits=parse_tier_limits(env.get("TIER_LIMITS")),
            policy_path=(env.get("RATELIMIT_POLICY") or "").strip() or None,
            window_seconds=_int(env, "RATELIMIT_WINDOW", 60, 1),
            ip_rate_limit=_int(env, "IP_RATE_LIMIT", 100, 1),
            ip_window=_int(env, "IP_WINDOW", 60, 1),
            temp_ban_seconds=_int(env, "TEMP_BAN_SECONDS", 300, 1),
            ban_multiplier=_float(env, "BAN_MULTIPLIER", 2.0, 1.0),
            trusted_proxies=_int(env, "TRUSTED_PROXIES", 0, 0),
            ipv6_prefix_length=_ipv6_prefix(env),
            cors_origins=cors,
            enable_socketio=socketio,
            port=_int(env, "PORT", 5000, 1),
            log_dir=env.get("LOG_DIR") or "logs",
            log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
            log_retention_days=_int(env, "LOG_RETENTION_DAYS", 14, 1),
            log_max_bytes=_int(env, "LOG_MAX_BYTES", 10 * 1024 * 1024, 1024),
            log_backup_count=_int(env, "LOG_BACKUP_COUNT", 5, 0),
            geoip_db_path=env.get("GEOIP_DB_PATH") or None,
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 64 * 1024, 1024),
            web_concurrency=_int(env, "WEB_CONCURRENCY", 1, 1),
            flush_interval=_float(env, "ANALYTICS_FLUSH_SECONDS", 1.0, 0.05),
            abuse_window_seconds=_int(env, "ABUSE_WINDOW_SECONDS", 300, 1),
            abuse_failed_logins=_int(env, "ABUSE_FAILED_LOGINS", 20, 1),
            abuse_invalid_keys=_int(env, "ABUSE_INVALID_KEYS", 20, 1),
            abuse_429_storm=_int(env, "ABUSE_429_STORM", 50, 1),
            abuse_auto_ban=auto_ban,
            register_per_ip_per_hour=_int(env, "REGISTER_PER_IP_PER_HOUR", 20, 1),
            login_failures_per_ip=_int(env, "LOGIN_FAILURES_PER_IP", 10, 1),
            login_failure_window=_int(env, "LOGIN_FAILURE_WINDOW", 300, 1),
            email_enabled=email_enabled,
            smtp_host=env.get("SMTP_HOST") or "localhost",
            smtp_port=_int(env, "SMTP_PORT", 465 if smtp_ssl else 587, 1),
            smtp_username=env.get("SMTP_USERNAME") or None,
            smtp_password=env.get("SMTP_PASSWORD") or None,
            smtp_use_tls=smtp_tls and not smtp_ssl,
            smtp_use_ssl=smtp_ssl,
            smtp_timeout_seconds=_float(env, "SMTP_TIMEOUT_SECONDS", 10.0, 0.1),
            email_from=env.get("EMAIL_FROM") or "ratelimiter@localhost",
            alert_email_to=_csv(env.get("ALERT_EMAIL_TO")),
            email_event_cooldown_seconds=_int(env, "EMAIL_EVENT_COOLDOWN_SECONDS", 300, 0),
        )
        if "jwt_secret_key" in overrides:
            values["jwt_secret_generated"] = False
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def validate(self) -> Config:
        """Raise ConfigError on settings the service must not start with; return self."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"RATELIMIT_STRATEGY must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.fail_mode not in FAIL_MODES:
            raise ConfigError(f"RATELIMIT_FAIL_MODE must be one of {', '.join(FAIL_MODES)}, got {self.fail_mode!r}")
        kind = url_kind(self.storage_url)
        if kind is None:
            shown = redact_url(self.storage_url)
            raise ConfigError(f"REDIS_URL must start with one of {valid_schemes()}, got {shown!r}")
        if kind != MEMORY:
            try:
                parse_store_url(self.storage_url)
            except ValueError as exc:
                raise ConfigError(f"REDIS_URL: {exc}") from None
        if not MIN_IPV6_PREFIX <= self.ipv6_prefix_length <= 128:
            raise ConfigError(f"IPV6_PREFIX_LENGTH must be between {MIN_IPV6_PREFIX} and 128, "
                              f"got {self.ipv6_prefix_length}")
        if self.policy_path and kind == CLUSTER:
            raise ConfigError("RATELIMIT_POLICY is not supported with a redis+cluster:// store yet; "
                              "use one Redis or redis+sentinel://")
        if self.env not in ("development", "production", "testing"):
            raise ConfigError(f"FLASK_ENV must be development or production, got {self.env!r}")
        if self.production:
            if len(self.jwt_secret_key.encode()) < 32:
                raise ConfigError("JWT_SECRET_KEY must be set to at least 32 bytes when FLASK_ENV=production")
            if not self.admin_token:
                raise ConfigError("ADMIN_TOKEN must be set when FLASK_ENV=production")
            if self.web_concurrency > 1 and self.store_kind == "memory":
                raise ConfigError(
                    f"{self.web_concurrency} workers (gunicorn -w or WEB_CONCURRENCY) needs REDIS_URL in production: "
                    "per-process counters multiply every limit"
                )
        if self.email_enabled and not self.alert_email_to:
            raise ConfigError("EMAIL_NOTIFICATIONS_ENABLED=true needs ALERT_EMAIL_TO")
        return self
