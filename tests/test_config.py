"""Config: every variable is read with explicit coercion and a clear error."""

from __future__ import annotations

import pytest

from config import DEFAULT_TIER_LIMITS, Config, ConfigError, parse_tier_limits

SECRET = "s" * 32


def test_defaults_match_the_contract():
    config = Config.from_env({})
    assert config.tier_limits == DEFAULT_TIER_LIMITS == {"free": 5, "basic": 20, "premium": 100, "enterprise": 1000}
    assert (config.ip_rate_limit, config.ip_window, config.temp_ban_seconds, config.ban_multiplier) == (100, 60, 300, 2)
    assert config.trusted_proxies == 0 and config.cors_origins == ["*"] and config.enable_socketio is True
    assert config.database_url == "sqlite:///ratelimiter.db" and config.storage_url == "memory://"
    assert config.strategy == "sliding_window" and config.fail_mode == "memory" and config.port == 5000
    assert config.jwt_secret_generated and len(config.jwt_secret_key) >= 32


def test_database_url_wins_over_db_path_and_redis_sets_the_store():
    config = Config.from_env({"DB_PATH": "x.db", "DATABASE_URL": "postgresql://h/db", "REDIS_URL": "redis://h:1/0"})
    assert config.database_url == "postgresql://h/db"
    assert config.storage_url == "redis://h:1/0" and config.store_kind == "redis"
    assert Config.from_env({"DB_PATH": "/tmp/a.db"}).database_url == "sqlite:////tmp/a.db"


def test_tier_limits_override_and_errors():
    assert parse_tier_limits("free=10, premium=500")["free"] == 10
    assert parse_tier_limits("free=10, premium=500")["basic"] == 20
    for bad in ("gold=5", "free", "free=x", "free=0"):
        with pytest.raises(ConfigError, match="TIER_LIMITS"):
            parse_tier_limits(bad)


def test_cors_origins_and_alert_recipients_are_comma_lists():
    config = Config.from_env({"CORS_ORIGINS": "https://a.example, https://b.example",
                              "ALERT_EMAIL_TO": "ops@x.io,sec@x.io"})
    assert config.cors_origins == ["https://a.example", "https://b.example"]
    assert config.alert_email_to == ["ops@x.io", "sec@x.io"]


@pytest.mark.parametrize("raw, expected", [("true", True), ("1", True), ("off", False), ("NO", False)])
def test_booleans(raw, expected):
    assert Config.from_env({"ENABLE_SOCKETIO": raw}).enable_socketio is expected


@pytest.mark.parametrize("env, message", [
    ({"IP_WINDOW": "0"}, "IP_WINDOW must be >= 1"),
    ({"BAN_MULTIPLIER": "half"}, "BAN_MULTIPLIER must be a number"),
    ({"TRUSTED_PROXIES": "-1"}, "TRUSTED_PROXIES must be >= 0"),
    ({"SMTP_USE_SSL": "sometimes"}, "boolean"),
])
def test_bad_values_raise_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_production_requires_secret_and_admin_token_and_redis_for_workers():
    with pytest.raises(ConfigError, match="JWT_SECRET_KEY"):
        Config.from_env({"FLASK_ENV": "production", "ADMIN_TOKEN": "t"}).validate()
    with pytest.raises(ConfigError, match="ADMIN_TOKEN"):
        Config.from_env({"FLASK_ENV": "production", "JWT_SECRET_KEY": SECRET}).validate()
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config.from_env({"FLASK_ENV": "production", "JWT_SECRET_KEY": SECRET, "ADMIN_TOKEN": "t",
                         "WEB_CONCURRENCY": "2"}).validate()
    ok = Config.from_env({"FLASK_ENV": "production", "JWT_SECRET_KEY": SECRET, "ADMIN_TOKEN": "t",
                          "WEB_CONCURRENCY": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"}).validate()
    assert ok.production and ok.enable_socketio is False


def test_smtp_ssl_switches_default_port_and_disables_starttls():
    config = Config.from_env({"SMTP_USE_SSL": "true"})
    assert config.smtp_port == 465 and config.smtp_use_ssl and not config.smtp_use_tls


def test_email_enabled_needs_recipients():
    with pytest.raises(ConfigError, match="ALERT_EMAIL_TO"):
        Config.from_env({"EMAIL_NOTIFICATIONS_ENABLED": "true"}).validate()


@pytest.mark.parametrize("raw, message", [
    ("abc", "IPV6_PREFIX_LENGTH must be an integer"),
    ("16", "IPV6_PREFIX_LENGTH must be >= 32"),
    ("129", "IPV6_PREFIX_LENGTH must be between 32 and 128"),
])
def test_ipv6_prefix_length_is_validated_with_a_one_line_error(raw, message):
    assert Config.from_env({}).ipv6_prefix_length == 64
    assert Config.from_env({"IPV6_PREFIX_LENGTH": "56"}).ipv6_prefix_length == 56
    with pytest.raises(ConfigError, match=message) as caught:
        Config.from_env({"IPV6_PREFIX_LENGTH": raw})
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="IPV6_PREFIX_LENGTH"):
        Config.from_env({}, ipv6_prefix_length=200).validate()
