"""Shared-store benchmarks: one Redis vs a 3-master Redis Cluster, and a flood with and without the
refusal cache, next to ``limits`` (the engine of Flask-Limiter) on the same Redis.

Both topologies are private servers started here on free loopback ports (tests/redis_servers.py):
one ``redis-server`` with the cluster nodes' settings, and a 3-master/3-replica cluster.

1. Decisions/s of the full ``check_request`` (IP ban and count, subject meta and hit: two hash
   slots, so on the cluster two scripts on two masters written before either reply is read), all
   admitted, refusal cache off; one process, then N processes at once (aggregate).
2. Flood: one key at 100x its limit (limit 100 per 60 s, 10 000 requests from one client IP):
   refusals/s over the whole flood (the 100 admissions and the first refusal included) of
   ``check_request`` with the cache off and on, and of limits' moving window doing what
   Flask-Limiter does per request here (a per-IP and a per-key limit: two ``hit`` calls); then
   10 000 more requests once the key is refused (steady state).

    /work/main/.venv/bin/python bench/store_bench.py [--n 20000] [--procs 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from limits import parse
from limits.storage import RedisClusterStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from limiter import RateLimiter  # noqa: E402
from tests.redis_servers import ClusterServers, cluster_port  # noqa: E402

FLOOD_LIMIT, FLOOD_N = 100, 10_000
TIERS = {"free": FLOOD_LIMIT, "enterprise": 10**9}
STEADY: list[float] = []  # refusals/s of the last flood_ours call once the key is refused


def single_redis() -> tuple[subprocess.Popen, str]:
    port = cluster_port()
    tmp = tempfile.mkdtemp(prefix="rl-bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def throughput_run(url: str, n: int, barrier: Any = None) -> float:
    rl = RateLimiter(url, tier_limits=TIERS, key_prefix=f"b{uuid.uuid4().hex[:8]}", ip_limit=10**9,
                     refusal_cache=False)
    subjects = [f"s{i}" for i in range(200)]
    for subject in subjects:
        rl.set_meta(subject, tier="enterprise", blocked=False)
    for subject in subjects[:50]:  # warm: connections and scripts on every node
        rl.check_request("ip-" + subject, subject)
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for i in range(n):
        subject = subjects[i % 200]
        rl.check_request("ip-" + subject, subject)
    rate = n / (time.perf_counter() - start)
    assert rl.health() == "ok"
    rl.reset()
    rl.close()
    return rate


def _child(url: str, n: int, barrier: Any, queue: Any) -> None:
    queue.put(throughput_run(url, n, barrier))


def parallel(url: str, n: int, procs: int) -> float:
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    children = [ctx.Process(target=_child, args=(url, n, barrier, queue)) for _ in range(procs)]
    for child in children:
        child.start()
    rates = [queue.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    return sum(rates)


def flood_ours(url: str, cache: bool) -> float:
    rl = RateLimiter(url, tier_limits=TIERS, key_prefix=f"b{uuid.uuid4().hex[:8]}", ip_limit=10**9,
                     refusal_cache=cache)
    rl.set_meta("abuser", tier="free", blocked=False)
    if cache:
        assert rl._refusals is not None
        rl._refusals.ready()
        while not rl._refusals.live:
            time.sleep(0.01)  # the subscription is being set up (once per process)
    refused = 0
    start = time.perf_counter()
    for _ in range(FLOOD_N):
        result = rl.check_request("6.6.6.6", "abuser").result
        refused += result is not None and not result.allowed
    rate = refused / (time.perf_counter() - start)
    assert refused == FLOOD_N - FLOOD_LIMIT and rl.health() == "ok", refused
    start = time.perf_counter()  # steady state: the key is refused, every request is a refusal
    for _ in range(FLOOD_N):
        rl.check_request("6.6.6.6", "abuser")
    STEADY.append(FLOOD_N / (time.perf_counter() - start))
    rl.reset()
    rl.close()
    return rate


def flood_limits(url: str) -> float:
    prefix = f"blimits{uuid.uuid4().hex[:8]}"
    storage: RedisStorage | RedisClusterStorage
    if url.startswith("redis+cluster://"):
        storage = RedisClusterStorage(url, key_prefix=prefix)
    else:
        storage = RedisStorage(url, key_prefix=prefix)
    limiter = MovingWindowRateLimiter(storage)
    per_ip, per_key = parse(f"{10**9}/minute"), parse(f"{FLOOD_LIMIT}/minute")
    refused = 0
    start = time.perf_counter()
    for _ in range(FLOOD_N):
        # Flask-Limiter: every limit of the route is hit in turn; the request is refused if any refuses.
        ok = limiter.hit(per_ip, "6.6.6.6") and limiter.hit(per_key, "abuser")
        refused += not ok
    rate = refused / (time.perf_counter() - start)
    assert refused == FLOOD_N - FLOOD_LIMIT, refused
    storage.reset()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    single, single_url = single_redis()
    cluster = ClusterServers()
    stores = {"one Redis": single_url, "Redis Cluster (3 masters)": cluster.url}
    try:
        rows: dict[str, dict[str, list[float]]] = {name: {} for name in stores}
        for _ in range(args.repeat):  # interleaved, so machine noise hits both stores alike
            for name, url in stores.items():
                row = rows[name]
                row.setdefault("seq", []).append(throughput_run(url, args.n))
                row.setdefault("par", []).append(parallel(url, args.n // 2, args.procs))
                row.setdefault("off", []).append(flood_ours(url, False))
                row.setdefault("steady_off", []).append(STEADY.pop())
                row.setdefault("on", []).append(flood_ours(url, True))
                row.setdefault("steady_on", []).append(STEADY.pop())
                row.setdefault("limits", []).append(flood_limits(url))
    finally:
        cluster.stop()
        single.terminate()
        single.wait(10)
        shutil.rmtree(str(single.args[-1]), ignore_errors=True)  # type: ignore[index]  # its --dir
    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    print(f"# check_request decisions/s (all admitted, cache off), median of {args.repeat}")
    print(f"| store | 1 process | {args.procs} processes |")
    print("|---|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['seq']:,.0f} | {m['par']:,.0f} |")
    one, many = med["one Redis"], med["Redis Cluster (3 masters)"]
    print(f"ratio cluster / one Redis: {many['seq'] / one['seq']:.2f}x (1 process), "
          f"{many['par'] / one['par']:.2f}x ({args.procs} processes)")
    print(f"\n# flood: one key at 100x its limit ({FLOOD_N} requests, limit {FLOOD_LIMIT}); refusals/s")
    print("| store | ours, cache off | ours, cache on | on / off | limits moving window (Flask-Limiter's engine) "
          "| ours on / limits |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['off']:,.0f} | {m['on']:,.0f} | {m['on'] / m['off']:.1f}x | "
              f"{m['limits']:,.0f} | {m['on'] / m['limits']:.1f}x |")
    print("\n# once the key is refused: every request a refusal (10 000 more), refusals/s")
    print("| store | cache off | cache on | on / off |")
    print("|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['steady_off']:,.0f} | {m['steady_on']:,.0f} | "
              f"{m['steady_on'] / m['steady_off']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
