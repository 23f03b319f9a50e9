"""Configuration of the load balancer: dataclasses, JSON file, ``LB_*`` environment and flags.

Kept apart from the proxy so the configuration can be read, validated and documented on its
own; ``load_config`` merges defaults < JSON file < environment < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from geo_router import Datacenter

DEFAULT_BACKENDS = ("http://127.0.0.1:5001", "http://127.0.0.1:5002", "http://127.0.0.1:5003")
# The strategy names load_balancer.STRATEGIES implements (it checks the two agree at import).
STRATEGY_NAMES = ("round_robin", "least_connections", "weighted", "ip_hash", "adaptive", "geo")


class ConfigError(ValueError):
    """The configuration (file, environment or flags) cannot be run."""


@dataclass
class BackendSpec:
    """One upstream as configured."""

    url: str
    weight: int = 1
    datacenter: str | None = None


@dataclass
class HealthCheckConfig:
    """Active health checks: GET ``path`` every ``interval`` seconds."""

    enabled: bool = True
    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2


@dataclass
class EjectionConfig:
    """Passive ejection: ``max_failures`` consecutive transport failures eject a backend."""

    max_failures: int = 3
    base_seconds: float = 5.0
    max_seconds: float = 300.0


@dataclass
class CacheConfig:
    """Bounds of the shared GET response cache."""

    enabled: bool = True
    max_entries: int = 1024
    max_bytes: int = 64 * 1024 * 1024
    max_entry_bytes: int = 1024 * 1024


@dataclass
class LBConfig:
    """Everything the balancer needs; built by ``load_config`` or directly in tests."""

    backends: list[BackendSpec] = field(default_factory=lambda: [BackendSpec(u) for u in DEFAULT_BACKENDS])
    strategy: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 8080
    retries: int = 2
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    buffer_bytes: int = 1024 * 1024
    shutdown_timeout: float = 30.0
    trusted_proxies: int = 0
    adaptive_decay_seconds: float = 10.0
    admin_token: str = ""  # LB_ADMIN_TOKEN: Bearer token for /change_strategy; unset: loopback callers only
    max_connections: int = 1000  # client connections open at once (HAProxy's maxconn)
    request_head_timeout: float = 10.0  # whole request head, from its first byte (HAProxy's timeout http-request)
    keepalive_timeout: float = 30.0  # idle keep-alive client connection, until the next request's first byte
    send_timeout: float = 60.0  # a client that takes none of an answer's bytes for this long (nginx's send_timeout)
    forward_auth_url: str = ""  # gateway mode: ask this decision endpoint before proxying (LB_FORWARD_AUTH_URL)
    forward_auth_timeout: float = 1.0
    forward_auth_fail: str = "closed"  # decision service unreachable: "closed" (503) or "open" (proxy anyway)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    datacenters: list[Datacenter] = field(default_factory=list)
    default_datacenter: str | None = None
    geoip_db_path: str | None = None

    def validate(self) -> LBConfig:
        if not self.backends:
            raise ConfigError("at least one backend is required")
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGY_NAMES)}")
        for spec in self.backends:
            if not spec.url.startswith(("http://", "https://")):
                raise ConfigError(f"backend URL must start with http:// or https://, got {spec.url!r}")
            if spec.weight < 1:
                raise ConfigError(f"backend weight must be >= 1, got {spec.weight} for {spec.url}")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections (LB_MAX_CONNECTIONS) must be >= 1, got {self.max_connections}")
        if self.request_head_timeout <= 0 or self.keepalive_timeout <= 0 or self.send_timeout <= 0:
            raise ConfigError("request_head_timeout, keepalive_timeout and send_timeout must be > 0 seconds")
        if self.forward_auth_url and not self.forward_auth_url.startswith(("http://", "https://")):
            raise ConfigError(f"--forward-auth must be an http:// or https:// URL, got {self.forward_auth_url!r}")
        if self.forward_auth_timeout <= 0:
            raise ConfigError(f"--forward-auth-timeout must be > 0 seconds, got {self.forward_auth_timeout}")
        if self.forward_auth_fail not in ("closed", "open"):
            raise ConfigError(f"--forward-auth-fail must be closed or open, got {self.forward_auth_fail!r}")
        if self.trusted_proxies < 0:
            raise ConfigError(f"trusted_proxies (TRUSTED_PROXIES) must be >= 0, got {self.trusted_proxies}")
        names = {dc.name for dc in self.datacenters}
        if self.default_datacenter and self.default_datacenter not in names:
            raise ConfigError(f"default_datacenter {self.default_datacenter!r} is not a configured datacenter")
        return self


def _coerce(value: Any, like: Any, where: str) -> Any:
    """Coerce a JSON/env value to the type of the dataclass default ``like``."""
    try:
        if isinstance(like, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None
    return value


def _fill(obj: Any, values: Mapping[str, Any], where: str) -> None:
    """Set scalar dataclass fields of ``obj`` from ``values``, rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown configuration key {where}{key!r}")
        setattr(obj, key, _coerce(value, getattr(obj, key), f"{where}{key}"))


def parse_backend(item: Any) -> BackendSpec:
    if isinstance(item, str):
        return BackendSpec(item.strip().rstrip("/"))
    if isinstance(item, Mapping) and isinstance(item.get("url"), str):
        spec = BackendSpec(item["url"].strip().rstrip("/"))
        _fill(spec, {k: v for k, v in item.items() if k != "url"}, "backends[].")
        return spec
    raise ConfigError(f"a backend must be a URL or {{'url': ..., 'weight': ...}}, got {item!r}")


def parse_datacenters(items: Any) -> tuple[list[Datacenter], dict[str, str]]:
    """Parse ``[{"name", "lat", "lon", "backends": [urls]}]``; return them and url -> datacenter."""
    if not isinstance(items, list):
        raise ConfigError("datacenters must be a list of {name, lat, lon, backends}")
    datacenters, placement = [], {}
    for item in items:
        try:
            urls = tuple(u.rstrip("/") for u in item.get("backends", []))
            dc = Datacenter(str(item["name"]), float(item["lat"]), float(item["lon"]), urls)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"datacenter entries need name, lat, lon (and backends), got {item!r}") from None
        datacenters.append(dc)
        placement.update(dict.fromkeys(urls, dc.name))
    return datacenters, placement


def apply_mapping(config: LBConfig, data: Mapping[str, Any]) -> None:
    """Apply a JSON-shaped mapping (the config file format) onto ``config``."""
    data = dict(data)
    if "datacenters" in data and "backends" not in data:
        config.backends = []  # the datacenters list their own backends; don't keep the defaults
    if "backends" in data:
        config.backends = [parse_backend(b) for b in data.pop("backends")]
    if "datacenters" in data:
        config.datacenters, placement = parse_datacenters(data.pop("datacenters"))
        urls = {b.url for b in config.backends}
        config.backends.extend(BackendSpec(u) for u in placement if u not in urls)
        for spec in config.backends:
            spec.datacenter = placement.get(spec.url, spec.datacenter)
    for section in ("health_check", "ejection", "cache"):
        if section in data:
            _fill(getattr(config, section), data.pop(section), f"{section}.")
    for key in ("strategy", "host", "default_datacenter", "geoip_db_path", "admin_token", "forward_auth_url"):
        if key in data:
            setattr(config, key, data.pop(key))
    _fill(config, data, "")


def env_mapping(env: Mapping[str, str]) -> dict[str, Any]:
    """Translate ``LB_*`` variables (and ``GEOIP_DB_PATH``, ``TRUSTED_PROXIES``) into the config file format."""
    data: dict[str, Any] = {}
    if env.get("LB_BACKENDS"):
        urls = [u for u in env["LB_BACKENDS"].split(",") if u.strip()]
        weights = [w for w in env.get("LB_WEIGHTS", "").split(",") if w.strip()]
        if weights and len(weights) != len(urls):
            raise ConfigError(f"LB_WEIGHTS has {len(weights)} entries for {len(urls)} LB_BACKENDS")
        data["backends"] = [{"url": u, "weight": w} for u, w in zip(urls, weights or ["1"] * len(urls), strict=True)]
    if env.get("LB_DATACENTERS"):
        try:
            data["datacenters"] = json.loads(env["LB_DATACENTERS"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"LB_DATACENTERS must be a JSON list: {exc}") from None
    for var, key in (
        ("LB_STRATEGY", "strategy"),
        ("LB_HOST", "host"),
        ("LB_PORT", "port"),
        ("LB_DEFAULT_DATACENTER", "default_datacenter"),
        ("GEOIP_DB_PATH", "geoip_db_path"),
        ("TRUSTED_PROXIES", "trusted_proxies"),  # the same variable and meaning as the API's
        ("LB_ADMIN_TOKEN", "admin_token"),
        ("LB_MAX_CONNECTIONS", "max_connections"),
        ("LB_REQUEST_HEAD_TIMEOUT", "request_head_timeout"),
        ("LB_KEEPALIVE_TIMEOUT", "keepalive_timeout"),
        ("LB_SEND_TIMEOUT", "send_timeout"),
        ("LB_FORWARD_AUTH_URL", "forward_auth_url"),
        ("LB_FORWARD_AUTH_TIMEOUT", "forward_auth_timeout"),
        ("LB_FORWARD_AUTH_FAIL", "forward_auth_fail"),
    ):
        if env.get(var):
            data[key] = env[var]
    if env.get("LB_HEALTH_INTERVAL"):
        data["health_check"] = {"interval": env["LB_HEALTH_INTERVAL"]}
    return data


def load_config(args: argparse.Namespace, env: Mapping[str, str]) -> LBConfig:
    """Defaults < JSON file (``--config`` or ``LB_CONFIG``) < environment < flags."""
    config = LBConfig()
    path = args.config or env.get("LB_CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        apply_mapping(config, data)
    apply_mapping(config, env_mapping(env))
    flags: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.strategy:
        flags["strategy"] = args.strategy
    for flag in ("forward_auth_url", "forward_auth_timeout", "forward_auth_fail"):
        if getattr(args, flag, None) is not None:
            flags[flag] = getattr(args, flag)
    if args.backends:
        flags.update(env_mapping({"LB_BACKENDS": args.backends, "LB_WEIGHTS": args.weights or ""}))
    apply_mapping(config, flags)
    return config.validate()
