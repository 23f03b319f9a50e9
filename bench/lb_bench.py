"""Benchmark the load balancer against nginx in front of the same fast backend.

Starts a minimal aiohttp backend, nginx (bench/nginx.conf, in a temporary prefix) and
``load_balancer.py``, all on free loopback ports, then drives each target with wrk (or, when
wrk is missing, a built-in aiohttp client) and prints requests/s, p50/p99 latency and the
balancer/nginx ratios. Everything it starts is stopped before it exits.

    python bench/lb_bench.py --duration 10 --connections 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class Result:
    """One target's throughput and latency."""

    target: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float | None = None  # CPU of the target process(es) per request, immune to noisy neighbours


def cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid`` and its descendants (nginx's workers), from /proc."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Poll ``url`` until it answers (bounded), failing early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                resp.read()
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextmanager
def running(cmd: Sequence[str], ready_url: str, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process, wait until ``ready_url`` answers, and always stop it afterwards."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    try:
        wait_http(ready_url, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_backend(port: int) -> None:
    """The fast backend: a tiny JSON answer on every path."""
    from aiohttp import web

    body = b'{"server": "bench-backend", "ok": true}'

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


def nginx_config(prefix: Path, listen_port: int, backend_port: int, workers: int) -> Path:
    text = NGINX_TEMPLATE.read_text()
    values = {"prefix": str(prefix), "listen_port": listen_port, "backend_port": backend_port, "workers": workers}
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def parse_wrk(target: str, output: str) -> Result:
    """Read requests/s and the 50%/99% lines of ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    percentiles = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        percentiles[pct] = float(value) * UNITS[unit]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors += int(non2xx.group(1)) if non2xx else 0
    return Result(target, rps, percentiles["50"], percentiles["99"], errors)


def run_wrk(target: str, url: str, args: argparse.Namespace) -> Result:
    base = ["wrk", f"-t{args.threads}", f"-c{args.connections}", "--latency"]
    subprocess.run([*base, "-d2s", url], check=True, capture_output=True)  # warm-up
    out = subprocess.run([*base, f"-d{args.duration}s", url], check=True, capture_output=True, text=True).stdout
    log.debug("%s\n%s", target, out)
    return parse_wrk(target, out)


async def _client_load(url: str, connections: int, duration: float) -> tuple[int, list[float], int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status >= 400:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - start) * 1000)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return len(latencies), latencies, errors


def run_client(target: str, url: str, args: argparse.Namespace) -> Result:
    """Fallback load generator when wrk is not installed (slower: it competes for the CPU)."""
    count, latencies, errors = asyncio.run(_client_load(url, args.connections, args.duration))
    cuts = statistics.quantiles(latencies, n=100)
    return Result(target, count / args.duration, cuts[49], cuts[98], errors)


def benchmark(args: argparse.Namespace) -> list[Result]:
    load = run_wrk if shutil.which("wrk") and not args.no_wrk else run_client
    backend_port, nginx_port, lb_port = free_port(), free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}"
    with ExitStack() as stack:
        prefix = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lb-bench-")))
        backend = stack.enter_context(
            running([sys.executable, __file__, "--serve-backend", str(backend_port)], backend_url + "/")
        )
        targets = {"direct": (backend_url + "/", backend.pid)}
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            conf = nginx_config(prefix, nginx_port, backend_port, args.nginx_workers)
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            proc = stack.enter_context(
                running([nginx, "-p", str(prefix), "-c", str(conf)], f"http://127.0.0.1:{nginx_port}/")
            )
            targets["nginx"] = (f"http://127.0.0.1:{nginx_port}/", proc.pid)
        else:
            log.warning("nginx is not installed; skipping the nginx comparison")
        lb_cmd = [sys.executable, str(ROOT / "load_balancer.py"), "--port", str(lb_port), "--backends", backend_url]
        env = {**os.environ, "LB_LOG_LEVEL": "WARNING"}
        proc = stack.enter_context(running([*lb_cmd, *args.lb_arg], f"http://127.0.0.1:{lb_port}/lb/health", env=env))
        targets["load_balancer"] = (f"http://127.0.0.1:{lb_port}/", proc.pid)
        if args.baseline:  # the same balancer from another checkout, in the same interleaved rounds
            base_port = free_port()
            base_cmd = [sys.executable, str(Path(args.baseline) / "load_balancer.py"), "--port", str(base_port)]
            base_url = f"http://127.0.0.1:{base_port}/"
            proc = stack.enter_context(
                running([*base_cmd, "--backends", backend_url], base_url + "lb/health", env=env, cwd=args.baseline)
            )
            targets["baseline_lb"] = (base_url, proc.pid)
        rounds: dict[str, list[Result]] = {name: [] for name in targets}
        for round_no in range(args.rounds):  # interleaved rounds, so a noisy moment hits every target
            for target, (url, pid) in targets.items():
                before = cpu_seconds(pid)
                result = load(target, url, args)
                served = result.requests_per_s * args.duration
                result.cpu_us_per_request = (cpu_seconds(pid) - before) / served * 1e6 if served else None
                rounds[target].append(result)
                log.info("round %d %s: %.0f req/s", round_no + 1, target, result.requests_per_s)
    return [median_result(name, runs) for name, runs in rounds.items()]


def median_result(target: str, runs: Sequence[Result]) -> Result:
    """Per-field median over the rounds."""
    cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
    return Result(
        target,
        statistics.median(r.requests_per_s for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.errors for r in runs),
        statistics.median(cpu) if cpu else None,
    )


def report(results: Sequence[Result], args: argparse.Namespace) -> str:
    lines = [f"{'target':<14} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu us/req':>11}"]
    for r in results:
        cpu = f"{r.cpu_us_per_request:>11.1f}" if r.cpu_us_per_request is not None else f"{'-':>11}"
        lines.append(f"{r.target:<14} {r.requests_per_s:>10.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>7} {cpu}")
    by_name = {r.target: r for r in results}
    lb, nginx = by_name.get("load_balancer"), by_name.get("nginx")
    if lb and nginx:
        throughput = lb.requests_per_s / nginx.requests_per_s
        p99 = lb.p99_ms / nginx.p99_ms
        verdict = "PASS" if throughput >= 0.5 and p99 <= 2.0 else "MISS"
        lines.append(
            f"ratios: throughput lb/nginx = {throughput:.2f}x (target >= 0.5), p99 lb/nginx = {p99:.2f}x "
            f"(target <= 2.0): {verdict}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run [10]")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections [50]")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads [1]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported [3]")
    parser.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes [1]")
    parser.add_argument("--lb-arg", action="append", default=[], help="extra argument for load_balancer.py")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure load_balancer.py of another checkout (e.g. `git worktree add /tmp/base main`)",
    )
    parser.add_argument("--no-wrk", action="store_true", help="use the built-in client even if wrk exists")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0
    results = benchmark(args)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
