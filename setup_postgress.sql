-- PostgreSQL schema for the API rate limiter (schema version 3).
--
-- The application creates and migrates this schema by itself on start-up (and with
-- `python database.py`); this script is for DBAs who provision the database by hand.
-- It must stay identical to the SQLAlchemy metadata in database.py: a test applies it
-- to a fresh database and compares the two.
--
-- One-time provisioning, as a superuser (adjust names and the password):
--   CREATE ROLE ratelimiter LOGIN PASSWORD 'change-me';
--   CREATE DATABASE ratelimiter OWNER ratelimiter;
-- then, connected to that database as its owner:
--   psql "postgresql://ratelimiter:change-me@127.0.0.1:5432/ratelimiter" -f setup_postgress.sql
-- and point the service at it:
--   DATABASE_URL=postgresql+psycopg2://ratelimiter:change-me@127.0.0.1:5432/ratelimiter

BEGIN;

CREATE TABLE users (
    id            SERIAL PRIMARY KEY,
    username      VARCHAR(64)  NOT NULL UNIQUE,
    email         VARCHAR(254),
    password_hash VARCHAR(128) NOT NULL,
    tier          VARCHAR(16)  NOT NULL DEFAULT 'free',
    is_admin      BOOLEAN      NOT NULL DEFAULT false,
    created_at    TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    updated_at    TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    CONSTRAINT ck_users_tier CHECK (tier IN ('free', 'basic', 'premium', 'enterprise'))
);

-- API keys are stored only as a SHA-256 hash; the prefix is the visible identifier.
CREATE TABLE api_keys (
    id             SERIAL PRIMARY KEY,
    user_id        INTEGER      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    prefix         VARCHAR(32)  NOT NULL UNIQUE,
    key_hash       VARCHAR(64)  NOT NULL UNIQUE,
    name           VARCHAR(100) NOT NULL DEFAULT '',
    blocked        BOOLEAN      NOT NULL DEFAULT false,
    blocked_reason VARCHAR(500),
    revoked_at     TIMESTAMP WITHOUT TIME ZONE,
    created_at     TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    last_used_at   TIMESTAMP WITHOUT TIME ZONE,
    expires_at     TIMESTAMP WITHOUT TIME ZONE,
    credits        INTEGER,
    credit_refill_amount INTEGER,
    credit_refill_every  VARCHAR(8)
);
CREATE INDEX ix_api_keys_user_id ON api_keys (user_id);

-- One row per refresh token; a family is one login, revoked as a whole on token reuse.
CREATE TABLE refresh_tokens (
    jti        VARCHAR(64) PRIMARY KEY,
    family_id  VARCHAR(64) NOT NULL,
    user_id    INTEGER     NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    issued_at  TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    used_at    TIMESTAMP WITHOUT TIME ZONE,
    revoked_at TIMESTAMP WITHOUT TIME ZONE
);
CREATE INDEX ix_refresh_tokens_family_id ON refresh_tokens (family_id);
CREATE INDEX ix_refresh_tokens_user_id ON refresh_tokens (user_id);

-- Revoked access tokens until they expire (mirrored into the limiter store).
CREATE TABLE revoked_tokens (
    jti        VARCHAR(64) PRIMARY KEY,
    user_id    INTEGER,
    expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    revoked_at TIMESTAMP WITHOUT TIME ZONE NOT NULL
);
CREATE INDEX ix_revoked_tokens_expires_at ON revoked_tokens (expires_at);

-- Allowed / limited requests per subject (k:<key id> or u:<user id>) and UTC minute.
CREATE TABLE usage_counters (
    subject      VARCHAR(64) NOT NULL,
    bucket_start TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    key_id       INTEGER,
    user_id      INTEGER,
    tier         VARCHAR(16) NOT NULL,
    allowed      INTEGER     NOT NULL DEFAULT 0,
    limited      INTEGER     NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, bucket_start)
);
CREATE INDEX ix_usage_counters_bucket_start ON usage_counters (bucket_start);
CREATE INDEX ix_usage_counters_key_id ON usage_counters (key_id);
CREATE INDEX ix_usage_counters_user_id ON usage_counters (user_id);

CREATE TABLE request_logs (
    id          SERIAL PRIMARY KEY,
    timestamp   TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    level       VARCHAR(10)  NOT NULL,
    method      VARCHAR(10)  NOT NULL,
    path        VARCHAR(500) NOT NULL,
    status      INTEGER      NOT NULL,
    ip          VARCHAR(64),
    key_prefix  VARCHAR(32),
    user_id     INTEGER,
    duration_ms FLOAT        NOT NULL,
    message     VARCHAR(500) NOT NULL DEFAULT ''
);
CREATE INDEX ix_request_logs_timestamp ON request_logs (timestamp);

CREATE TABLE audit_log (
    id        SERIAL PRIMARY KEY,
    timestamp TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    actor     VARCHAR(100) NOT NULL,
    action    VARCHAR(50)  NOT NULL,
    target    VARCHAR(200) NOT NULL,
    details   TEXT         NOT NULL DEFAULT '{}'
);
CREATE INDEX ix_audit_log_timestamp ON audit_log (timestamp);

CREATE TABLE ip_bans (
    id         SERIAL PRIMARY KEY,
    ip         VARCHAR(64)  NOT NULL,
    banned_at  TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    ban_count  INTEGER      NOT NULL DEFAULT 1,
    reason     VARCHAR(200) NOT NULL DEFAULT '',
    lifted_at  TIMESTAMP WITHOUT TIME ZONE
);
CREATE INDEX ix_ip_bans_ip ON ip_bans (ip);

CREATE TABLE alerts (
    id        SERIAL PRIMARY KEY,
    timestamp TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    kind      VARCHAR(50)  NOT NULL,
    source    VARCHAR(200) NOT NULL,
    severity  VARCHAR(10)  NOT NULL DEFAULT 'warning',
    details   TEXT         NOT NULL DEFAULT '{}'
);
CREATE INDEX ix_alerts_timestamp ON alerts (timestamp);

-- Runtime limit overrides set by an admin, for one key or for a user and all their keys.
CREATE TABLE rate_overrides (
    id         SERIAL PRIMARY KEY,
    key_id     INTEGER REFERENCES api_keys (id) ON DELETE CASCADE,
    user_id    INTEGER REFERENCES users (id) ON DELETE CASCADE,
    limits     TEXT         NOT NULL,
    reason     VARCHAR(500) NOT NULL DEFAULT '',
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    created_by VARCHAR(100) NOT NULL,
    expires_at TIMESTAMP WITHOUT TIME ZONE
);
CREATE INDEX ix_rate_overrides_key_id ON rate_overrides (key_id);
CREATE INDEX ix_rate_overrides_user_id ON rate_overrides (user_id);

CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       VARCHAR(100) NOT NULL,
    applied_at TIMESTAMP WITHOUT TIME ZONE NOT NULL
);
-- Version 2 changes SQLite only (AUTOINCREMENT): SERIAL sequences never hand out an id twice.
INSERT INTO schema_migrations (version, name, applied_at)
VALUES (1, 'initial schema', (now() AT TIME ZONE 'utc')),
       (2, 'ids never reused (SQLite AUTOINCREMENT)', (now() AT TIME ZONE 'utc')),
       (3, 'key expiry, credits, rate overrides', (now() AT TIME ZONE 'utc'));

COMMIT;
