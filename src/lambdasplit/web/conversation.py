"""`Conversation`: one body session and the `SplitCache` of one sequence, kept between turns (in a
`SessionPool`) so that a turn extending the previous one sends only its new positions. The gateway
finds it again by prefix (the OpenAI API names no conversation: `continues`), the UI by the page's
conversation id; both crop it to the common token prefix first (`prepare`: an edited or retried
turn, or an answer the chat template re-tokenises differently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from lambdasplit.device.body import BodyClient
from lambdasplit.device.model import SplitCache, SplitModelForCausalLM

if TYPE_CHECKING:
    from lambdasplit.privacy.protect import ProtectedChat

log = logging.getLogger(__name__)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    """A body session (opened with `connect` on first use) and the caches of one sequence: `tokens`
    are the ids its positions hold, `prompt_len` the last turn's prompt (a continuation contains it).
    The UI keeps a conversation's `ProtectedChat` here too: its stand-ins stay the same across turns."""

    def __init__(self, connect: Callable[[], BodyClient]) -> None:
        self.connect = connect
        self.body: BodyClient | None = None
        self.cache: SplitCache | None = None
        self.tokens: list[int] = []
        self.prompt_len = 0
        self.protected: ProtectedChat | None = None

    def session(self) -> BodyClient:
        """The body session, opened now if the conversation has none."""
        if self.body is None:
            self.body = self.connect()
        return self.body

    def continues(self, prompt: list[int]) -> int | None:
        """How many positions `prompt` shares with this sequence, if it contains the last prompt."""
        shared = common_prefix(self.tokens, prompt)
        return shared if self.cache is not None and shared >= self.prompt_len else None

    def prepare(self, model: SplitModelForCausalLM, ids: list[int]) -> tuple[BodyClient, SplitCache, int]:
        """The body session and a cache holding the longest prefix of `ids` it can (one position at
        least is left to send: its logits start the answer); returns the positions reused. Nothing to
        reuse, or sliding-window layers that cannot crop, start a fresh cache on the same session."""
        body = self.session()
        reused = min(common_prefix(self.tokens, ids), len(ids) - 1) if self.cache is not None else 0
        if reused and reused < self.cache.get_seq_length():
            try:
                self.cache.crop(reused)
            except NotImplementedError:
                reused = 0
        if not reused:  # crop(0) would mean "drop nothing" to transformers
            self.cache = model.new_cache(body)
        self.tokens = ids[:reused]
        return body, self.cache, reused

    def finished(self, ids: list[int], generated: list[int]) -> bool:
        """Record what the cache holds after a turn on prompt `ids` that generated `generated` (the
        answer but its last token); False if the ids cannot account for every cached position."""
        held = self.cache.get_seq_length()
        self.tokens, self.prompt_len = (ids + generated)[:held], len(ids)
        return len(self.tokens) == held

    def close(self) -> None:
        """Close the body session (best effort: the server's TTL ends a lost one too); the
        conversation can open a new one, and keeps its `protected` stand-ins."""
        body, self.body, self.cache, self.tokens, self.prompt_len = self.body, None, None, [], 0
        if body is not None:
            close_session(body)


def close_session(body: BodyClient) -> None:
    """Close a body session, best effort: the body server's idle TTL ends a lost one too."""
    try:
        body.close()
    except Exception:  # noqa: BLE001
        log.warning("closing a body session failed", exc_info=True)
