"""The device-side identifier defenses on the gateway (`gateway --pseudonymize`, `--decoys N`).

A chat request runs through `ProtectedChat` (privacy/protect.py): its identifiers are replaced by
stand-ins, it runs among decoy rows, and only the real row's answer comes back, restored. The API is
stateless, so a conversation's `ProtectedChat` is found again by a hash of its opening (the messages
up to the first user message), which every turn of a chat repeats: the stand-ins, and each decoy
row's, stay the same across turns. Decoys need that: a row whose identifiers changed between turns
while the real row's did not would give the real row away. `ProtectedChats` keeps them LRU with an
idle limit (a `SessionPool`, as the gateway's and UI's body sessions); they hold no body session, only the mapping, which never leaves the device.

Request features whose result would not be the restored answer are refused (`refuse_unprotectable`);
`ProtectedChat` matches stop strings on the restored answer (the text the client reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.gateway.schema import APIError, ChatRequest, bad_request
from lambdasplit.privacy.protect import ProtectedChat, Protection
from lambdasplit.privacy.pseudonym import Detector
from lambdasplit.web.pool import SessionPool

PROTECTED_CHATS = 256  # conversations whose stand-ins are kept
PROTECTED_TTL = 3600.0  # idle seconds before a conversation's stand-ins are forgotten (a later turn gets new ones)


def opening_key(messages: list[dict[str, str]], user: str | None = None) -> str:
    """A conversation's key: a hash of the request's `user` and its messages up to and including the
    first user message. Two users' chats that open alike ("Hi") share a key unless `user` tells them apart."""
    end = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
    opening = [[m.get("role", ""), m.get("content", "")] for m in messages[: end + 1]]
    return hashlib.sha256(json.dumps([user, opening]).encode()).hexdigest()


class ProtectedChats:
    """The `ProtectedChat` of each conversation, at most `capacity` idle ones, forgotten after `ttl` idle seconds."""

    def __init__(self, runtime: SplitRuntime, protection: Protection, capacity: int = PROTECTED_CHATS, ttl: float = PROTECTED_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("protected conversations need capacity >= 1")
        self.runtime, self.protection = runtime, protection
        self.detector = Detector()  # shared: its analyzer and name lists are loaded once
        self.pool: SessionPool[str, ProtectedChat] = SessionPool(capacity, ttl, _forget, clock)

    def __len__(self) -> int:
        return len(self.pool)

    def chat(self, messages: list[dict[str, str]], user: str | None = None) -> contextlib.AbstractContextManager[ProtectedChat]:
        """The conversation's `ProtectedChat` for one turn; turns of one conversation run one at a
        time (its stand-ins and decoy rows change as it runs), and one in a turn is never evicted."""
        return self.pool.use(opening_key(messages, user), lambda: ProtectedChat(self.runtime, self.protection, self.detector))

    def expire(self) -> None:
        """Forget every conversation idle for longer than `ttl`."""
        self.pool.expire()


def _forget(_: ProtectedChat) -> None:
    """A protected conversation holds no body session: forgetting its stand-ins is all there is."""


def flags(protection: Protection) -> str:
    """The gateway options in force, as the user typed them."""
    named = (["--pseudonymize"] if protection.pseudonymize else []) + ([f"--decoys {protection.decoys}"] if protection.decoys else [])
    return " ".join(named)


def _refused(protection: Protection, param: str, why: str) -> APIError:
    return bad_request(f"`{param}` cannot be honoured under {flags(protection)}: {why}", param, "unsupported_parameter")


def refuse_unprotectable(req: ChatRequest, protection: Protection) -> None:
    """400 for a chat request asking for what a protected answer cannot give."""
    if req.n > 1:
        rows = "; --decoys uses the batch's rows for its decoys" if protection.decoys else ""
        raise _refused(protection, "n", f"a protected request runs one conversation{rows}")
    if req.logprobs is not None:
        why = ("they would score the tokens the model wrote, which hold the stand-ins, not the restored answer" if protection.pseudonymize
               else "they are not recorded for the real row of a decoy batch")
        raise _refused(protection, "logprobs", why)
    if req.json_schema is not None:
        why = ("the schema would constrain the text with stand-ins, and restoring the real values can break it" if protection.pseudonymize
               else "every row of a decoy batch runs past its end, which the schema constraint does not allow")
        raise _refused(protection, "response_format", why)


def refuse_completions(protection: Protection) -> APIError:
    """The 400 for /v1/completions: the defenses work on chat messages."""
    return _refused(protection, "prompt", "a raw prompt has no chat messages to protect; use /v1/chat/completions")

