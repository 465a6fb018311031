"""Streamed text, once for every caller: the incremental detokeniser (`Detokenizer`), the hold-back
of text that may still become something (`hold_from`: a stop string, a pseudonym's stand-in), and
`TextStream`, one row's new text with stop strings cut out, which the generation path, the gateway's
rows and the protected chat's real row use.

Each new token costs the decoding of a few tokens, never the whole answer again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


_WORD = re.compile(r"\w")


class Detokenizer:
    """The text of a growing sequence of token ids, piece by piece (special tokens skipped). A fast
    tokenizer uses tokenizers' `DecodeStream`; any other decodes the ids since the last piece with
    the last emitted token before them (the scheme DecodeStream implements), so a token whose text
    depends on its neighbour (a leading space, a byte of a character) comes out right. Text is held
    while it ends in an incomplete character; `flush` gives what the whole decode has beyond it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, decode_stream: bool = True) -> None:
        self.tokenizer = tokenizer
        fast = decode_stream and getattr(tokenizer, "is_fast", False)
        backend = getattr(tokenizer, "backend_tokenizer", None) if fast else None
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=True) if backend is not None else None
        self.ids: list[int] = []
        self.shown = 0  # characters emitted
        self.prefix = self.read = 0  # the fallback's offsets: ids[prefix:read] were decoded last time

    def step(self, token: int) -> str:
        """The text `token` completes ('' while a character is still incomplete)."""
        self.ids.append(token)
        if self.stream is not None:
            text = self.stream.step(self.backend, token) or ""
        else:
            text = self._fallback()
        self.shown += len(text)
        return text

    def _fallback(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """What the whole sequence decodes to beyond the pieces given (a character cut short by the
        end of the answer, as the final text shows it)."""
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest, self.shown = whole[self.shown:], max(self.shown, len(whole))
        return rest


def hold_from(text: str, keys: Sequence[str], whole: bool = False, word: bool = False, before: str = "", fold: bool = False) -> int:
    """Where the end of `text` that may still grow into one of `keys` begins (len(text): nothing to
    hold). A proper start of a key is held; with `whole`, a whole key too (a longer word may follow:
    "White" / "Whiteboard"); with `word`, only from a word start (`before` is the character before
    `text`); `fold` compares lower-cased (`keys` given lower-case). Only the last characters, as
    many as the longest key, can be held."""
    longest = max((len(k) for k in keys), default=0)
    for at in range(max(0, len(text) - longest), len(text)):
        if word and _WORD.match(text[at - 1] if at else before[-1:]):
            continue
        rest = text[at:].lower() if fold else text[at:]
        if any(k.startswith(rest) and (whole or len(rest) < len(k)) for k in keys):
            return at
    return len(text)


class TextStream:
    """One row's new text as it is produced, with stop strings cut out: text that may still become
    a stop string is held back; once one appears, the text before it is the last. `put` takes token
    ids; `feed` takes text decoded elsewhere (the protected chat's restored answer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, on_text: Callable[[str], None], stops: tuple[str, ...] = ()) -> None:
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.on_text = on_text
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def put(self, ids: Iterable[int]) -> None:
        assert self.detokenizer is not None, "put() needs the tokenizer"
        self.feed("".join(self.detokenizer.step(t) for t in ids))

    def end(self) -> None:
        """The rest: what the detokeniser held, and the held-back text (the answer ended)."""
        self.feed(self.detokenizer.flush() if self.detokenizer is not None else "", end=True)

    def feed(self, text: str, end: bool = False) -> None:
        if self.stopped:
            return
        self.pending += text
        cuts = [self.pending.find(s) for s in self.stops if s in self.pending]
        if cuts:
            self._emit(self.pending[: min(cuts)])
            self.stopped = True
            return
        hold = len(self.pending) if end else hold_from(self.pending, self.stops)
        self._emit(self.pending[:hold])
        self.pending = self.pending[hold:]

    def _emit(self, text: str) -> None:
        if text:
            self.on_text(text)
