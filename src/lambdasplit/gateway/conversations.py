"""Multi-turn reuse: a finished request's body session and caches are kept, so that the next turn of
the same conversation sends only its new positions instead of the whole history.

Requests carry no conversation id (the OpenAI API has none): a request continues a kept sequence
when its prompt extends that sequence's previous prompt (prefix match on token ids). The cached
positions past the common prefix (e.g. the previous answer re-tokenised differently by the chat
template) are cropped first, on head, tail and body alike. A kept sequence pins a session (and its
KV) on the body server, so the pool is small (LRU), and entries idle for `ttl` seconds are closed,
below the server's own idle TTL so that a kept session is never found expired there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from lambdasplit.device.body import BodyClient
from lambdasplit.device.model import SplitCache

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    """A body session with the caches of one sequence: `tokens` are the ids its positions hold."""

    body: BodyClient
    cache: SplitCache
    prompt_len: int = 0  # the previous request's prompt: a continuation must contain all of it
    tokens: list[int] = field(default_factory=list)
    used: float = 0.0

    def close(self) -> None:
        try:
            self.body.close()
        except Exception:  # noqa: BLE001 - closing is best effort; the server's TTL ends it too
            log.warning("closing a kept body session failed", exc_info=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationPool:
    """Kept sequences, at most `capacity`, each taken by one request at a time."""

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.ttl, self.clock = capacity, ttl, clock
        self._kept: OrderedDict[int, Conversation] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def take(self, prompt: list[int]) -> tuple[Conversation, int] | None:
        """The kept sequence that `prompt` continues (removed from the pool) and how many of its
        positions `prompt` shares; None when none does."""
        self.expire()
        with self._lock:
            best: tuple[int, int] | None = None
            for key, conv in self._kept.items():
                shared = common_prefix(conv.tokens, prompt)
                if shared >= conv.prompt_len and (best is None or shared > best[1]):
                    best = (key, shared)
            if best is None:
                return None
            return self._kept.pop(best[0]), best[1]

    def put(self, conv: Conversation) -> None:
        """Keep `conv` for a later turn; the least recently used one beyond `capacity` is closed."""
        conv.used = self.clock()
        with self._lock:
            self._kept[id(conv)] = conv
            evicted = [self._kept.popitem(last=False)[1] for _ in range(max(0, len(self._kept) - self.capacity))]
        for old in evicted:
            old.close()

    def expire(self) -> None:
        """Close every sequence idle for longer than `ttl`."""
        now = self.clock()
        with self._lock:
            old = [k for k, c in self._kept.items() if now - c.used > self.ttl]
            expired = [self._kept.pop(k) for k in old]
        for conv in expired:
            conv.close()

    def close(self) -> None:
        with self._lock:
            kept, self._kept = list(self._kept.values()), OrderedDict()
        for conv in kept:
            conv.close()
