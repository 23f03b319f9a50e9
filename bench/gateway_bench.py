"""Gateway benchmark: the /forward_auth decision vs GET /data; the balancer plain vs in gateway mode vs
nginx with the shipped config (gateways/nginx.conf.template), all in front of one fast backend.

One run starts the API under gunicorn (Redis store, keys far under their limits), the fast
backend of bench/lb_bench.py, nginx in a temporary prefix and two balancers (plain, and
``--forward-auth`` to the API), all on free loopback ports; wrk drives each target in
interleaved rounds and the medians are printed:

- ``data``: GET /data with X-API-Key, the API's own limited route;
- ``forward_auth``: the decision call a gateway makes (X-Forwarded-Method/-Uri plus the key);
- ``direct``: the fast backend alone;
- ``nginx_gateway``: nginx deciding each request with /forward_auth, then proxying to that backend;
- ``lb_plain``: load_balancer.py proxying to that backend;
- ``lb_gateway``: load_balancer.py --forward-auth (one decision call per request, keep-alive), then proxying.

The added latency of the balancer's decision is lb_gateway's p50 minus lb_plain's (issue 13's target:
at most 1 ms at moderate load, e.g. --connections 8).

    python bench/gateway_bench.py [--workers 2] [--connections 32] [--seconds 8] [--rounds 3] [--targets ...]

Needs wrk, nginx (with auth_request, e.g. nginx-light) and Redis at REDIS_URL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from http_bench import REDIS_URL, api_env, free_port, gunicorn, make_keys, run_wrk, stop, wait_up
from lb_bench import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

LUA = """
local keys = {}
for k in string.gmatch(os.getenv("BENCH_KEYS"), "[^,]+") do table.insert(keys, k) end
local path, forwarded = os.getenv("BENCH_PATH"), os.getenv("BENCH_FORWARDED") == "1"
local i = 0
request = function()
  i = i + 1
  local headers = {["X-API-Key"] = keys[(i % #keys) + 1]}
  if forwarded then
    headers["X-Forwarded-Method"] = "GET"
    headers["X-Forwarded-Uri"] = "/v1/items?page=" .. (i % 10)
  end
  return wrk.format("GET", path, headers)
end
"""


def start_nginx(tmp: Path, listen_port: int, upstream: str, ratelimiter: str) -> subprocess.Popen:
    """The shipped template, rendered as envsubst would, with temp paths in the private prefix."""
    text = (ROOT / "gateways" / "nginx.conf.template").read_text()
    for name, value in (("LISTEN_PORT", str(listen_port)), ("UPSTREAM", upstream), ("RATELIMITER", ratelimiter)):
        text = text.replace("${" + name + "}", value)
    temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                               "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(text.replace("http {\n", "http {\n" + temp_paths, 1))
    with open(tmp / "nginx.out", "ab") as out:
        return subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf),
                                 "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;"],
                                stdout=out, stderr=out, start_new_session=True)


def start_backend(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "lb_bench.py"), "--serve-backend", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start_lb(tmp: Path, port: int, backend: str, forward_auth: str | None) -> subprocess.Popen:
    """load_balancer.py in front of ``backend``; in gateway mode when ``forward_auth`` is a decision URL."""
    cmd = [sys.executable, str(ROOT / "load_balancer.py"), "--port", str(port), "--backends", backend]
    if forward_auth:
        cmd += ["--forward-auth", forward_auth]
    env = {**os.environ, "LB_LOG_LEVEL": "WARNING"}
    with open(tmp / f"lb-{port}.log", "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)


def wait_port(url: str, proc: subprocess.Popen, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited before serving {url}")
        try:
            requests.get(url, headers=headers, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


TARGETS = ("data", "forward_auth", "direct", "nginx_gateway", "lb_plain", "lb_gateway")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers of the API [2]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of targets [{','.join(TARGETS)}]")
    args = parser.parse_args()
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"error: {tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    script = tmp / "bench.lua"
    script.write_text(LUA)
    prefix = f"rlbench{uuid.uuid4().hex[:6]}"
    env = {**api_env(tmp, prefix, args.workers), "TRUSTED_PROXIES": "1"}
    api_port, backend_port, nginx_port, lb_port, lbg_port = (free_port() for _ in range(5))
    procs = {"api": gunicorn("app:app", api_port, env, args.workers, args.threads),
             "backend": start_backend(backend_port)}
    try:
        api = f"http://127.0.0.1:{api_port}"
        wait_up(api, procs["api"])
        keys = make_keys(api, args.keys)
        backend = f"http://127.0.0.1:{backend_port}"
        wait_port(backend + "/", procs["backend"])
        procs["nginx"] = start_nginx(tmp, nginx_port, f"127.0.0.1:{backend_port}", f"127.0.0.1:{api_port}")
        wait_port(f"http://127.0.0.1:{nginx_port}/", procs["nginx"])
        admitted = requests.get(f"http://127.0.0.1:{nginx_port}/v1/items", headers={"X-API-Key": keys[0]}, timeout=5)
        if admitted.status_code != 200:
            raise SystemExit(f"nginx gateway refused a valid key: {admitted.status_code} {admitted.text}")
        procs["lb_plain"] = start_lb(tmp, lb_port, backend, None)
        procs["lb_gateway"] = start_lb(tmp, lbg_port, backend, f"{api}/forward_auth")
        for port, name in ((lb_port, "lb_plain"), (lbg_port, "lb_gateway")):
            wait_port(f"http://127.0.0.1:{port}/lb/health", procs[name])
        lbg = f"http://127.0.0.1:{lbg_port}"
        refused = requests.get(f"{lbg}/v1/items", timeout=5)
        admitted = requests.get(f"{lbg}/v1/items", headers={"X-API-Key": keys[0]}, timeout=5)
        if refused.status_code != 401 or admitted.status_code != 200:
            raise SystemExit(f"balancer gateway mode: no key gave {refused.status_code} (want 401), "
                             f"a valid key {admitted.status_code} (want 200): {admitted.text}")
        # name -> (url, path, forwarded headers?, the processes whose CPU serves it)
        api_pids, backend_pids = [procs["api"].pid], [procs["backend"].pid]
        targets = {
            "data": (api, "/data", False, api_pids),
            "forward_auth": (api, "/forward_auth", True, api_pids),
            "direct": (backend, "/v1/items", False, backend_pids),
            "nginx_gateway": (f"http://127.0.0.1:{nginx_port}", "/v1/items", False,
                              [procs["nginx"].pid, *api_pids, *backend_pids]),
            "lb_plain": (f"http://127.0.0.1:{lb_port}", "/v1/items", False, [procs["lb_plain"].pid, *backend_pids]),
            "lb_gateway": (lbg, "/v1/items", False, [procs["lb_gateway"].pid, *api_pids, *backend_pids]),
        }
        targets = {name: targets[name] for name in args.targets.split(",")}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}

        def measure(name: str, seconds: int) -> dict[str, float]:
            """wrk's numbers plus the CPU the serving processes spent per request: the figure that
            stays comparable when neighbours take the machine's cores."""
            url, path, fwd, pids = targets[name]
            os.environ.update(BENCH_PATH=path, BENCH_FORWARDED="1" if fwd else "0")
            before = sum(cpu_seconds(pid) for pid in pids)
            result = run_wrk(url, keys, args.connections, seconds, script)
            served = result["rps"] * seconds
            result["cpu_us"] = (sum(cpu_seconds(pid) for pid in pids) - before) / served * 1e6 if served else 0.0
            return result

        for name in targets:  # warm-up: connections, caches, the key directory of every worker
            measure(name, 2)
        for _ in range(args.rounds):
            for name in targets:
                results[name].append(measure(name, args.seconds))
    finally:
        for proc in procs.values():
            stop(proc)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        stale = list(client.scan_iter(f"{prefix}*"))
        if stale:
            client.delete(*stale)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {name: {m: statistics.median(r[m] for r in runs) for m in ("rps", "p50", "p99", "errors", "cpu_us")}
               for name, runs in results.items()}
    print(f"gunicorn -w {args.workers} (threads {args.threads}), Redis store, wrk -t2 -c{args.connections} "
          f"-d{args.seconds}s x {args.rounds} interleaved rounds (medians), {args.keys} keys under their limits")
    print(f"{'target':<15} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'cpu us/req':>11}")
    for name, row in summary.items():
        print(f"{name:<15} {row['rps']:>10.0f} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['errors']:>8.0f} "
              f"{row['cpu_us']:>11.0f}")
    if {"data", "forward_auth"} <= set(summary):
        ratio = summary["forward_auth"]["rps"] / summary["data"]["rps"]
        cpu_ratio = summary["data"]["cpu_us"] / summary["forward_auth"]["cpu_us"]
        verdict = "met" if min(ratio, cpu_ratio) >= 1.0 else "MISSED" if max(ratio, cpu_ratio) < 1.0 else "mixed"
        print(f"forward_auth / data throughput = {ratio:.2f}x, by CPU per request = {cpu_ratio:.2f}x "
              f"(target >= 1.0): {verdict}")
    if {"direct", "nginx_gateway"} <= set(summary):
        added = summary["nginx_gateway"]["p50"] - summary["direct"]["p50"]
        print(f"nginx gateway adds {added:.2f} ms at p50 over the direct backend "
              f"({summary['nginx_gateway']['rps'] / summary['direct']['rps']:.2f}x its throughput)")
    if {"lb_plain", "lb_gateway"} <= set(summary):
        added = summary["lb_gateway"]["p50"] - summary["lb_plain"]["p50"]
        print(f"balancer gateway mode adds {added:.2f} ms at p50 over the plain balancer at {args.connections} "
              f"connections (target <= 1 ms): {'met' if added <= 1.0 else 'MISSED'}; "
              f"{summary['lb_gateway']['rps'] / summary['lb_plain']['rps']:.2f}x its throughput")
        if "forward_auth" in summary:
            print(f"  of which the decision alone (forward_auth p50, called directly): "
                  f"{summary['forward_auth']['p50']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
