"""Rate-limit policies: several limits per tier, route rules (cost, exempt, extra limits), shadow mode.

``load_policy(path)`` reads the TOML file named by ``RATELIMIT_POLICY`` with stdlib ``tomllib``
and validates every entry, raising ``PolicyError`` (a ``ConfigError``) with one line naming the
file, the entry and the problem. Without a file the service runs ``default_policy``: the tier
limits of ``TIER_LIMITS`` over one window, decided by the limiter's original single-limit path.

Rates use the notation Flask-Limiter and ``limits`` users know: ``"5/minute"``,
``"200 per day"``, ``"10/30 seconds"``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from config import DEFAULT_TIER, TIER_ORDER, ConfigError

UNITS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 30 * 86400,
                         "year": 365 * 86400}
UNIT_NAMES: dict[int, str] = {seconds: name for name, seconds in UNITS.items()}
RATE_RE = re.compile(r"^\s*(\d{1,9})\s*(?:/|\bper\b)\s*(\d{1,9})?\s*([a-z]+?)s?\s*$", re.IGNORECASE)
METHODS = ("*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_COST = 1000
MAX_LIMITS = 8  # per decision source (tier, route, override): bounds the work of one store call
MAX_WINDOW = 366 * 86400


class PolicyError(ConfigError):
    """The policy file (or an override's limits) cannot be used as written."""


@dataclasses.dataclass(frozen=True)
class Rate:
    """``quota`` units per ``window`` seconds."""

    quota: int
    window: int

    def __str__(self) -> str:
        unit = UNIT_NAMES.get(self.window)
        return f"{self.quota}/{unit}" if unit else f"{self.quota}/{self.window} seconds"


@dataclasses.dataclass(frozen=True)
class Limit:
    """One named limit of a decision; ``shadow`` limits report a would-be refusal but never refuse."""

    name: str
    quota: int
    window: int
    shadow: bool = False


@dataclasses.dataclass(frozen=True)
class Route:
    """A ``[[routes]]`` entry: ``match = "METHOD glob"`` on the request (or forwarded) path."""

    index: int
    method: str
    pattern: str
    cost: int = 1
    exempt: bool = False
    limits: tuple[Limit, ...] = ()

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and fnmatch.fnmatchcase(path, self.pattern)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Tier limits, route rules and the global shadow switch; ``source`` is the file (or None)."""

    tiers: Mapping[str, tuple[Limit, ...]]
    routes: tuple[Route, ...] = ()
    shadow: bool = False
    source: str | None = None

    def route_for(self, method: str, path: str) -> Route | None:
        """The first route whose rule matches (first match wins), or None."""
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None

    def tier_limits(self, tier: str) -> tuple[Limit, ...]:
        return self.tiers.get(tier) or self.tiers[DEFAULT_TIER]


def parse_rate(text: Any) -> Rate:
    """``"5/minute"``, ``"200 per day"``, ``"10/30 seconds"`` -> Rate; ValueError saying why not."""
    if not isinstance(text, str):
        raise ValueError(f"a rate must be a string like \"5/minute\", got {text!r}")
    match = RATE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a rate like \"5/minute\", \"200 per day\" or \"10/30 seconds\"")
    quota, multiple, unit = int(match[1]), int(match[2] or 1), match[3].lower()
    if unit not in UNITS:
        raise ValueError(f"{text!r}: unknown unit {unit!r}; use {', '.join(UNITS)}")
    if quota < 1 or multiple < 1:
        raise ValueError(f"{text!r}: the amount and the window must be at least 1")
    window = multiple * UNITS[unit]
    if window > MAX_WINDOW:
        raise ValueError(f"{text!r}: the window must be at most a year")
    return Rate(quota, window)


def limit_name(owner: str, window: int) -> str:
    """``free-minute``, ``route2-hour``, ``override-90s``: the name headers and 429 bodies use."""
    return f"{owner}-{UNIT_NAMES.get(window) or f'{window}s'}"


def parse_limits(owner: str, entries: Any, *, shadow: bool = False) -> tuple[Limit, ...]:
    """A list of rates (strings, or ``{rate = "...", shadow = true}`` tables) -> Limits.

    Two limits of one list may not share a window: the store keeps one counter per window."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("must be a non-empty list of rates like [\"5/minute\", \"200/day\"]")
    if len(entries) > MAX_LIMITS:
        raise ValueError(f"at most {MAX_LIMITS} limits")
    limits: list[Limit] = []
    for entry in entries:
        limit_shadow = shadow
        if isinstance(entry, dict):
            unknown = set(entry) - {"rate", "shadow"}
            if unknown:
                raise ValueError(f"unknown field {sorted(unknown)[0]!r} in a limit (use rate, shadow)")
            limit_shadow = shadow or _bool_value(entry.get("shadow", False), "shadow")
            entry = entry.get("rate")
        rate = parse_rate(entry)
        if any(other.window == rate.window for other in limits):
            raise ValueError(f"two limits with the same window ({rate.window} s)")
        limits.append(Limit(limit_name(owner, rate.window), rate.quota, rate.window, limit_shadow))
    return tuple(limits)


def _bool_value(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def default_policy(tier_limits: Mapping[str, int], window: int) -> Policy:
    """Today's behaviour as a policy: one limit per tier over ``window`` seconds, no routes."""
    return Policy({tier: (Limit(limit_name(tier, window), quota, window),) for tier, quota in tier_limits.items()})


def parse_route(index: int, entry: Any) -> Route:
    if not isinstance(entry, dict):
        raise ValueError("must be a table with match = \"METHOD glob\"")
    unknown = set(entry) - {"match", "cost", "exempt", "limits", "shadow"}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r} (use match, cost, exempt, limits, shadow)")
    rule = entry.get("match")
    parts = rule.split() if isinstance(rule, str) else []
    if len(parts) != 2 or parts[0].upper() not in METHODS or not parts[1].startswith(("/", "*")):
        raise ValueError(f"match must be \"METHOD /path-glob\" with METHOD one of {', '.join(METHODS)}, got {rule!r}")
    cost = entry.get("cost", 1)
    if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= MAX_COST:
        raise ValueError(f"cost must be an integer from 1 to {MAX_COST}, got {cost!r}")
    exempt = _bool_value(entry.get("exempt", False), "exempt")
    shadow = _bool_value(entry.get("shadow", False), "shadow")
    limits: tuple[Limit, ...] = ()
    if "limits" in entry:
        limits = parse_limits(f"route{index}", entry["limits"], shadow=shadow)
    if exempt and (limits or "cost" in entry):
        raise ValueError("an exempt route is not counted: it cannot have cost or limits")
    return Route(index, parts[0].upper(), parts[1], cost, exempt, limits)


def parse_policy(data: Mapping[str, Any], source: str, tier_limits: Mapping[str, int], window: int) -> Policy:
    """Validate a parsed TOML document; PolicyError "<source>: <entry>: <problem>" on the first problem."""
    def fail(entry: str, problem: str) -> PolicyError:
        return PolicyError(f"{source}: {entry}: {problem}")

    unknown = set(data) - {"shadow", "tiers", "routes"}
    if unknown:
        raise fail(sorted(unknown)[0], "unknown entry (use shadow, [tiers], [[routes]])")
    try:
        shadow = _bool_value(data.get("shadow", False), "shadow")
    except ValueError as exc:
        raise fail("shadow", str(exc)) from None
    tiers = dict(default_policy(tier_limits, window).tiers)
    raw_tiers = data.get("tiers", {})
    if not isinstance(raw_tiers, dict):
        raise fail("tiers", "must be a table like [tiers] free = [\"5/minute\"]")
    for tier, entries in raw_tiers.items():
        if tier not in TIER_ORDER:
            raise fail(f"tiers.{tier}", f"unknown tier; use {', '.join(TIER_ORDER)}")
        try:
            tiers[tier] = parse_limits(tier, entries)
        except ValueError as exc:
            raise fail(f"tiers.{tier}", str(exc)) from None
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        raise fail("routes", "must be an array of tables ([[routes]])")
    routes = []
    for number, entry in enumerate(raw_routes, start=1):
        try:
            routes.append(parse_route(number, entry))
        except ValueError as exc:
            rule = entry.get("match") if isinstance(entry, dict) else None
            label = f"routes[{number}]" + (f" ({rule})" if isinstance(rule, str) else "")
            raise fail(label, str(exc)) from None
    return Policy(tiers, tuple(routes), shadow, source)


def load_policy(path: str, tier_limits: Mapping[str, int], window: int) -> Policy:
    """Read and validate the policy file; PolicyError with one line on any problem."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    return parse_policy(data, path, tier_limits, window)


def override_limits(entries: Sequence[Any]) -> tuple[Limit, ...]:
    """An admin override's ``limits`` list, validated like a tier's; ValueError saying why not."""
    return parse_limits("override", list(entries) if isinstance(entries, list | tuple) else entries)
