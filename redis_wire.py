"""The Redis wire client of the limiter's hot path, and how it finds the node that owns a key.

``RespConnection`` speaks RESP2 over a blocking socket with kernel-level timeouts: redis-py's
per-command machinery costs more than a loopback round trip. ``parse_store_url`` reads the Redis
storage URLs of the scheme registry (store.STORE_SCHEMES); ``SentinelResolver`` asks Sentinel which
node is the master, and ``SlotMap`` learns a Redis Cluster's slot -> master map from ``CLUSTER SLOTS``.
Nothing here decides a rate limit.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import urllib.parse
from typing import Any, NamedTuple

import redis
from redis.connection import parse_url
from redis.crc import key_slot as _key_slot

from store import CLUSTER, PLAIN, SENTINEL, url_kind, valid_schemes

CONNECT_TIMEOUT, OP_TIMEOUT = 0.5, 1.0
SLOTS = 16384
Addr = tuple[str, int]



class ConnectFailed(redis.ConnectionError):
    """No connection could be opened: nothing was sent, so the command may be retried elsewhere."""


# --------------------------------------------------------------------------- storage URLs

class StoreSpec(NamedTuple):
    """A parsed Redis storage URL. ``params`` are the connection settings of every node."""

    kind: str  # store.PLAIN, SENTINEL or CLUSTER: the scheme's kind in store.STORE_SCHEMES
    params: dict[str, Any]  # host/port (or path), password, username, db, ssl
    nodes: tuple[Addr, ...] = ()  # sentinels, or cluster seed nodes
    service: str = ""  # Sentinel service (master) name


def _addresses(netloc: str, default_port: int, url: str) -> tuple[Addr, ...]:
    out = []
    for part in netloc.split(","):
        part = part.strip()
        if part.startswith("["):  # [::1]:26379
            host, _, rest = part[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"storage URL {redact_url(url)!r} names an empty host")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"storage URL {redact_url(url)!r}: port {port_text!r} is not a number") from None
        if not 0 < port < 65536:
            raise ValueError(f"storage URL {redact_url(url)!r}: port {port} is out of range")
        out.append((host, port))
    return tuple(out)


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hosts}"


def parse_store_url(url: str) -> StoreSpec:
    """Parse a Redis storage URL; ValueError with a one-line message (password redacted) when malformed.

    ``redis+sentinel://[user:pass@]h1:26379,h2:26379/service[/db]``: the password authenticates to
    the master and, when they ask for one, to the sentinels. ``redis+cluster://[user:pass@]h1:p1,h2:p2``
    names seed nodes; the rest of the cluster is learned from them.
    """
    kind = url_kind(url)
    if kind == PLAIN:
        try:
            plain = parse_url(url)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"storage URL {redact_url(url)!r} is malformed: {exc}") from None
        if not url.startswith("unix://") and not plain.get("host"):  # a socket URL names a path instead
            raise ValueError(f"storage URL {redact_url(url)!r} names no host")
        return StoreSpec(PLAIN, plain)
    if kind not in (SENTINEL, CLUSTER):
        raise ValueError(f"unknown storage URL {redact_url(url)!r}; valid schemes: {valid_schemes()}")
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise ValueError(f"storage URL {redact_url(url)!r}: query options are not supported")
    userinfo, at, hosts = netloc.rpartition("@")
    params: dict[str, Any] = {}
    if at:
        user, _, password = userinfo.partition(":")
        if user:
            params["username"] = urllib.parse.unquote(user)
        if password:
            params["password"] = urllib.parse.unquote(password)
    if not hosts:
        raise ValueError(f"storage URL {redact_url(url)!r} names no host")
    nodes = _addresses(hosts, 26379 if kind == SENTINEL else 6379, url)
    parts = [p for p in path.split("/") if p]
    if kind == CLUSTER:
        if parts and parts != ["0"]:
            raise ValueError(f"storage URL {redact_url(url)!r}: Redis Cluster has only database 0")
        return StoreSpec(kind, params, nodes)
    if not parts or len(parts) > 2:
        raise ValueError(f"storage URL {redact_url(url)!r} must name the Sentinel service: "
                         "redis+sentinel://host:26379[,host:26379]/service[/db]")
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"storage URL {redact_url(url)!r}: database {parts[1]!r} is not a number")
        params["db"] = int(parts[1])
    return StoreSpec(kind, params, nodes, urllib.parse.unquote(parts[0]))


# --------------------------------------------------------------------------- the connection

_ERRORS: dict[bytes, type[redis.ResponseError]] = {
    b"NOSCRIPT": redis.exceptions.NoScriptError,
    b"READONLY": redis.exceptions.ReadOnlyError,
    b"TRYAGAIN": redis.exceptions.TryAgainError,
    b"CLUSTERDOWN": redis.exceptions.ClusterDownError,
    b"MASTERDOWN": redis.exceptions.MasterDownError,
}


def encode(*args: Any) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def error_reply(body: bytes) -> redis.ResponseError:
    """The redis-py exception for an error reply, so callers can tell redirections from failures."""
    code, _, rest = body.partition(b" ")
    text = body.decode(errors="replace")
    if code == b"MOVED":
        return redis.exceptions.MovedError(rest.decode(errors="replace"))
    if code == b"ASK":
        return redis.exceptions.AskError(rest.decode(errors="replace"))
    kind = _ERRORS.get(code)
    if kind is None and b"READONLY" in body[:200]:  # a script refused on a replica wraps the code
        kind = redis.exceptions.ReadOnlyError
    return (kind or redis.ResponseError)(text)


class RespConnection:
    """A lean RESP2 connection: blocking socket with kernel-level timeouts, pre-encoded commands."""

    def __init__(self, params: dict[str, Any], auth_optional: bool = False) -> None:
        try:
            if "path" in params:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(params["path"])
            else:
                sock = socket.create_connection((params.get("host", "localhost"), params.get("port", 6379)),
                                                timeout=CONNECT_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if params.get("connection_class") is redis.SSLConnection:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=params.get("host"))
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to Redis: {exc}") from exc
        if not isinstance(sock, ssl.SSLSocket):  # an SSL socket needs Python-level timeouts
            timeval = struct.pack("ll", int(OP_TIMEOUT), int(OP_TIMEOUT % 1 * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.settimeout(None)
        else:
            sock.settimeout(OP_TIMEOUT)
        self.sock = sock
        self.reader = sock.makefile("rb")
        try:
            if params.get("password"):
                auth = [params["username"], params["password"]] if params.get("username") else [params["password"]]
                try:
                    self.call("AUTH", *auth)
                except redis.ResponseError as exc:  # a sentinel without a password of its own
                    if not (auth_optional and "without any password" in str(exc)):
                        raise redis.exceptions.AuthenticationError(str(exc)) from None
            if params.get("db"):
                self.call("SELECT", params["db"])
        except BaseException:
            self.close()
            raise

    def call(self, *args: Any) -> Any:
        try:
            self.sock.sendall(encode(*args))
            return self._read()
        except (OSError, ValueError, TypeError) as exc:  # socket errors, timeouts, unparsable replies
            raise redis.ConnectionError(f"Redis connection lost: {exc!r}") from exc

    def send(self, payload: bytes) -> None:
        """Write already encoded commands (a pipeline); read their replies with ``reply``."""
        try:
            self.sock.sendall(payload)
        except (OSError, ValueError) as exc:
            raise redis.ConnectionError(f"Redis connection lost: {exc!r}") from exc

    def reply(self) -> Any:
        """The next reply; an error reply is returned as its exception (the stream stays in step)."""
        try:
            return self._read()
        except redis.ConnectionError:
            raise
        except redis.ResponseError as exc:
            return exc
        except (OSError, ValueError, TypeError) as exc:
            raise redis.ConnectionError(f"Redis connection lost: {exc!r}") from exc

    def _read(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise redis.ConnectionError("Redis closed the connection or timed out")
        kind, body = line[:1], line[1:-2]
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            if size < 0:
                return None
            # On a timeout (SO_RCVTIMEO) or a close, read() returns None or fewer bytes.
            data = self.reader.read(size + 2)
            if data is None or len(data) != size + 2:
                raise redis.ConnectionError("Redis reply cut short: timed out or connection closed")
            return data[:-2]
        if kind == b"*":
            size = int(body)
            if size < 0:
                return None
            out, error = [], None
            for _ in range(size):  # read every element, so an error inside leaves the stream in step
                try:
                    out.append(self._read())
                except redis.ResponseError as exc:
                    error = error or exc
                    out.append(None)
            if error is not None:
                raise error
            return out
        if kind == b"+":
            return body
        if kind != b"-":
            raise redis.ConnectionError(f"Redis protocol error: unexpected reply type {kind!r}")
        raise error_reply(body)

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- Sentinel

class SentinelResolver:
    """Which node is the master of ``service``: asked of the sentinels, cached until ``forget``.

    A sentinel's answer is trusted only once the named node says ``ROLE`` master, so a stale
    answer in the middle of a failover is skipped rather than written to.
    """

    def __init__(self, spec: StoreSpec) -> None:
        self.sentinels = list(spec.nodes)
        self.service = spec.service
        self.params = spec.params
        self._master: Addr | None = None
        self._lock = threading.Lock()

    def master(self) -> Addr:
        addr = self._master
        if addr is not None:
            return addr
        with self._lock:
            if self._master is None:
                self._master = self._discover()
            return self._master

    def forget(self) -> None:
        """The master failed us (connection lost, READONLY): ask the sentinels again next time."""
        self._master = None

    def _discover(self) -> Addr:
        errors = []
        auth = {k: v for k, v in self.params.items() if k in ("username", "password")}
        for i, (host, port) in enumerate(self.sentinels):
            try:
                conn = RespConnection({"host": host, "port": port, **auth}, auth_optional=True)
                try:
                    reply = conn.call("SENTINEL", "get-master-addr-by-name", self.service)
                finally:
                    conn.close()
                if not reply:
                    errors.append(f"{host}:{port} knows no master {self.service!r}")
                    continue
                addr = (reply[0].decode(), int(reply[1]))
                node = RespConnection({**self.params, "host": addr[0], "port": addr[1]})
                try:
                    role = node.call("ROLE")
                finally:
                    node.close()
                if role[0] != b"master":
                    errors.append(f"{host}:{port} names {addr[0]}:{addr[1]}, which is a {role[0].decode()}")
                    continue
                if i:  # ask the sentinel that answered first next time
                    self.sentinels.insert(0, self.sentinels.pop(i))
                return addr
            except redis.RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
        raise redis.ConnectionError(f"no master for Sentinel service {self.service!r}: {'; '.join(errors)}")


# --------------------------------------------------------------------------- Redis Cluster

def key_slot(key: str) -> int:
    return _key_slot(key.encode())


class SlotMap:
    """Slot -> master address of a Redis Cluster, learned from ``CLUSTER SLOTS`` and corrected by MOVED."""

    def __init__(self, spec: StoreSpec) -> None:
        self.seeds = list(spec.nodes)
        self.params = spec.params
        self.slots: list[Addr | None] = [None] * SLOTS
        self.masters: tuple[Addr, ...] = ()
        self.stale = True
        self._lock = threading.Lock()

    def node(self, slot: int) -> Addr:
        if self.stale:
            self.refresh()
        addr = self.slots[slot]
        if addr is None:
            raise redis.exceptions.ClusterDownError(f"CLUSTERDOWN slot {slot} is not served by any node")
        return addr

    def moved(self, slot: int, addr: Addr) -> None:
        """A MOVED reply: fix that slot now, and reload the whole map before the next command."""
        self.slots[slot] = addr
        self.stale = True

    def refresh(self) -> None:
        with self._lock:
            errors = []
            for host, port in dict.fromkeys([*self.masters, *self.seeds]):
                try:
                    conn = RespConnection({**self.params, "host": host, "port": port})
                    try:
                        ranges = conn.call("CLUSTER", "SLOTS")
                    finally:
                        conn.close()
                except redis.RedisError as exc:
                    errors.append(f"{host}:{port}: {exc}")
                    continue
                slots: list[Addr | None] = [None] * SLOTS
                masters: dict[Addr, None] = {}
                for start, end, master, *_ in ranges:
                    addr = ((master[0].decode() or host), int(master[1]))
                    masters[addr] = None
                    slots[start:end + 1] = [addr] * (end - start + 1)
                self.slots, self.masters, self.stale = slots, tuple(masters), False
                return
            raise redis.ConnectionError(f"no Redis Cluster node answered: {'; '.join(errors)}")
