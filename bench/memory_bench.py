"""Memory per 100k active keys, for each strategy, on the memory store and on Redis.

Each of N subjects (default 100 000) makes H admitted requests (default 5, the free tier's
budget) inside one window. Memory store: bytes allocated by Python (tracemalloc) for the
limiter's state. Redis: growth of ``used_memory`` (INFO memory) for our keys, which are deleted
afterwards. ``limits``' moving window on its memory storage is measured alongside as the peer.

    python bench/memory_bench.py [--subjects 100000] [--hits 5]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from limiter import STRATEGIES, RateLimiter  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"


def fill(limiter: RateLimiter, subjects: int, hits: int) -> None:
    for i in range(subjects):
        for _ in range(hits):
            limiter.hit(f"k:{i}", 1000, 60)


def memory_store(strategy: str, subjects: int, hits: int) -> int:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    limiter = RateLimiter("memory://", strategy, tier_limits={"free": 1000}, clock=time.time)
    fill(limiter, subjects, hits)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    limiter.close()
    return used


def redis_store(strategy: str, subjects: int, hits: int) -> int:
    """Sum of MEMORY USAGE over every key we wrote (exact per key, unlike used_memory deltas,
    which other clients and the allocator's lazy freeing blur)."""
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"rlmem{uuid.uuid4().hex[:6]}"
    limiter = RateLimiter(REDIS_URL, strategy, tier_limits={"free": 1000}, key_prefix=prefix)
    fill(limiter, subjects, hits)
    used = 0
    with client.pipeline(transaction=False) as pipe:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for key in keys:
            pipe.memory_usage(key, samples=0)
        used = sum(size or 0 for size in pipe.execute())
    limiter.reset()
    limiter.close()
    return used


def limits_peer(subjects: int, hits: int) -> int:
    from limits import RateLimitItemPerMinute
    from limits.storage import MemoryStorage
    from limits.strategies import MovingWindowRateLimiter

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    storage = MemoryStorage()
    peer = MovingWindowRateLimiter(storage)
    item = RateLimitItemPerMinute(1000)
    for i in range(subjects):
        for _ in range(hits):
            peer.hit(item, f"k:{i}")
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    storage.reset()
    return used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--hits", type=int, default=5)
    args = parser.parse_args()
    scale = 100_000 / args.subjects
    print(f"{args.subjects} subjects x {args.hits} admitted requests each; bytes scaled to 100k keys")
    print(f"{'store':<8} {'strategy':<24} {'MiB per 100k keys':>18} {'bytes per key':>14}")
    rows = []
    for name in STRATEGIES:
        rows.append(("memory", name, memory_store(name, args.subjects, args.hits)))
    rows.append(("memory", "limits moving_window", limits_peer(args.subjects, args.hits)))
    for name in STRATEGIES:
        rows.append(("redis", name, redis_store(name, args.subjects, args.hits)))
    for store, name, used in rows:
        print(f"{store:<8} {name:<24} {used * scale / 2**20:>18.1f} {used / args.subjects:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
