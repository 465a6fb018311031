"""`SessionPool`: values kept between requests (a conversation's body session and caches, a
protected conversation's stand-ins), for the gateway and the UI alike.

Idle values live in a cachetools `TTLCache` (or `LRUCache` without a TTL): beyond `capacity` the
least recently used is closed, and one idle for `ttl` seconds is closed. A value in use is held
outside that cache, so it is never evicted under its user; one key has one user at a time (a cache
cannot serve two generations, and a conversation's stand-ins change as a turn runs). Values are
closed outside the pool's lock: closing a body session may wait on the network.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from cachetools import LRUCache, TTLCache

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Evicting:
    """Hands what the cache evicts to `dropped` instead of forgetting it (mixed into a cachetools cache)."""

    dropped: list[Any]

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()  # type: ignore[misc]
        self.dropped.append(item[1])
        return item


class _Idle(_Evicting, TTLCache):
    """Idle values with a TTL; what expires goes to `dropped` too."""

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float], dropped: list[Any]) -> None:
        super().__init__(capacity, ttl, timer=clock)
        self.dropped = dropped

    def expire(self, time: float | None = None) -> list[tuple[Any, Any]]:
        expired = super().expire(time)
        self.dropped.extend(value for _, value in expired)
        return expired


class _IdleLRU(_Evicting, LRUCache):
    """Idle values without a TTL."""

    def __init__(self, capacity: int, dropped: list[Any]) -> None:
        super().__init__(capacity)
        self.dropped = dropped

    def expire(self, time: float | None = None) -> list[tuple[Any, Any]]:
        return []


class _InUse(Generic[V]):
    def __init__(self, value: V) -> None:
        self.value = value
        self.turn = threading.Lock()  # one user of the key at a time
        self.users = 0  # the one running and those waiting for their turn
        self.dropped = False  # closed once its last user is done, not kept


class SessionPool(Generic[K, V]):
    """At most `capacity` idle values (0: none is kept), each closed with `close` when evicted, after
    `ttl` idle seconds (None: never) or with the pool."""

    def __init__(self, capacity: int, ttl: float | None, close: Callable[[V], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.ttl, self._close = capacity, ttl, close
        self._dropped: list[V] = []
        size = max(capacity, 1)  # cachetools refuses a size of 0; put() keeps nothing then
        self._idle = _Idle(size, ttl, clock, self._dropped) if ttl is not None else _IdleLRU(size, self._dropped)
        self._busy: dict[K, _InUse[V]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        with self._lock:
            self._idle.expire()
            count = len(self._idle) + len(self._busy)
        self._close_dropped()
        return count

    @contextlib.contextmanager
    def use(self, key: K, make: Callable[[], V]) -> Iterator[V]:
        """The value of `key` (made if none is kept) for one user at a time; kept when done."""
        with self._lock:
            self._idle.expire()
            entry = self._busy.get(key)
            if entry is None:
                kept = self._idle.pop(key, _MISSING)
                entry = self._busy[key] = _InUse(make() if kept is _MISSING else kept)
            entry.users += 1
        self._close_dropped()
        try:
            with entry.turn:
                yield entry.value
        finally:
            with self._lock:
                entry.users -= 1
                if not entry.users:
                    del self._busy[key]
                    if entry.dropped:
                        self._dropped.append(entry.value)
                    else:
                        self._keep(key, entry.value)
            self._close_dropped()

    def take(self, score: Callable[[V], int | None]) -> tuple[V, int] | None:
        """The idle value with the highest `score` (None: not a candidate), removed from the pool, and its score."""
        with self._lock:
            self._idle.expire()
            scored = [(s, key) for key, value in self._idle.items() if (s := score(value)) is not None]
            best = max(scored, key=lambda pair: pair[0], default=None)
            taken = None if best is None else (self._idle.pop(best[1]), best[0])
        self._close_dropped()
        return taken

    def put(self, key: K, value: V) -> None:
        """Keep `value` (idle) under `key`: the least recently used beyond `capacity` is closed."""
        with self._lock:
            self._keep(key, value)
        self._close_dropped()

    def drop(self, key: K) -> None:
        """Close the value of `key` now, or when its user is done with it."""
        with self._lock:
            if key in self._busy:
                self._busy[key].dropped = True
            elif (value := self._idle.pop(key, _MISSING)) is not _MISSING:
                self._dropped.append(value)
        self._close_dropped()

    def expire(self) -> None:
        """Close every value idle for longer than `ttl`."""
        with self._lock:
            self._idle.expire()
        self._close_dropped()

    def close(self) -> None:
        """Close every idle value; values in use are closed when their users are done."""
        with self._lock:
            self._idle.expire()
            self._dropped.extend(self._idle.pop(key) for key in list(self._idle.keys()))
            for entry in self._busy.values():
                entry.dropped = True
        self._close_dropped()

    def _keep(self, key: K, value: V) -> None:  # with the lock held
        if self.enabled:
            self._idle[key] = value
        else:
            self._dropped.append(value)

    def _close_dropped(self) -> None:
        with self._lock:
            dropped, self._dropped[:] = list(self._dropped), []
        for value in dropped:
            try:
                self._close(value)
            except Exception:  # noqa: BLE001 - closing is best effort (a body server's TTL ends a lost session too)
                log.warning("closing a kept value failed", exc_info=True)


_MISSING = object()
