"""The device-side defenses against a curious cloud, as one call: pseudonymise the conversation, hide it
among decoy rows, generate, and hand back only the real row's answer with the stand-ins restored.

`ProtectedChat` is what the CLI (`generate --pseudonymize --decoys N`), the gateway and the UI call; it
lives as long as the conversation, because the stand-ins (and each decoy row's) must stay consistent
across turns. Nothing it holds ever leaves the device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationOptions, GenerationResult, TextStream
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.privacy.decoys import DecoyBatch, DecoyMaker, Message
from lambdasplit.privacy.pseudonym import Detector, Pseudonymizer, StandIns, StreamRestorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protection:
    """Which defenses run: `pseudonymize` identifiers, and hide the conversation among `decoys` rows.
    `seed` makes stand-ins and the real row's position reproducible (tests, the audit); leave it None in use."""

    pseudonymize: bool = False
    decoys: int = 0
    seed: int | None = None

    @property
    def active(self) -> bool:
        return self.pseudonymize or self.decoys > 0


@dataclass
class ProtectedResult:
    text: str  # the real row's answer, restored
    sent_text: str  # the real row's answer as generated (with stand-ins): what the cloud can read
    cloud_prompt: str  # the real row's prompt as the model saw it (chat template applied): what the cloud can recover
    rows: list[str]  # every row's prompt text, real one included (decoys: what the cloud holds as candidates)
    real_row: int
    result: GenerationResult  # the batch's raw result (bytes, timings, every row's ids)
    replacements: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, real, stand-in)

    @property
    def token_ids(self) -> list[int]:
        return self.result.token_ids[self.real_row]


class ProtectedChat:
    """One conversation under `protection` on `device`; call `generate` once per turn with the whole history."""

    def __init__(self, device: SplitDevice, protection: Protection, detector: Detector | None = None) -> None:
        self.device, self.protection = device, protection
        self.detector = detector or Detector()
        self.pseudonymizer = Pseudonymizer(self.detector, StandIns(protection.seed)) if protection.pseudonymize else None
        self.decoys = DecoyMaker(self._length, protection.decoys, None if protection.seed is None else protection.seed + 7919) \
            if protection.decoys else None
        self._answers: dict[str, list[str]] = {}  # with decoys: a restored answer -> every row's own answer that turn
        self._warned = False

    def _length(self, messages: list[dict[str, str]]) -> int:
        return int(self.device.encode_chat(messages).shape[1])

    def prepare(self, messages: list[dict[str, str]]) -> DecoyBatch:
        """The rows the device will send: pseudonymised, then among decoys (the real row at a secret
        position). With decoys, an earlier answer of this conversation is, in each row, that row's own."""
        parsed = [self._parse(m) for m in messages]
        if self.decoys is None:
            return DecoyBatch([[{"role": m.role, "content": m.content} for m in parsed]], 0, True)
        return self.decoys.make(parsed)

    def _parse(self, message: dict[str, str]) -> Message:
        role, content = str(message.get("role", "user")), str(message.get("content", ""))
        if self.decoys is not None and role == "assistant":
            if (rows := self._answers.get(content.strip())) is not None:
                return Message(role, rows[self.decoys.real_row], per_row=rows)
            if not self._warned:
                self._warned = True
                log.warning("an assistant message this conversation did not generate: every decoy row gets it with "
                            "its own stand-ins, which a cloud that saw the rows' earlier answers can tell from the real row")
        if self.pseudonymizer is not None:
            done = self.pseudonymizer.pseudonymize(content)
            return Message(role, done.text, done.spans)
        if self.decoys is not None:
            return Message(role, content, self.detector.find(content))
        return Message(role, content)

    def generate(self, body: BodyClient, messages: list[dict[str, str]], options: GenerationOptions | None = None,
                 on_text: Callable[[str], None] | None = None, **generate_kwargs: Any) -> ProtectedResult:
        """Generate the real row's answer; `on_text` gets it restored, as it is produced.

        With decoys every row runs to `max_new_tokens` (EOS does not stop the batch, so the stream's
        length and timing say nothing about the real row) and the real row is cut at its first EOS.

        Stop strings (`options.stop`) are matched on the restored answer, the text the user reads
        (one naming a real identifier never occurs in the text the model writes). Without decoys a
        stop ends the generation; with decoys the batch still runs to the end (a row that stopped
        early would stand out) and the answer is cut."""
        options = options or GenerationOptions()
        stops = tuple(s for s in options.stop if s)
        options = replace(options, stop=())
        batch = self.prepare(messages)
        ids, mask = self._encode(batch.rows)
        restorer = self.pseudonymizer.restorer() if self.pseudonymizer is not None else None
        shown = None
        if stops:
            cancel = generate_kwargs["cancel"] = generate_kwargs.get("cancel") or threading.Event()
            shown = TextStream(self.device.tokenizer, on_text or _drop, stops)

            def watch(text: str) -> None:
                shown.on_finalized_text(text)
                if shown.stopped and self.decoys is None:
                    cancel.set()

        sink = watch if shown is not None else on_text
        stream = _RowStream(self.device, batch.real_row, sink, restorer) if sink is not None else None
        if self.decoys is not None:
            generate_kwargs = {"eos_token_id": None, **generate_kwargs}  # logits untouched, unlike min_new_tokens
        result = self.device.generate_ids(body, ids, mask, options, on_tokens=stream.put if stream else None, **generate_kwargs)
        if stream is not None:
            stream.end()
        if shown is not None:
            shown.on_finalized_text("", stream_end=True)
        row = batch.real_row
        sent = result.texts[row]
        text = self._restore(sent)
        answers = list(result.texts)
        if (cut := first_stop(text, stops)) is not None:
            text, kept = text[:cut], tokens_to_stop(self.device.tokenizer, self._restore, result.token_ids[row], stops)
            token_ids, reasons = list(result.token_ids), list(result.finish_reasons)
            token_ids[row], reasons[row] = token_ids[row][:kept], "stop"
            result = replace(result, token_ids=token_ids, finish_reasons=reasons)
            # In later turns the real row's history is the cut answer, each decoy row's its own before that token.
            answers = [self.device.tokenizer.decode(r[: kept - 1], skip_special_tokens=True) for r in token_ids]
            answers[row] = self.pseudonymizer.pseudonymize(text).text if self.pseudonymizer is not None else text
        if self.decoys is not None:
            self._answers[text.strip()] = answers
        tok = self.device.tokenizer
        rows = [tok.decode(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]
        replacements = []
        if self.pseudonymizer is not None:
            replacements = [(k, self.pseudonymizer.stand_ins.reals[(k, n)], v) for (k, n), v in self.pseudonymizer.stand_ins.values.items()
                            if k != "DOMAIN"]
        return ProtectedResult(text, sent, rows[row], rows, row, result, replacements)

    def _restore(self, text: str) -> str:
        return self.pseudonymizer.restore(text) if self.pseudonymizer is not None else text

    def _encode(self, rows: list[list[dict[str, str]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row through the chat template, left-padded (no padding when the decoys matched the length)."""
        encoded = [self.device.encode_chat(r)[0] for r in rows]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(rows), width), self.device.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
        return ids, mask


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in `text`, or None."""
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def tokens_to_stop(tokenizer: PreTrainedTokenizerBase, restore: Callable[[str], str], ids: list[int], stops: tuple[str, ...]) -> int:
    """The fewest leading tokens of `ids` whose restored text contains a stop string (what usage
    counts; a longer prefix's text contains a shorter one's)."""
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        if first_stop(restore(tokenizer.decode(ids[:mid], skip_special_tokens=True)), stops) is not None:
            high = mid
        else:
            low = mid + 1
    return high


def _drop(_: str) -> None:
    """Where the answer's text goes when only its stop strings are watched."""


class _RowStream:
    """Streams one row's text from every step's ids: decoded incrementally, cut at the row's first EOS,
    with stand-ins restored (held back while a stand-in may still be forming)."""

    def __init__(self, device: SplitDevice, row: int, on_text: Callable[[str], None], restorer: StreamRestorer | None) -> None:
        self.tokenizer, self.eos = device.tokenizer, set(device.eos_ids)
        self.row, self.on_text, self.restorer = row, on_text, restorer
        self.ids: list[int] = []
        self.shown = 0
        self.done = False

    def put(self, step: list[list[int]]) -> None:
        if self.done:
            return
        for token in step[self.row]:
            if token in self.eos:
                self.done = True
                break
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not self.done:  # a character still incomplete
            return
        self._emit(text[self.shown:])
        self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(text[self.shown:])
        self.shown = len(text)
        if self.restorer is not None:
            rest = self.restorer.flush()
            if rest:
                self.on_text(rest)

    def _emit(self, text: str) -> None:
        if self.restorer is not None:
            text = self.restorer.feed(text)
        if text:
            self.on_text(text)
