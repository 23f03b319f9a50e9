"""HTTP benchmark of GET /data under gunicorn: this project vs Flask-Limiter vs no limiting.

All three run in the same invocation, under the same gunicorn settings, against the same
Redis, driven by wrk over loopback with the same key mix, in alternating rounds so that
machine noise hits every contender alike. Prints requests/s, p50/p99 latency and ratios.

    python bench/http_bench.py [--workers 2] [--threads 1] [--connections 32] [--seconds 8] [--rounds 2]

Needs wrk (Debian package) and Redis at REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "bench-secret-0123456789abcdef0123456789"
ADMIN = "bench-admin-token"

LUA = """
local keys = {}
for k in string.gmatch(os.getenv("BENCH_KEYS"), "[^,]+") do table.insert(keys, k) end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/data", {["X-API-Key"] = keys[(i % #keys) + 1]})
end
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn(target: str, port: int, env: dict[str, str], workers: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--log-level", "warning",
           "--no-control-socket"]
    if threads > 1:
        cmd += ["-k", "gthread", "--threads", str(threads)]
    # Output to a file, never an unread pipe: a full pipe would block the workers' logging.
    with open(Path(tempfile.gettempdir()) / f"http-bench-{port}.log", "ab") as out:
        return subprocess.Popen([*cmd, target], cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen, path: str = "/health", ok=(200, 401)) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server at {url} exited; see {tempfile.gettempdir()}/http-bench-*.log")
        try:
            if requests.get(url + path, timeout=1).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not start")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def parse_latency(text: str) -> float:
    """wrk prints latencies as 812.00us, 4.13ms, 1.02s or 1.50m."""
    match = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if match is None:
        raise SystemExit(f"cannot read wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def wrk_field(pattern: str, out: str) -> str:
    """One value from wrk's report; a missing one means wrk's output changed, so say which."""
    match = re.search(pattern, out, re.M)
    if match is None:
        raise SystemExit(f"wrk output has no match for {pattern!r}:\n{out}")
    return match.group(1)


def run_wrk(url: str, keys: list[str], connections: int, seconds: int, script: Path) -> dict[str, float]:
    env = {**os.environ, "BENCH_KEYS": ",".join(keys)}
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                          url], env=env, capture_output=True, text=True, check=True).stdout
    rps = float(wrk_field(r"Requests/sec:\s+([\d.]+)", out))
    p50 = parse_latency(wrk_field(r"^\s+50%\s+(\S+)", out))
    p99 = parse_latency(wrk_field(r"^\s+99%\s+(\S+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "errors": int(non2xx.group(1)) if non2xx else 0}


def api_env(tmp: Path, prefix: str, workers: int) -> dict[str, str]:
    """The API's environment under load: Redis store, limits no bench reaches, quiet logs."""
    return {**os.environ, "DB_PATH": str(tmp / "bench.db"), "LOG_DIR": str(tmp / "logs"), "REDIS_URL": REDIS_URL,
            "RATELIMIT_KEY_PREFIX": prefix, "JWT_SECRET_KEY": SECRET, "ADMIN_TOKEN": ADMIN,
            "TIER_LIMITS": "enterprise=1000000000", "IP_RATE_LIMIT": "1000000000", "BCRYPT_ROUNDS": "4",
            "ENABLE_SOCKETIO": "false", "WEB_CONCURRENCY": str(workers), "LOG_LEVEL": "WARNING",
            "REGISTER_PER_IP_PER_HOUR": "100000"}


def make_keys(url: str, count: int) -> list[str]:
    keys = []
    for i in range(count):
        user = requests.post(f"{url}/auth/register", json={"username": f"bench{i}{uuid.uuid4().hex[:6]}",
                                                          "password": "bench-password"}, timeout=10).json()
        requests.post(f"{url}/admin/upgrade_tier", json={"user_id": user["user"]["id"], "tier": "enterprise"},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).raise_for_status()
        keys.append(requests.post(f"{url}/auth/create_api_key", json={}, timeout=10,
                                  headers={"Authorization": f"Bearer {user['access_token']}"}).json()["api_key"])
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keys", type=int, default=20)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="http-bench-"))
    script = tmp / "keys.lua"
    script.write_text(LUA)
    prefix = f"rlbench{uuid.uuid4().hex[:6]}"
    ours_env = api_env(tmp, prefix, args.workers)
    ports = {"ratelimiter": free_port(), "flask_limiter": free_port(), "no_limiting": free_port()}
    procs = {"ratelimiter": gunicorn("app:app", ports["ratelimiter"], ours_env, args.workers, args.threads)}
    wait_up(f"http://127.0.0.1:{ports['ratelimiter']}", procs["ratelimiter"])
    keys = make_keys(f"http://127.0.0.1:{ports['ratelimiter']}", args.keys)
    for name, mode in (("flask_limiter", "flask_limiter"), ("no_limiting", "none")):
        env = {**os.environ, "PEER_MODE": mode, "PEER_KEYS": ",".join(keys), "REDIS_URL": REDIS_URL}
        procs[name] = gunicorn("bench.peer_app:app", ports[name], env, args.workers, args.threads)
        wait_up(f"http://127.0.0.1:{ports[name]}", procs[name], path="/data")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    try:
        for port in ports.values():  # warm-up: connections, script loads, caches
            run_wrk(f"http://127.0.0.1:{port}", keys, args.connections, 2, script)
        for _ in range(args.rounds):
            for name, port in ports.items():
                results[name].append(run_wrk(f"http://127.0.0.1:{port}", keys, args.connections, args.seconds, script))
    finally:
        for proc in procs.values():
            stop(proc)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for pattern in (f"{prefix}*", "peerbench*", "LIMITS*"):
            stale = list(client.scan_iter(pattern))
            if stale:
                client.delete(*stale)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {name: {metric: statistics.median(r[metric] for r in runs) for metric in ("rps", "p50", "p99", "errors")}
               for name, runs in results.items()}
    print(f"GET /data, gunicorn -w {args.workers} (threads {args.threads}), wrk -t2 -c{args.connections} "
          f"-d{args.seconds}s x {args.rounds} rounds, {args.keys} keys, Redis store")
    print(f"{'contender':<15} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name, row in summary.items():
        print(f"{name:<15} {row['rps']:>10.0f} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['errors']:>8.0f}")
    ours = summary["ratelimiter"]["rps"]
    print(f"ratio ratelimiter / flask_limiter = {ours / summary['flask_limiter']['rps']:.2f}x (target >= 1.0x)")
    print(f"ratio ratelimiter / no_limiting   = {ours / summary['no_limiting']['rps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
