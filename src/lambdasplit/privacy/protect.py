"""The device-side defenses against a curious cloud, as one call: pseudonymise the conversation, hide it
among decoy rows, generate, and hand back only the real row's answer with the stand-ins restored.

`ProtectedChat` is what the CLI (`generate --pseudonymize --decoys N`), the gateway and the UI call; it
lives as long as the conversation, because the stand-ins (and each decoy row's) must stay consistent
across turns. Nothing it holds ever leaves the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import StoppingCriteriaList

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import (
    EventStopping,
    GenerationResult,
    completes_stop,
    first_stop,
)
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.device.textstream import Detokenizer, TextStream
from lambdasplit.errors import PromptError
from lambdasplit.privacy.decoys import DecoyBatch, DecoyMaker, Message
from lambdasplit.privacy.pseudonym import Detector, Pseudonymizer, StandIns, StreamRestorer


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


class DecoyHistoryError(PromptError):
    """A turn under decoys whose history holds an answer this conversation did not generate."""


class ProtectedChat:
    """One conversation under `protection` on `runtime`; call `generate` once per turn with the whole history."""

    def __init__(self, runtime: SplitRuntime, protection: Protection, detector: Detector | None = None) -> None:
        self.runtime, self.protection = runtime, protection
        self.detector = detector or Detector()
        self.pseudonymizer = Pseudonymizer(self.detector, StandIns(protection.seed)) if protection.pseudonymize else None
        self.decoys = DecoyMaker(self._length, protection.decoys, None if protection.seed is None else protection.seed + 7919) \
            if protection.decoys else None
        # (which answer of the conversation, its restored text) -> every row's own answer, as sent next turn
        self._answers: dict[tuple[int, str], list[str]] = {}

    def _length(self, messages: list[dict[str, str]]) -> int:
        return int(self.runtime.encode_chat(messages).shape[1])

    def prepare(self, messages: list[dict[str, str]]) -> DecoyBatch:
        """The rows the device will send: pseudonymised, then among decoys (the real row at a secret
        position). With decoys, an earlier answer of this conversation is, in each row, that row's own."""
        parsed, answers = [], 0
        for m in messages:
            parsed.append(self._parse(m, answers))
            answers += parsed[-1].role == "assistant"
        if self.decoys is None:
            return DecoyBatch([[{"role": m.role, "content": m.content} for m in parsed]], 0, True)
        return self.decoys.make(parsed)

    def _parse(self, message: dict[str, str], answer: int) -> Message:
        """One message as the rows carry it; `answer` counts the assistant messages before it. An
        answer this conversation generated goes out as generated (each row's own), not re-pseudonymised."""
        role, content = str(message.get("role", "user")), str(message.get("content", ""))
        if role == "assistant" and (self.decoys is not None or self.pseudonymizer is not None):
            rows = self._answers.get((answer, content.strip()))
            if rows is not None:
                real = self.decoys.real_row if self.decoys is not None else 0
                return Message(role, rows[real], per_row=rows if self.decoys is not None else None)
            if self.decoys is not None:
                raise DecoyHistoryError(
                    f"assistant message {answer + 1} is not an answer this conversation generated (an edited or "
                    "foreign history, or one the device no longer holds): with decoys every row's history must be "
                    "that row's own earlier answers, or the cloud can tell the real row; start a new conversation")
        if self.pseudonymizer is not None:
            done = self.pseudonymizer.pseudonymize(content)
            return Message(role, done.text, done.spans)
        if self.decoys is not None:
            return Message(role, content, self.detector.find(content))
        return Message(role, content)

    def generate(self, body: BodyClient, messages: list[dict[str, str]], options: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None, **generate_kwargs: Any) -> ProtectedResult:
        """Generate the real row's answer; `on_text` gets it restored, as it is produced.

        With decoys every row runs to `max_new_tokens` (EOS does not stop the batch, so the stream's
        length and timing say nothing about the real row) and the real row is cut at its first EOS.

        Stop strings (`options.stop`) are matched on the restored answer, the text the user reads
        (one naming a real identifier never occurs in the text the model writes). Without decoys a
        stop ends the generation; with decoys the batch still runs to the end (a row that stopped
        early would stand out) and the answer is cut."""
        options = options or SamplingParams()
        stops = tuple(x for x in options.stop if x)
        options = replace(options, stop=())
        batch = self.prepare(messages)
        history = sum(m.get("role") == "assistant" for m in messages)  # this answer's number in later turns
        ids, mask = self._encode(batch.rows)
        restorer = self.pseudonymizer.restorer() if self.pseudonymizer is not None else None
        sink, shown = on_text, None
        if stops:
            stopped = threading.Event()  # not the caller's `cancel`: a stop is not the user cancelling
            kwargs_stop = list(generate_kwargs.pop("stopping_criteria", None) or [])
            if self.decoys is None:
                kwargs_stop.append(EventStopping(stopped))
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList(kwargs_stop)
            shown = TextStream(None, on_text or _drop, stops)  # fed the restored text

            def sink(text: str) -> None:
                shown.feed(text)
                if shown.stopped:
                    stopped.set()

        stream = _RowStream(self.runtime, batch.real_row, sink, restorer) if sink is not None else None
        if self.decoys is not None:
            generate_kwargs = {"eos_token_id": None, **generate_kwargs}  # logits untouched, unlike min_new_tokens
        result = self.runtime.generate_ids(body, ids, mask, options, on_tokens=stream.put if stream else None, **generate_kwargs)
        if stream is not None:
            stream.end()
        if shown is not None:
            shown.end()
        row = batch.real_row
        sent = result.texts[row]
        text = self._restore(sent)
        answers = list(result.texts)  # what each row's "client" keeps: its answer, cut at its own first stop
        if (cut := first_stop(text, stops)) is not None:
            text, kept = text[:cut], completes_stop(self.runtime.tokenizer, result.token_ids[row], stops, self._restore)
            token_ids, reasons = list(result.token_ids), list(result.finish_reasons)
            token_ids[row], reasons[row] = token_ids[row][:kept], "stop"
            result = replace(result, token_ids=token_ids, finish_reasons=reasons)
            answers = [a if (c := first_stop(a, stops)) is None else a[:c] for a in answers]
            answers[row] = self._sent_prefix(sent, text)
        if self.decoys is not None or self.pseudonymizer is not None:
            self._answers[(history, text.strip())] = answers
        tok = self.runtime.tokenizer
        rows = [tok.decode(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]
        replacements = []
        if self.pseudonymizer is not None:
            replacements = [(k, self.pseudonymizer.stand_ins.reals[(k, n)], v) for (k, n), v in self.pseudonymizer.stand_ins.values.items()
                            if k != "DOMAIN"]
        return ProtectedResult(text, sent, rows[row], rows, row, result, replacements)

    def _restore(self, text: str) -> str:
        return self.pseudonymizer.restore(text) if self.pseudonymizer is not None else text

    def _sent_prefix(self, sent: str, shown: str) -> str:
        """The start of the generated `sent` that restores to `shown` (the answer cut at a stop string)."""
        if self.pseudonymizer is None:
            return shown
        return next((sent[:p] for p in range(len(sent) + 1) if self._restore(sent[:p]) == shown),
                    self.pseudonymizer.pseudonymize(shown).text)

    def _encode(self, rows: list[list[dict[str, str]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row through the chat template, left-padded (no padding when the decoys matched the length)."""
        encoded = [self.runtime.encode_chat(r)[0] for r in rows]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(rows), width), self.runtime.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
        return ids, mask


def _drop(_: str) -> None:
    """Where the answer's text goes when only its stop strings are watched."""


class _RowStream:
    """Streams one row's text from every step's ids: decoded incrementally, cut at the row's first EOS,
    with stand-ins restored (held back while a stand-in may still be forming)."""

    def __init__(self, runtime: SplitRuntime, row: int, on_text: Callable[[str], None], restorer: StreamRestorer | None) -> None:
        self.detokenizer, self.eos = Detokenizer(runtime.tokenizer), set(runtime.eos_ids)
        self.row, self.on_text, self.restorer = row, on_text, restorer
        self.done = False

    def put(self, step: list[list[int]]) -> None:
        if self.done:
            return
        pieces = []
        for token in step[self.row]:
            if token in self.eos:
                self.done = True
                break
            pieces.append(self.detokenizer.step(token))
        self._emit("".join(pieces))

    def end(self) -> None:
        self._emit(self.detokenizer.flush())
        if self.restorer is not None:
            rest = self.restorer.flush()
            if rest:
                self.on_text(rest)

    def _emit(self, text: str) -> None:
        if self.restorer is not None:
            text = self.restorer.feed(text)
        if text:
            self.on_text(text)
