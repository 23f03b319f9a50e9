"""The policy file: rate notation, validation with one-line errors, route matching, start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import DEFAULT_TIER_LIMITS, ConfigError
from policy import Limit, PolicyError, Rate, default_policy, load_policy, parse_rate
from tests.services import ROOT


@pytest.mark.parametrize(("text", "rate"), [
    ("5/minute", Rate(5, 60)),
    ("200 per day", Rate(200, 86400)),
    ("10/30 seconds", Rate(10, 30)),
    ("1/second", Rate(1, 1)),
    ("3 per 2 hours", Rate(3, 7200)),
    ("7/MONTH", Rate(7, 30 * 86400)),
])
def test_rates_in_flask_limiter_notation(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["5", "5/fortnight", "0/minute", "5/0 seconds", "minute", "5/2 years", 5, "-1/day"])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


def load(path: str):
    return load_policy(path, DEFAULT_TIER_LIMITS, 60)


def test_the_shipped_example_loads():
    policy = load(str(ROOT / "policy.example.toml"))
    assert policy.tiers["free"] == (Limit("free-minute", 5, 60), Limit("free-day", 200, 86400))
    assert policy.tiers["premium"][1] == Limit("premium-day", 50000, 86400, shadow=True)
    search = policy.route_for("POST", "/v1/search/books")
    assert search is not None and search.cost == 5
    assert policy.route_for("GET", "/v1/search") is None
    status = policy.route_for("GET", "/status")
    assert status is not None and status.exempt
    upload = policy.route_for("PUT", "/v1/upload/x")
    assert upload is not None and upload.limits == (Limit("route3-hour", 10, 3600, shadow=True),)


def test_first_matching_route_wins(tmp_path):
    policy = load(write(tmp_path, '[[routes]]\nmatch = "GET /a*"\ncost = 2\n[[routes]]\nmatch = "* /a/b"\ncost = 3\n'))
    assert policy.route_for("GET", "/a/b").cost == 2
    assert policy.route_for("POST", "/a/b").cost == 3


def test_tiers_left_out_keep_tier_limits(tmp_path):
    policy = load_policy(write(tmp_path, '[tiers]\nfree = ["2/second"]\n'), {**DEFAULT_TIER_LIMITS, "basic": 7}, 30)
    assert policy.tiers["free"] == (Limit("free-second", 2, 1),)
    assert policy.tiers["basic"] == (Limit("basic-30s", 7, 30),)


def test_without_a_file_the_policy_is_the_tier_limits():
    policy = default_policy(DEFAULT_TIER_LIMITS, 60)
    assert policy.tiers["free"] == (Limit("free-minute", 5, 60),) and not policy.routes and not policy.shadow


@pytest.mark.parametrize(("text", "words"), [
    ('[tiers]\nfree = ["5/minit"]\n', ["tiers.free", "unknown unit 'minit'"]),
    ('[tiers]\ngold = ["5/minute"]\n', ["tiers.gold", "unknown tier"]),
    ('[tiers]\nfree = ["5/minute", "9/60 seconds"]\n', ["tiers.free", "same window"]),
    ('[tiers]\nfree = []\n', ["tiers.free", "non-empty list"]),
    ('[[routes]]\nmatch = "FETCH /x"\n', ["routes[1]", "match must be"]),
    ('[[routes]]\nmatch = "GET /x"\ncost = 0\n', ["routes[1] (GET /x)", "cost must be"]),
    ('[[routes]]\nmatch = "GET /x"\nexempt = true\ncost = 2\n', ["routes[1] (GET /x)", "exempt"]),
    ('[[routes]]\nmatch = "GET /x"\nlimit = ["1/day"]\n', ["routes[1] (GET /x)", "unknown field 'limit'"]),
    ('shadow = "yes"\n', ["shadow", "true or false"]),
    ('tier = 1\n', ["tier", "unknown entry"]),
    ('[tiers\n', ["not valid TOML"]),
])
def test_a_bad_file_is_one_line_naming_file_entry_and_problem(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(path + ": ")
    for word in words:
        assert word in message
    assert isinstance(info.value, ConfigError)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load(str(tmp_path / "nope.toml"))


def test_config_reads_ratelimit_policy():
    from config import Config

    assert Config.from_env({"RATELIMIT_POLICY": " p.toml "}).policy_path == "p.toml"
    assert Config.from_env({}).policy_path is None


def test_a_bad_policy_file_stops_start_up_with_one_line(tmp_path):
    path = write(tmp_path, '[tiers]\nfree = ["5/minit"]\n')
    env = {**os.environ, "RATELIMIT_POLICY": path, "DB_PATH": str(tmp_path / "x.db"), "LOG_DIR": str(tmp_path),
           "ENABLE_SOCKETIO": "false"}
    proc = subprocess.run([sys.executable, "app.py", "--port", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    units = "second, minute, hour, day, month, year"
    assert lines[-1] == f"error: {path}: tiers.free: '5/minit': unknown unit 'minit'; use {units}"
    assert not (tmp_path / "x.db").exists()


def test_the_app_starts_with_the_example_policy(make_app):
    app = make_app(policy_path=str(ROOT / "policy.example.toml"))
    assert app.extensions["rl"].rules.tiers["basic"][1].quota == 5000

