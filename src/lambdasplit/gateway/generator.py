"""The gateway's generations: a parsed request becomes a `Plan` (its rows, `SamplingParams` and what
the answer must carry), and `Generator.run` generates it on a worker thread, streaming `Step`s and
returning an `Outcome`.

Each request is its own `generate()` over the shared weights (with its own head and tail KV caches
and its own processors), on a body session of its own: fresh, or a kept `Conversation` whose
sequence the prompt extends (a finished one-row request's session is kept in the gateway's
`SessionPool` for the next turn, docs/gateway.md). Under `protection` a chat runs through its
conversation's `ProtectedChat` (gateway/protected.py) on a fresh session.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import LogitsProcessor

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationResult
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.device.textstream import TextStream
from lambdasplit.errors import UnavailableError
from lambdasplit.gateway.protected import ProtectedChats
from lambdasplit.gateway.sampling import JsonSchemaConstraint, LogprobRecorder, TokenLogprob
from lambdasplit.gateway.schema import ChatRequest, CompletionRequest, bad_request
from lambdasplit.privacy.protect import ProtectedResult
from lambdasplit.web.conversation import Conversation, close_session
from lambdasplit.web.pool import SessionPool

log = logging.getLogger(__name__)

BodyFactory = Callable[[], BodyClient]
Put = Callable[[object], None]


@dataclass
class Plan:
    """One request, ready to generate: every row's prompt ids (n rows per prompt), the sampling and
    what the answer must carry. A protected chat carries its `messages`: its `ProtectedChat` builds
    the rows that are sent (its one row here is the real prompt, never sent)."""

    chat: bool
    rows: list[list[int]]
    prompt_tokens: int
    params: SamplingParams
    logprobs: int | None
    json_schema: dict[str, Any] | None
    stream: bool
    include_usage: bool
    echo: list[str] = field(default_factory=list)  # per row: the prompt text to put before the answer
    messages: list[dict[str, str]] | None = None
    user: str | None = None  # a protected chat's end user (its conversations are kept apart from others')


def plan(chat: bool, prompts: list[list[int]], req: ChatRequest | CompletionRequest, echo: list[str], max_rows: int,
         speculate: str | None, draft_tokens: int | None, messages: list[dict[str, str]] | None = None) -> Plan:
    """Rows (n per prompt) and sampling; speculation drafts one sequence at a time and would
    record logprobs of rejected drafts, so it is used only for one row without logprobs."""
    rows = [p for p in prompts for _ in range(req.n)]
    if len(rows) > max_rows:
        raise bad_request(f"{len(prompts)} prompt(s) x n={req.n} is {len(rows)} rows; at most {max_rows} run as one batch", "n")
    drafting = speculate if len(rows) == 1 and req.logprobs is None else None
    params = replace(req.sampling, speculate=drafting, draft_tokens=draft_tokens)
    user = req.user if isinstance(req, ChatRequest) else None
    return Plan(chat, rows, sum(len(p) for p in prompts), params, req.logprobs, req.json_schema, req.stream,
                req.include_usage, [e for e in echo for _ in range(req.n)], messages, user)


@dataclass
class Step:
    """A streamed item: per row, the new text and the new tokens' logprobs."""

    texts: dict[int, str]
    logprobs: dict[int, list[TokenLogprob]]


@dataclass
class Outcome:
    """A finished generation, with what the response reports beyond the result."""

    result: GenerationResult
    logprobs: list[list[TokenLogprob]]
    cached_tokens: int
    prompt_tokens: int  # what usage reports: the prompts', or a protected request's real row's


class _Collector:
    """The on_tokens callback of one generation: every row's raw new ids (what a kept cache holds),
    logprobs, and, when streaming, each row's text cut at stop strings (`TextStream` per row)."""

    def __init__(self, runtime: SplitRuntime, rows: int, stops: tuple[str, ...], recorder: LogprobRecorder | None,
                 put: Put | None) -> None:
        self.eos = set(runtime.eos_ids)
        self.recorder, self.put = recorder, put
        self.raw: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.pending: dict[int, str] = {}
        self.streams: list[TextStream] = []
        if put is not None:
            for i in range(rows):
                self.streams.append(TextStream(runtime.tokenizer, lambda text, i=i: self._text(i, text), stops))

    def _text(self, row: int, text: str) -> None:
        self.pending[row] = self.pending.get(row, "") + text

    def on_tokens(self, step: list[list[int]]) -> None:
        entries = self.recorder.take([tokens[0] for tokens in step]) if self.recorder is not None else None
        new: dict[int, list[TokenLogprob]] = {}
        for i, tokens in enumerate(step):
            if self.done[i]:  # generate() pads rows that have finished
                continue
            self.raw[i].extend(tokens)
            if entries is not None:
                self.logprobs[i].append(entries[i])
                new[i] = [entries[i]]
            if self.streams:
                self.streams[i].put(tokens)
            self.done[i] = any(t in self.eos for t in tokens)
        self._flush(new)

    def finish(self) -> None:
        """Release the text each row's stream still holds back (a possible stop-string start)."""
        for stream in self.streams:
            stream.end()
        self._flush({})

    def _flush(self, logprobs: dict[int, list[TokenLogprob]]) -> None:
        if self.put is not None and (self.pending or logprobs):
            self.put(Step(self.pending, logprobs))
        self.pending = {}


class Generator:
    """Runs plans on the device: body sessions (fresh or a kept conversation's), processors, the call."""

    def __init__(self, runtime: SplitRuntime, connect: BodyFactory, pool: SessionPool[int, Conversation],
                 protected: ProtectedChats | None = None) -> None:
        self.runtime, self.connect, self.pool, self.protected = runtime, connect, pool, protected
        self.constraint = JsonSchemaConstraint(runtime.tokenizer, runtime.eos_ids) if runtime.has_tokenizer else None

    def run(self, plan: Plan, cancel: threading.Event, put: Put) -> Outcome:
        """Generate `plan`; a single-row plan continues a kept conversation when its prompt extends
        one, and a reused session that turns out expired is replaced by a fresh one once."""
        if plan.messages is not None:
            return self._run_protected(plan, plan.messages, cancel, put)
        single = len(plan.rows) == 1 and self.pool.enabled
        taken = self.pool.take(lambda conv: conv.continues(plan.rows[0])) if single else None
        if taken is not None:
            sent: list[object] = []

            def put_once(item: object) -> None:
                sent.append(item)
                put(item)

            try:
                return self._generate(plan, taken[0], True, cancel, put_once)
            except UnavailableError:
                if sent:  # the client has part of an answer: a retry would repeat it
                    raise
                log.info("a kept body session was gone; starting a fresh one")
        return self._generate(plan, Conversation(self.connect), single, cancel, put)

    def _generate(self, plan: Plan, conv: Conversation, single: bool, cancel: threading.Event, put: Put) -> Outcome:
        """`plan` on `conv`'s session; a `single` row's cache is continued and kept for the next turn
        (a batch's rows share no one sequence)."""
        keep = False
        try:
            if single:
                body, cache, cached = conv.prepare(self.runtime.model, plan.rows[0])
            else:
                body, cache, cached = conv.session(), None, 0
            recorder = LogprobRecorder(plan.logprobs) if plan.logprobs is not None else None
            collector = _Collector(self.runtime, len(plan.rows), plan.params.stop, recorder, put if plan.stream else None)
            ids, mask = _batch(plan.rows, self.runtime.pad_id)
            first: list[LogitsProcessor] = [recorder] if recorder is not None else []  # raw logits, before the sampler's
            if plan.json_schema is not None:
                if self.constraint is None:
                    raise bad_request("response_format needs the model's tokenizer", "response_format")
                first.append(self.constraint.processor(plan.json_schema, len(plan.rows)))
            result = self.runtime.generate_ids(body, ids, mask, plan.params, on_tokens=collector.on_tokens, cancel=cancel,
                                              cache=cache, logits_processor=first)
            collector.finish()
            if single and result.finish_reasons[0] != "cancelled":
                keep = conv.finished(plan.rows[0], collector.raw[0])
            logprobs = [entries[: len(tokens)] for entries, tokens in zip(collector.logprobs, result.token_ids, strict=True)]
            return Outcome(result, logprobs, cached, plan.prompt_tokens)
        finally:
            if keep:
                self.pool.put(id(conv), conv)
            else:
                conv.close()

    def _run_protected(self, plan: Plan, messages: list[dict[str, str]], cancel: threading.Event, put: Put) -> Outcome:
        """A chat through its conversation's `ProtectedChat`, on a fresh body session: a kept one
        holds a prompt the cloud never saw (the cloud holds the pseudonymised or decoy rows).
        `ProtectedChat` matches stop strings on the restored text."""
        assert self.protected is not None
        decoys = self.protected.protection.decoys > 0
        params = replace(plan.params, speculate=None if decoys else plan.params.speculate)
        on_text = (lambda text: put(Step({0: text}, {}))) if plan.stream else None
        with self.protected.chat(messages, plan.user) as chat:
            body = self.connect()  # once the conversation's turn has begun: no session waits on its lock
            try:
                done = chat.generate(body, messages, params, on_text=on_text, cancel=cancel)
            finally:
                close_session(body)
        return _real_row(done)


def _real_row(done: ProtectedResult) -> Outcome:
    """The outcome as the client sees it: the real row alone, restored; usage counts its tokens."""
    row, result = done.real_row, done.result
    prompt = result.prompt_token_ids[row]
    real = replace(result, texts=[done.text], prompt_token_ids=[prompt], token_ids=[done.token_ids],
                   finish_reasons=[result.finish_reasons[row]], logits=None)
    return Outcome(real, [[]], 0, len(prompt))


def _batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows left-padded into one batch, with the attention mask generate() expects."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask
