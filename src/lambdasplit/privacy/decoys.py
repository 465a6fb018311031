"""Decoy rows: the real conversation runs as one row of a batch of N + 1, at a secret random position;
the other N rows are the same conversation with every identifying span replaced by another stand-in
of the same kind, chosen so that each row has exactly the real row's token length.

The cloud (which can invert every row) then holds N + 1 candidates. What it can still do is rank
them: privacy/distinguish.py holds the distinguishers the audit runs against this generator. Rows
keep their stand-ins across turns (one `StandIns` per row, as the real row keeps its identifiers),
and in later turns each row's history carries that row's own earlier answers (`Message.per_row`):
the cloud saw every row's answer, so a decoy row whose history held the real answer with its
stand-ins swapped in would give the real row away at the second turn.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from lambdasplit.privacy.pseudonym import Span, StandIns

log = logging.getLogger(__name__)


@dataclass
class Message:
    """One chat message with its identifying spans (indices into `content`)."""

    role: str
    content: str
    spans: list[Span] = field(default_factory=list)
    per_row: list[str] | None = None  # this message in every row (the real one included): each row's own answer


@dataclass
class DecoyBatch:
    """Every row's messages; `real_row` is the position of the real conversation (secret: it never leaves the device)."""

    rows: list[list[dict[str, str]]]
    real_row: int
    length_matched: bool  # every decoy row's spans have the real spans' token length (in turn 1: the real row's length)
    values: list[list[tuple[str, str]]] = field(default_factory=list)  # per row: (kind, value) of each span, in order


def substitute(message: Message, stand_ins: StandIns) -> str:
    """`message` with each span replaced by `stand_ins`' value for it."""
    out, at = [], 0
    for span in message.spans:
        out += [message.content[at:span.start], stand_ins.get(span.kind, span.text)]
        at = span.end
    return "".join(out) + message.content[at:]


class DecoyMaker:
    """Builds the decoy rows of a conversation, consistently across its turns.

    `length` gives a conversation's token count as the device will send it (e.g. `len(encode_chat(m)[0])`).
    A decoy row is accepted only with the real row's exact length; up to `tries` consistent draws are
    made per row and turn (identifiers seen before keep their stand-in, so only new ones vary)."""

    def __init__(self, length: Callable[[list[dict[str, str]]], int], n: int, seed: int | None = None, tries: int = 200) -> None:
        if n < 0:
            raise ValueError("the number of decoys must be >= 0")
        self.length, self.n, self.tries = length, n, tries
        self.seed = secrets.randbits(64) if seed is None else seed
        self.rows = [StandIns(self.seed + 1 + i) for i in range(n)]
        self.real_row = secrets.randbelow(n + 1) if seed is None else (self.seed % (n + 1))
        self._draws = 0

    def make(self, messages: list[Message]) -> DecoyBatch:
        """The batch for `messages`. A row's own earlier answers (`per_row`) may differ in length from
        the real row's; its spans' stand-ins are then drawn to change its length by nothing."""
        real = [{"role": m.role, "content": m.per_row[self.real_row] if m.per_row else m.content} for m in messages]
        decoys, matched = [], True
        for i, stand_ins in enumerate(self.rows):
            at = i if i < self.real_row else i + 1  # this decoy's position in the batch

            def row_of(values: StandIns | None, at: int = at) -> list[dict[str, str]]:
                return [{"role": m.role, "content": m.per_row[at] if m.per_row else
                         (m.content if values is None else substitute(m, values))} for m in messages]

            target = self.length(row_of(None))  # the real spans in this row's own history
            best, best_gap = None, None
            for _ in range(self.tries):
                self._draws += 1
                trial = stand_ins.fork(self.seed * 1_000_003 + self._draws)
                row = row_of(trial)
                gap = abs(self.length(row) - target)
                if best_gap is None or gap < best_gap:
                    best, best_gap, best_stand_ins = row, gap, trial
                if gap == 0:
                    break
            if best_gap:
                matched = False
                log.warning("decoy row %d: no draw of %d matched the real spans' token length (off by %d)", i, self.tries, best_gap)
            self.rows[i] = best_stand_ins
            decoys.append(best)
        rows = decoys[: self.real_row] + [real] + decoys[self.real_row:]
        spans = [s for m in messages for s in m.spans]
        values = [[(s.kind, st.get(s.kind, s.text)) for s in spans] for st in self.rows]
        values = values[: self.real_row] + [[(s.kind, s.text) for s in spans]] + values[self.real_row:]
        return DecoyBatch(rows, self.real_row, matched, values)

