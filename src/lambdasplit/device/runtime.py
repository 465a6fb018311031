"""SplitDevice: what runs on the phone or laptop — tokenizer, head, tail, sampler, generation loop.

Token ids and text stay here; only hidden states go to the body through a BodyClient.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from lambdasplit.device.body import BodyClient
from lambdasplit.device.sampling import Sampler, SamplingConfig
from lambdasplit.errors import LambdaSplitError, PromptError
from lambdasplit.split.load import OpenedSource, device_runners, open_source, resolve_dtype
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.parts import PartRunner


class GenerationCancelled(LambdaSplitError):
    """The caller set the generation's `cancel` event (e.g. the HTTP client went away)."""


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("the generation was cancelled")


@dataclass
class Timings:
    """Wall-clock seconds spent in each stage of one generation."""

    head: float = 0.0
    body: float = 0.0  # network + body compute, as seen from the device
    tail: float = 0.0
    sampling: float = 0.0
    total: float = 0.0
    prefill: float = 0.0
    tokens: int = 0
    steps: list[tuple[float, float, float]] = field(default_factory=list)  # (head, body, tail) per forward

    @property
    def tokens_per_second(self) -> float:
        decode = self.total - self.prefill
        return (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "head": self.head, "body": self.body, "tail": self.tail, "sampling": self.sampling,
            "prefill": self.prefill, "total": self.total, "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class StreamChunk:
    """One decode step: the new token of each row and, for a single row, the text it completed."""

    token_ids: list[int]
    text: str = ""


@dataclass
class GenerationResult:
    texts: list[str]
    prompt_token_ids: list[list[int]]
    token_ids: list[list[int]]
    timings: Timings
    bytes_to_cloud: int
    bytes_from_cloud: int
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.texts[0]


class SplitDevice:
    """Head and tail of a split model, with the tokenizer and a generation loop."""

    def __init__(
        self,
        opened: OpenedSource,
        head: PartRunner,
        tail: PartRunner,
        tokenizer: PreTrainedTokenizerBase | None,
        manifest: PartManifest,
    ) -> None:
        self.opened = opened
        self.spec = opened.spec
        self.config = opened.config
        self.head = head
        self.tail = tail
        self._tokenizer = tokenizer
        self.manifest = manifest
        self.eos_ids = _eos_ids(opened, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer is not None else getattr(self.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | None = None,
        split: tuple[int, int] | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        allow_shallow: bool = False,
    ) -> SplitDevice:
        """Load head + tail (and the tokenizer) from a model source or an exported device part."""
        opened = open_source(source, split, allow_shallow)
        torch_dtype = resolve_dtype(dtype, opened)
        head, tail = device_runners(opened, torch_dtype, device)
        tokenizer = _load_tokenizer(opened)
        return cls(opened, head, tail, tokenizer, opened.manifest("device", torch_dtype))

    def fork(self) -> SplitDevice:
        """Another device over the same weights with its own KV caches (for concurrent sequences)."""
        head = PartRunner(self.head.module, "head", self.head.config)
        tail = PartRunner(self.tail.module, "tail", self.tail.config)
        return SplitDevice(self.opened, head, tail, self._tokenizer, self.manifest)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise PromptError(f"{self.opened.checkpoint.path} has no tokenizer; only token ids can be generated")
        return self._tokenizer

    def encode_chat(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """Token ids (1, T) of a multi-turn conversation through the model's chat template."""
        if not messages or not any(str(m.get("content", "")).strip() for m in messages):
            raise PromptError("the conversation is empty")
        if self.tokenizer.chat_template is None:
            text = "\n".join(str(m.get("content", "")) for m in messages)
            return self.tokenizer(text, return_tensors="pt")["input_ids"]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def encode(self, prompts: str | list[str], raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, left-padded; the chat template is applied unless `raw`."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or any(not t.strip() for t in texts):
            raise PromptError("the prompt is empty")
        use_template = not raw and self.tokenizer.chat_template is not None
        if use_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
                )
                for t in texts
            ]
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token_id = self.pad_id
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=not use_template
        )
        return batch["input_ids"], batch["attention_mask"]

    def generate(
        self,
        body: BodyClient,
        prompts: str | list[str],
        sampling: SamplingConfig | None = None,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate from text prompts; `on_text` receives the single row's text as it is produced."""
        input_ids, mask = self.encode(prompts, raw)
        return self.generate_ids(body, input_ids, mask, sampling, on_text)

    def generate_ids(
        self,
        body: BodyClient,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sampling: SamplingConfig | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Generate from token ids; once `cancel` is set the loop stops before its next body call and
        the rows still running finish with reason "cancelled"."""
        sampling = sampling or SamplingConfig()
        timings = Timings()
        body.stats.reset()
        generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        start = time.perf_counter()
        loop = self.stream_ids(
            body, input_ids, attention_mask, sampling, timings, want_text=on_text is not None, cancel=cancel
        )
        cancelled = False
        try:
            for chunk in loop:
                for row, token in enumerate(chunk.token_ids):
                    generated[row].append(token)
                if on_text and chunk.text:
                    on_text(chunk.text)
        except GenerationCancelled:
            cancelled = True
        timings.total = time.perf_counter() - start
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask, strict=False)]
        token_ids, texts, reasons = self._finish(generated, sampling)
        if cancelled:
            reasons = ["cancelled" if reason == "length" else reason for reason in reasons]
        return GenerationResult(
            texts, prompt_ids, token_ids, timings, body.stats.bytes_to_cloud, body.stats.bytes_from_cloud, reasons
        )

    def stream_ids(
        self,
        body: BodyClient,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sampling: SamplingConfig,
        timings: Timings | None = None,
        want_text: bool = True,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamChunk]:
        """The generation loop: prefill once, then one position per row per step.

        `cancel` is checked before every body call; once set, the loop raises GenerationCancelled.
        """
        timings = timings or Timings()
        batch, prompt_len = input_ids.shape
        if prompt_len == 0:
            raise PromptError("the prompt is empty")
        if prompt_len + sampling.max_new_tokens > self.max_context:
            raise PromptError(
                f"prompt of {prompt_len} tokens + {sampling.max_new_tokens} new tokens exceeds the model's "
                f"context window of {self.max_context}"
            )
        device = next(self.head.module.parameters()).device
        input_ids = input_ids.to(device)
        mask = attention_mask.to(device) if attention_mask is not None else None
        sampler = Sampler(sampling)
        eos = torch.tensor(self.eos_ids, device=device)
        sequences = input_ids
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        streaming = batch == 1 and self._tokenizer is not None and (want_text or sampling.stop)
        texts = _TextStream(self.tokenizer, sampling.stop) if streaming else None
        self.head.reset(), self.tail.reset(), body.reset()
        started = time.perf_counter()
        _check_cancel(cancel)
        logits = self._step(body, input_ids, mask, timings)
        for step in range(sampling.max_new_tokens):
            tick = time.perf_counter()
            token = sampler(sequences, logits[:, -1, :])
            token = torch.where(unfinished, token, torch.full_like(token, self.pad_id))
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            if not sampling.ignore_eos:
                unfinished &= ~torch.isin(token, eos)
            timings.sampling += time.perf_counter() - tick
            timings.tokens += 1
            if step == 0:
                timings.prefill = time.perf_counter() - started
            ids = token.tolist()
            text = texts.push(ids[0]) if texts is not None else ""
            if texts is not None and texts.stopped:
                unfinished[:] = False
            done = step + 1 == sampling.max_new_tokens or not bool(unfinished.any())
            yield StreamChunk(ids, text + (texts.flush() if texts is not None and done else ""))
            if done:
                return
            _check_cancel(cancel)
            logits = self._step(body, token[:, None], None, timings)

    def _step(
        self, body: BodyClient, ids: torch.Tensor, mask: torch.Tensor | None, timings: Timings
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        hidden = self.head(ids, mask)
        t1 = time.perf_counter()
        hidden = body.forward(hidden, mask)
        t2 = time.perf_counter()
        logits = self.tail(hidden, mask, logits_to_keep=1)
        t3 = time.perf_counter()
        timings.head += t1 - t0
        timings.body += t2 - t1
        timings.tail += t3 - t2
        timings.steps.append((t1 - t0, t2 - t1, t3 - t2))
        return logits

    def _finish(
        self, generated: list[list[int]], sampling: SamplingConfig
    ) -> tuple[list[list[int]], list[str], list[str]]:
        """Trim each row after its EOS and at the first stop string; decode the text."""
        ids_out, texts, reasons = [], [], []
        for row in generated:
            cut = None if sampling.ignore_eos else next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None)
            ids = row[:cut] if cut else row
            text = self._tokenizer.decode(ids, skip_special_tokens=True) if self._tokenizer is not None else ""
            reason = "stop" if cut else "length"
            for stop in sampling.stop:
                if stop and stop in text:
                    text, reason = text[: text.index(stop)], "stop"
            ids_out.append(ids)
            texts.append(text)
            reasons.append(reason)
        return ids_out, texts, reasons


class _TextStream:
    """Turns a single row's token ids into text pieces, holding back incomplete characters and any
    tail that might still become a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            if stop in self.text:
                self.text, self.stopped = self.text[: self.text.index(stop)], True
                return self.flush()
        if self.text.endswith("\ufffd"):
            return ""
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        return self._emit(len(self.text.rstrip("\ufffd")))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : upto], upto
        return piece


def _load_tokenizer(opened: OpenedSource) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer; None for weight-only directories (benchmarks with random weights)."""
    path = opened.checkpoint.path
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(path))


def _eos_ids(opened: OpenedSource, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """EOS ids from generation_config.json (as generate() uses them), else the tokenizer's."""
    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(str(opened.checkpoint.path)).eos_token_id
    except OSError:
        eos = getattr(opened.config, "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.append(int(value))
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
