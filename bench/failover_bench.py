"""What a failover loses: admissions acknowledged by the old master that the new master never saw.

Redis replicates asynchronously, so a master killed mid-stream can take its last writes with it;
after the failover those requests are no longer counted and the same number can be admitted
again: the over-admission window. For each topology (private servers, tests/redis_servers.py):
threads hit one subject flat out (limit far above the load), the master owning it is killed
(SIGKILL), and once the limiter has found the new master the surviving count is compared with
the admissions acknowledged before the kill. Also reported: how long decisions ran on the
fallback (fail mode "memory") before the shared store was back.

    /work/main/.venv/bin/python bench/failover_bench.py [--runs 3] [--threads 4]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from limiter import RateLimiter  # noqa: E402
from redis_wire import key_slot  # noqa: E402
from tests.redis_servers import SENTINEL_PASSWORD, ClusterServers, SentinelServers  # noqa: E402

LIMIT = 10**9


def one_run(kind: str, servers: Any, threads: int) -> tuple[int, int, float]:
    """(acknowledged before the kill, lost, seconds until the shared store answered again)."""
    rl = RateLimiter(servers.url, tier_limits={"free": 5}, key_prefix=f"fo{uuid.uuid4().hex[:8]}",
                     fail_mode="memory", refusal_cache=False)
    key = rl.keys.subject("hot", "sw")
    store: Any = rl._store
    if kind == "cluster":
        store.slots.refresh()
        victim = store.slots.node(key_slot(key))[1]
    else:
        victim = servers.master()
    acked = [0]
    frozen: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            down_before = rl._down
            result = rl.hit("hot", LIMIT)
            if result.allowed and not down_before and not rl._down:
                with lock:
                    if not frozen:
                        acked[0] += 1

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # a steady stream of writes
    servers.kill(victim)
    with lock:
        frozen.append(acked[0])
    killed_at = time.monotonic()
    while True:
        time.sleep(0.05)
        if not rl._down and rl.health() == "ok" and time.monotonic() - killed_at > 0.5:
            try:
                store.ping()
                break
            except redis.RedisError:
                continue
    back_after = time.monotonic() - killed_at
    stop.set()
    for worker in workers:
        worker.join()
    if kind == "cluster":
        store.slots.refresh()
        port = store.slots.node(key_slot(key))[1]
        client = redis.Redis(port=port)
    else:
        client = redis.Redis(port=servers.master(), password=SENTINEL_PASSWORD)
    survived = client.zcount(key, "-inf", "+inf")
    # Entries written after recovery are newer than the kill; count only what the old master acknowledged.
    lost = max(0, frozen[0] - min(survived, frozen[0]))
    rl.reset()
    rl.close()
    servers.restart(victim)
    servers.wait_ok(60)
    return frozen[0], lost, back_after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    print("| topology | run | admissions acknowledged before the kill | lost in the failover | store back after |")
    print("|---|---:|---:|---:|---:|")
    for kind, make in (("sentinel", SentinelServers), ("cluster", ClusterServers)):
        servers = make()
        try:
            for run in range(args.runs):
                acked, lost, back = one_run(kind, servers, args.threads)
                print(f"| {kind} | {run + 1} | {acked:,} | {lost} | {back:.1f} s |", flush=True)
        finally:
            servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
