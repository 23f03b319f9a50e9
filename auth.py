"""Authentication: password hashing, JWTs with rotation and revocation, API keys, decorators.

``JWTManager`` is a Flask extension (state in ``app.extensions["jwt"]``). Tokens are HS256
only, carry ``exp``/``iat``/``jti``/``sub`` and a ``type`` claim so an access token can never
be used as a refresh token or the other way round. Refresh tokens rotate: each is good for
one use, and presenting a spent one revokes every token of that login ("family").
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import bcrypt
import jwt
import sqlalchemy as sa
from flask import Flask, current_app, g, request

import database as db
from errors import ApiError

if TYPE_CHECKING:
    from config import Config
    from limiter import RateLimiter
    from wiring import Services

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
ISSUER = "ratelimiter"
API_KEY_SCHEME = "rl"
MAX_PASSWORD_CHARS = 1024
EPOCH = dt.datetime(1970, 1, 1)
STAMP_RE = re.compile(r"[0-9a-f]{1,16}")
# Present in the store while it holds every revocation: written after re-seeding them from the
# database, gone with the data when the store restarts empty, fails over or is flushed.
SEEDED_FLAG = "revocations-seeded"
SEEDED_TTL = 7 * 86400
REVOCATION_SYNC_SECONDS = 2.0  # how stale a process's copy of the revocations may get
REVOCATION_SYNC_SLACK = dt.timedelta(seconds=60)  # rows committed late, clocks of other hosts


# --- passwords ------------------------------------------------------------------------------

def _prehash(password: str) -> bytes:
    """SHA-256 then base64, so passwords of any length fit bcrypt's 72-byte input exactly."""
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def hash_password(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds)).decode("ascii")


def check_password(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(_prehash(password), hashed.encode("ascii"))
    except ValueError:
        return False


# --- API keys ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NewApiKey:
    """A freshly generated key: the full secret (shown once), its visible prefix and hash."""

    key: str
    prefix: str
    key_hash: str


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> NewApiKey:
    """``rl_<8 hex>_<43 chars from 32 random bytes>``; only the SHA-256 hash is stored."""
    prefix = f"{API_KEY_SCHEME}_{secrets.token_hex(4)}"
    key = f"{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(key=key, prefix=prefix, key_hash=hash_api_key(key))


def looks_like_api_key(value: str) -> bool:
    return value.startswith(f"{API_KEY_SCHEME}_") and 20 <= len(value) <= 128


# --- tokens --------------------------------------------------------------------------------

def account_stamp(created_at: dt.datetime) -> str:
    """What binds a token to one account: its creation time in microseconds, in hex (claim ``gen``).

    A user id alone does not name one account for ever (a restored backup, or SQLite before
    AUTOINCREMENT, can hand a deleted account's id to a new one); a new account never has the
    creation time of the deleted one, so the deleted account's tokens do not open it."""
    return format((created_at - EPOCH) // dt.timedelta(microseconds=1), "x")


def account_gone() -> ApiError:
    return ApiError(401, "invalid_token", "The account of this token no longer exists")


class RevocationMirror:
    """This process's copy of the revocations in the database, refreshed at most every
    ``interval`` seconds of ``clock`` (only rows revoked since the last refresh are read).

    The store's flags are the fast path every worker sees at once; this copy is what makes a
    revocation hold when the store forgets a flag (eviction) without forgetting everything."""

    def __init__(self, clock: Callable[[], float] = time.time, interval: float = REVOCATION_SYNC_SECONDS) -> None:
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        self._expires: dict[str, dt.datetime] = {}
        self._synced_at = -float("inf")
        self._high_water: dt.datetime | None = None  # latest revoked_at seen

    def add(self, jti: str, expires: dt.datetime) -> None:
        with self._lock:
            self._expires[jti] = expires

    def contains(self, engine: sa.Engine, jti: str) -> bool:
        now = self._clock()
        if not 0 <= now - self._synced_at < self._interval:
            self.sync(engine)
        with self._lock:
            return jti in self._expires

    def sync(self, engine: sa.Engine, *, full: bool = False) -> None:
        """Read revocations made since the last sync (all unexpired ones on the first, or ``full``)."""
        c = db.revoked_tokens.c
        now = db.utcnow()
        query = sa.select(c.jti, c.expires_at, c.revoked_at).where(c.expires_at > now)
        with self._lock:
            since = None if full or self._high_water is None else self._high_water - REVOCATION_SYNC_SLACK
            self._synced_at = self._clock()
        if since is not None:
            query = query.where(c.revoked_at >= since)
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        with self._lock:
            for jti, expires, revoked in rows:
                self._expires[jti] = expires
                if self._high_water is None or revoked > self._high_water:
                    self._high_water = revoked
            if self._high_water is None:
                self._high_water = now - REVOCATION_SYNC_SLACK
            for jti in [j for j, expires in self._expires.items() if expires <= now]:
                del self._expires[jti]


class JWTManager:
    """Issues and checks tokens; keeps refresh families and revocations in the database and
    mirrors revocations into the limiter's shared store so every worker sees them at once."""

    def __init__(self, app: Flask | None = None, services: Services | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._services: Services | None = None
        if app is not None and services is not None:
            self.init_app(app, services, clock=clock)

    def init_app(self, app: Flask, services: Services, *, clock: Callable[[], float] = time.time) -> None:
        """Serve ``app`` with the config, database and limiter store of ``services`` (one manager per app,
        as create_app makes it)."""
        self._services = services
        app.extensions["jwt"] = self
        app.extensions["jwt.revocations"] = RevocationMirror(clock)

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("JWTManager.init_app(app, services) has not been called")
        return self._services

    def _config(self) -> Config:
        return self.services.config

    def _engine(self) -> sa.engine.Engine:
        return self.services.engine

    def _limiter(self) -> RateLimiter:
        return self.services.limiter

    @staticmethod
    def _mirror() -> RevocationMirror:
        return current_app.extensions["jwt.revocations"]

    def _encode(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._config().jwt_secret_key, algorithm=ALGORITHM)

    def issue(self, user_id: int, family_id: str | None = None) -> dict[str, Any]:
        """Create an access token and a refresh token (recorded in its family)."""
        with self._engine().begin() as conn:
            return self._issue(conn, user_id, family_id)

    def _issue(self, conn: sa.Connection, user_id: int, family_id: str | None,
               stamp: str | None = None) -> dict[str, Any]:
        """Tokens for ``user_id``, bound to its account stamp (which must equal ``stamp`` if given)."""
        created = conn.execute(sa.select(db.users.c.created_at).where(db.users.c.id == user_id)).scalar()
        if created is None or (stamp is not None and account_stamp(created) != stamp):
            raise account_gone()
        stamp = account_stamp(created)
        config = self._config()
        now = int(dt.datetime.now(dt.UTC).timestamp())
        family_id = family_id or uuid.uuid4().hex
        access = {"sub": str(user_id), "gen": stamp, "iat": now, "exp": now + config.access_token_ttl,
                  "jti": uuid.uuid4().hex, "type": "access", "iss": ISSUER}
        refresh_jti = uuid.uuid4().hex
        refresh = {"sub": str(user_id), "gen": stamp, "iat": now, "exp": now + config.refresh_token_ttl,
                   "jti": refresh_jti, "type": "refresh", "fam": family_id, "iss": ISSUER}
        issued = db.utcnow()
        conn.execute(db.refresh_tokens.insert().values(
            jti=refresh_jti, family_id=family_id, user_id=user_id, issued_at=issued,
            expires_at=issued + dt.timedelta(seconds=config.refresh_token_ttl),
        ))
        return {
            "access_token": self._encode(access),
            "refresh_token": self._encode(refresh),
            "token_type": "Bearer",
            "expires_in": config.access_token_ttl,
        }

    def decode(self, token: str, expected_type: str) -> dict[str, Any]:
        """Verify signature, algorithm, expiry, required claims and type; raise 401 otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._config().jwt_secret_key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "sub", "type", "gen"]},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "token_expired", "The token has expired") from None
        except jwt.InvalidTokenError:
            raise ApiError(401, "invalid_token", "The token is malformed or its signature is invalid") from None
        if claims.get("type") != expected_type:
            raise ApiError(401, "invalid_token", f"An {expected_type} token is required")
        if not str(claims["sub"]).isdigit():
            raise ApiError(401, "invalid_token", "The token subject is invalid")
        if not isinstance(claims["gen"], str) or not STAMP_RE.fullmatch(claims["gen"]):
            raise ApiError(401, "invalid_token", "The token's account stamp is invalid")
        return claims

    def check_account(self, claims: dict[str, Any]) -> None:
        """401 unless the token's account still exists: same id and same account stamp."""
        with self._engine().connect() as conn:
            created = conn.execute(
                sa.select(db.users.c.created_at).where(db.users.c.id == int(claims["sub"]))
            ).scalar()
        if created is None or account_stamp(created) != claims["gen"]:
            raise account_gone()

    def is_revoked(self, jti: str) -> bool:
        """Shared store first (seen by all workers at once), then the database: a store that lost
        its data (restart, failover, eviction, flush) must not bring a revoked token back."""
        if self._limiter().has_flag(f"revoked:{jti}"):
            return True
        return self._revoked_in_database(jti)

    def _revoked_in_database(self, jti: str) -> bool:
        with self._engine().connect() as conn:
            return conn.execute(
                sa.select(db.revoked_tokens.c.jti).where(db.revoked_tokens.c.jti == jti)
            ).first() is not None

    def revoked_although_not_flagged(self, jti: str, *, store_lost_meta: bool) -> bool:
        """For the hot path, after the store showed no revocation flag. When the store did not have
        the subject's meta either, it may have lost its data (restart, failover, flush): the token
        is checked in the database, and the revocations are re-seeded if the store lost them.
        Otherwise this process's copy of the revocations answers (a flag alone may be evicted)."""
        if store_lost_meta:
            if not self._limiter().has_flag(SEEDED_FLAG):
                log.warning("the rate-limit store has lost its revocations; re-seeding them from the database")
                self.load_revocations()
            return self._revoked_in_database(jti)
        return self._mirror().contains(self._engine(), jti)

    def revoke_access(self, claims: dict[str, Any]) -> None:
        now = db.utcnow()
        expires = dt.datetime.fromtimestamp(claims["exp"], dt.UTC).replace(tzinfo=None)
        with self._engine().begin() as conn:
            exists = conn.execute(
                sa.select(db.revoked_tokens.c.jti).where(db.revoked_tokens.c.jti == claims["jti"])
            ).first()
            if not exists:
                conn.execute(db.revoked_tokens.insert().values(
                    jti=claims["jti"], user_id=int(claims["sub"]), expires_at=expires, revoked_at=now))
        self._mirror().add(claims["jti"], expires)
        ttl = max(1, int((expires - now).total_seconds()) + 1)
        self._limiter().set_flag(f"revoked:{claims['jti']}", ttl)

    def revoke_family(self, family_id: str) -> None:
        with self._engine().begin() as conn:
            conn.execute(
                db.refresh_tokens.update()
                .where(db.refresh_tokens.c.family_id == family_id, db.refresh_tokens.c.revoked_at.is_(None))
                .values(revoked_at=db.utcnow())
            )

    def rotate(self, refresh_token: str) -> dict[str, Any]:
        """Spend a refresh token and issue a new pair; a replayed token revokes its whole family."""
        claims = self.decode(refresh_token, "refresh")
        family_id = claims.get("fam")
        if not isinstance(family_id, str):
            raise ApiError(401, "invalid_token", "The refresh token has no family")
        # Spending the old token and recording the new one is one transaction: a concurrent replay
        # waits on the row lock, finds the token spent, and its family revocation then also
        # catches the new token (two transactions would let the new one slip past).
        with self._engine().begin() as conn:
            spent = conn.execute(
                db.refresh_tokens.update()
                .where(
                    db.refresh_tokens.c.jti == claims["jti"],
                    db.refresh_tokens.c.used_at.is_(None),
                    db.refresh_tokens.c.revoked_at.is_(None),
                )
                .values(used_at=db.utcnow())
            ).rowcount
            tokens = self._issue(conn, int(claims["sub"]), family_id, claims["gen"]) if spent == 1 else None
        if tokens is None:
            self.revoke_family(family_id)
            log.warning("refresh token reuse detected; revoked family %s of user %s", family_id, claims["sub"])
            raise ApiError(401, "token_reused", "This refresh token was already used or revoked; sign in again")
        return tokens

    def load_revocations(self) -> int:
        """Copy unexpired revocations from the database into the store (at start-up, and when the
        store is found without them), then mark the store as seeded; refresh this process's copy."""
        now = db.utcnow()
        with self._engine().connect() as conn:
            rows = conn.execute(
                sa.select(db.revoked_tokens.c.jti, db.revoked_tokens.c.expires_at)
                .where(db.revoked_tokens.c.expires_at > now)
            ).all()
        self._mirror().sync(self._engine(), full=True)  # first: this process is covered even if the store is down
        limiter = self._limiter()
        for jti, expires in rows:
            limiter.set_flag(f"revoked:{jti}", max(1, int((expires - now).total_seconds()) + 1))
        limiter.set_flag(SEEDED_FLAG, SEEDED_TTL)  # last: seen only once every flag is there
        return len(rows)


# --- request helpers and decorators ----------------------------------------------------------

def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def manager() -> JWTManager:
    """The JWTManager of the app handling this request."""
    found: JWTManager = current_app.extensions["jwt"]
    return found


def authenticate_access_token(token: str) -> dict[str, Any]:
    """Claims of a valid, unrevoked access token of an account that still exists, or ApiError(401)."""
    manager: JWTManager = current_app.extensions["jwt"]
    claims = manager.decode(token, "access")
    if manager.is_revoked(claims["jti"]):
        raise ApiError(401, "token_revoked", "The token has been revoked")
    manager.check_account(claims)
    return claims


def jwt_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Require a Bearer access token; puts its claims on ``g.jwt`` and the user id on ``g.user_id``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = bearer_token()
        if token is None:
            raise ApiError(401, "missing_token", "Send Authorization: Bearer <access_token>")
        g.jwt = authenticate_access_token(token)
        g.user_id = int(g.jwt["sub"])
        return view(*args, **kwargs)

    return wrapper


def admin_actor() -> str:
    """Name of the admin making this request, or raise 401/403.

    ADMIN_TOKEN is compared in constant time; when it is unset only admin users' JWTs pass.
    """
    token = bearer_token()
    if token is None:
        raise ApiError(401, "missing_admin_token", "Send Authorization: Bearer <ADMIN_TOKEN>")
    svc = manager().services
    admin_token = svc.config.admin_token
    if admin_token and hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8")):
        return "admin-token"
    if token.count(".") == 2:
        try:
            claims = authenticate_access_token(token)
        except ApiError:
            raise ApiError(401, "invalid_admin_token", "The admin token is not valid") from None
        with svc.engine.connect() as conn:
            row = conn.execute(
                sa.select(db.users.c.username, db.users.c.is_admin).where(db.users.c.id == int(claims["sub"]))
            ).first()
        if row is not None and row.is_admin:
            return f"user:{row.username}"
        raise ApiError(403, "forbidden", "This account is not an administrator")
    raise ApiError(401, "invalid_admin_token", "The admin token is not valid")


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Require ADMIN_TOKEN (or an admin user's JWT); the actor's name goes on ``g.admin_actor``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        g.admin_actor = admin_actor()
        return view(*args, **kwargs)

    return wrapper
