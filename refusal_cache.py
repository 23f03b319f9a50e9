"""Refusals remembered in the process, so a flood is refused without a store round trip.

A refusal is kept until the first moment the store could admit the subject again (its
``retry_after``), and only while nothing can have changed that: every write that could admit
earlier (a tier change, block or unblock, an unban, an override, a reset) is published on one
Redis pub/sub channel, and every process drops the entries it names as the message arrives.

Guarantees, and how they are kept:
- An entry is stored only if this process's subscription was confirmed before the store answered
  and no invalidation arrived while the request was in flight (``generation`` unchanged), so an
  invalidation can never be overtaken by the refusal it invalidates.
- The subscription is the cache's lifeline: when it breaks (Redis restarts, a failover, a network
  error noticed by the 1 s health check) every entry is dropped and nothing is cached until the
  process has subscribed again. Lost messages therefore cannot leave a stale refusal behind.
- What remains is the delivery delay of one pub/sub message (well under a millisecond on a LAN):
  a request that races a tier change by less than that may be refused from memory, exactly as if
  it had reached the store just before the change.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

MAX_ENTRIES = 100_000  # a flood of distinct subjects must not grow memory without bound
EVERYTHING = "*"


class RefusalCache:
    """name -> (until_us, payload) of refusals, invalidated through pub/sub.

    ``subscribe()`` (given by the store) returns a redis-py PubSub already subscribed to the
    channel; it is called again (with backoff) whenever the subscription breaks.
    """

    def __init__(self, subscribe: Callable[[], Any]) -> None:
        self._subscribe = subscribe
        self._entries: dict[str, tuple[int, Any]] = {}
        self.generation = 0  # bumped by every invalidation this process learns of
        self.live = False  # subscribed: entries may be stored and used
        self._pid = 0
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: Any = None
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()

    # ---- lookups (the hot path: no lock, dict operations are atomic under the GIL)
    def get(self, name: str, now: int) -> Any:
        item = self._entries.get(name)
        if item is None:
            return None
        if item[0] <= now or not self.live:
            self._entries.pop(name, None)
            return None
        return item[1]

    def ready(self) -> int | None:
        """The generation to pass to ``put`` for a request about to go to the store, or None when
        refusals cannot be cached now (not subscribed yet: the subscriber is started)."""
        if self._pid != os.getpid():
            self._start()
        return self.generation if self.live else None

    def put(self, name: str, until: int, payload: Any, generation: int | None) -> None:
        if generation is None:
            return
        with self._lock:  # the check and the insert are one step against a concurrent ``drop``
            if generation != self.generation or not self.live:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[name] = (until, payload)

    # ---- invalidation
    def drop(self, name: str) -> None:
        """Forget ``name`` (or everything for ``*``) in this process."""
        with self._lock:
            self.generation += 1
            if name == EVERYTHING:
                self._entries.clear()
            else:
                self._entries.pop(name, None)

    def clear(self) -> None:
        self.drop(EVERYTHING)

    # ---- the subscriber thread
    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid() or self._closed.is_set():
                return
            # A fork (gunicorn worker): the parent's thread and subscription do not exist here.
            self._pid, self.live, self._entries = os.getpid(), False, {}
            self._thread = threading.Thread(target=self._listen, name="refusal-cache", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        delay = 0.05
        while not self._closed.is_set():
            try:
                self._pubsub = pubsub = self._subscribe()
                self.clear()
                self.live = True
                delay = 0.05
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        data = message["data"]
                        self.drop(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError, ValueError, AttributeError) as exc:
                if self.live:
                    log.warning("refusal cache: invalidation channel lost (%s); cache off until resubscribed", exc)
            finally:
                self.live = False
                self.clear()
                self._close_pubsub()
            self._closed.wait(delay)
            delay = min(delay * 2, 2.0)

    def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass

    def close(self) -> None:
        """Stop caching; the subscriber thread (a daemon) ends within its 1 s poll."""
        self._closed.set()
        self.live = False
        self._entries.clear()
