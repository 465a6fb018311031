"""The one generation path: the CLI, gateway, UI, demo, benchmarks and audit drive the split model
through transformers' `generate()` here, and get back text, finish reasons and what crossed the network.

What is ours is only what `generate()` does not give: our option names and checks, stop strings cut
out of the streamed text (transformers stops at them but keeps them), cancellation between steps,
and the per-forward head/body/tail timings and bytes the panel shows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lambdasplit.device.body import BodyClient
from lambdasplit.device.model import SplitCache, SplitModelForCausalLM
from lambdasplit.device.sampling import SAMPLING_KEYWORDS, SamplingParams, generate_kwargs
from lambdasplit.device.textstream import TextStream
from lambdasplit.device.tokens import PromptTokenizer
from lambdasplit.errors import LambdaSplitError, PromptError

SPECULATE_HELP = ("prompt-lookup (draft from n-grams of the prompt), draft-head[:DIR] (a trained draft head on the device), "
                  "draft-tree[:DIR] (a tree drafted by that head, verified in one round trip), "
                  "self (head + tail without the body) or a PATH to a draft model")


class GenerationCancelled(LambdaSplitError):
    """The caller's `cancel` event was set before the generation started."""


@dataclass
class Timings:
    """Wall-clock seconds of one generation, and of each stage of every forward."""

    total: float = 0.0
    prefill: float = 0.0  # until the first new token
    tokens: int = 0
    steps: list[tuple[float, float, float]] = field(default_factory=list)  # (head, body, tail) per forward

    @property
    def head(self) -> float:
        return sum(s[0] for s in self.steps)

    @property
    def body(self) -> float:  # network + body compute, as seen from the device
        return sum(s[1] for s in self.steps)

    @property
    def tail(self) -> float:
        return sum(s[2] for s in self.steps)

    @property
    def tokens_per_second(self) -> float:
        decode = self.total - self.prefill
        return (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "head": self.head, "body": self.body, "tail": self.tail, "prefill": self.prefill,
            "total": self.total, "tokens_per_second": self.tokens_per_second, "forwards": len(self.steps),
        }


@dataclass
class GenerationResult:
    texts: list[str]
    prompt_token_ids: list[list[int]]
    token_ids: list[list[int]]
    timings: Timings
    bytes_to_cloud: int
    bytes_from_cloud: int
    finish_reasons: list[str] = field(default_factory=list)
    round_trips: int = 0  # body exchanges: fewer than tokens when drafts are accepted
    logits: torch.Tensor | None = None  # (new tokens, B, V), raw tail logits, when asked for
    drafting: dict[str, float] | None = None  # a draft head's counts and device time (draft.DraftStats)

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def tokens_per_round_trip(self) -> float:
        return len(self.token_ids[0]) / self.round_trips if self.round_trips else 0.0


class _Steps(BaseStreamer):
    """Sees every batch of new tokens: times the first one and hands each step's ids (one list per
    row; several tokens per row when a draft was accepted) to a callback."""

    def __init__(self, on_tokens: Callable[[list[list[int]]], None] | None, text: TextStream | None) -> None:
        self.on_tokens = on_tokens
        self.text = text
        self.prompt = True
        self.first_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        if self.first_at is None:
            self.first_at = time.perf_counter()
        rows = value.tolist()
        step = [r if isinstance(r, list) else [r] for r in rows] if value.dim() > 1 else [[t] for t in rows]
        if self.text is not None:
            self.text.put(step[0])
        if self.on_tokens is not None:
            self.on_tokens(step)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


class _StopStrings(StoppingCriteria):
    """Stops a row once its generated text contains a stop string. Only the new tokens count (as
    OpenAI and vLLM match stops): transformers' `stop_strings` also matches across the prompt's end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len  # SamplingParams refuses empty ones
        self.window = 2 * max(len(s) for s in self.stops) + 8  # tokens: each decodes to at least one character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_len:][:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


class EventStopping(StoppingCriteria):
    """Stops every row once `event` is set: at most one more body call happens after it."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _check_context(window: int, served: int | None, prompt_len: int, new_tokens: int) -> None:
    """Refuse a sequence longer than the model's window or the body's --max-context before any of it
    is sent (the server would refuse it only once its prefill reached the limit)."""
    limit, what = (served, "the body server's --max-context") if served is not None and served < window else (
        window, "the model's context window")
    if prompt_len + new_tokens > limit:
        raise PromptError(f"prompt of {prompt_len} tokens + {new_tokens} new tokens exceeds {what} of {limit}")


def generate_ids(
    model: SplitModelForCausalLM,
    tokens: PromptTokenizer,
    body: BodyClient,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    cancel: threading.Event | None = None,
    keep_logits: bool = False,
    cache: SplitCache | None = None,
    **extra: Any,
) -> GenerationResult:
    """One `model.generate()` over `body`, with `tokens` for text, EOS and padding: `on_text` gets a single row's text as it is produced,
    `on_tokens` every step's new ids; once `cancel` is set the rows still running stop with reason
    "cancelled".

    `cache` continues a sequence: a `SplitCache` over `body` that already holds the first
    `cache.get_seq_length()` positions of `input_ids` (crop it to the common prefix first), so only
    the rest is sent. `extra` go to `generate()` as they are, but for `logits_processor`, whose
    processors run before the ones `params` builds (sampling.generate_kwargs); a sampling keyword
    that `params` sets is refused, never silently replaced.
    """
    options = params or SamplingParams()
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise PromptError("the prompt is empty")
    _check_context(model.max_context, body.context_limit(), prompt_len, options.max_new_tokens)
    tokenizer = tokens.tokenizer if tokens.has_tokenizer else None
    if options.stop and tokenizer is None:
        raise PromptError("stop strings need the model's tokenizer")
    text = TextStream(tokenizer, on_text, options.stop) if on_text is not None and batch == 1 and tokenizer is not None else None
    steps = _Steps(on_tokens, text)
    if clash := sorted(SAMPLING_KEYWORDS & extra.keys()):
        raise ValueError(f"generate_ids: {', '.join(clash)} come from SamplingParams, not from generate() keywords")
    first = list(extra.pop("logits_processor", None) or [])
    kwargs = generate_kwargs(options, prompt_len, first) | model.drafting_kwargs(options, batch, body) | extra
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])  # the caller's, and ours
    if options.stop:
        criteria.append(_StopStrings(tokenizer, options.stop, prompt_len))
    if cancel is not None:
        if cancel.is_set():  # stopped before it began: not even the prompt goes to the body
            raise GenerationCancelled("the generation was cancelled before it started")
        criteria.append(EventStopping(cancel))
    if criteria:
        kwargs["stopping_criteria"] = criteria
    if keep_logits:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    if "custom_generate" in kwargs:  # a draft tree's loop: generate() keeps `streamer` to itself
        kwargs["token_streamer"] = steps
    device = model.device
    ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(ids)
    if cache is None:
        cache = model.new_cache(body)
    elif cache.body is not body or cache.get_seq_length() >= prompt_len:
        raise ValueError("a continued cache must belong to `body` and hold fewer positions than input_ids")
    first_step = len(cache.steps)
    cache.on_features = cache.draft_stats = None  # a continued cache's last turn may have drafted; this one sets its own
    body.stats.reset()
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=mask, streamer=steps, tokenizer=tokenizer,
        pad_token_id=tokens.pad_id, **{model.cache_kwarg: cache}, **kwargs,
    )
    timings = Timings(total=time.perf_counter() - start, steps=cache.steps[first_step:])
    timings.prefill = (steps.first_at or time.perf_counter()) - start
    sequences = out.sequences if keep_logits else out
    texts, token_ids, reasons = _trim(tokens, sequences[:, prompt_len:].tolist(), options, cancel is not None and cancel.is_set())
    timings.tokens = max(len(row) for row in token_ids)
    return GenerationResult(
        texts=texts,
        prompt_token_ids=[row[m.bool()].tolist() for row, m in zip(input_ids, mask.cpu(), strict=True)],
        token_ids=token_ids,
        timings=timings,
        bytes_to_cloud=body.stats.bytes_to_cloud,
        bytes_from_cloud=body.stats.bytes_from_cloud,
        finish_reasons=reasons,
        round_trips=body.stats.frames_from_cloud,
        logits=torch.stack(out.logits) if keep_logits else None,
        drafting=cache.draft_stats.as_dict() if cache.draft_stats is not None else None,
    )


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in `text`, or None."""
    found = [text.index(s) for s in stops if s and s in text]
    return min(found) if found else None


def completes_stop(tokenizer: PreTrainedTokenizerBase, ids: list[int], stops: tuple[str, ...],
                   shown: Callable[[str], str] | None = None) -> int:
    """The fewest leading tokens of `ids` whose text (as `shown` turns it, e.g. restored from stand-ins)
    contains a stop string (binary search: a longer prefix's text contains a shorter one's)."""
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        text = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if first_stop(shown(text) if shown is not None else text, stops) is not None:
            high = mid
        else:
            low = mid + 1
    return high


def _trim(
    tokens: PromptTokenizer, rows: list[list[int]], options: SamplingParams, cancelled: bool
) -> tuple[list[str], list[list[int]], list[str]]:
    """Cut each row after its EOS and at the first stop string (with the padding generate() adds to
    rows that finished early); decode the text; name why each row ended."""
    tokenizer = tokens.tokenizer if tokens.has_tokenizer else None
    eos = set(tokens.eos_ids)
    texts, kept, reasons = [], [], []
    for row in rows:
        cut = None if options.ignore_eos else next((i + 1 for i, t in enumerate(row) if t in eos), None)
        ids = row[:cut] if cut else row
        reason = "stop" if cut else ("cancelled" if cancelled else "length")
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
        if (cut := first_stop(text, options.stop)) is not None:
            text, reason = text[:cut], "stop"
            ids = ids[: completes_stop(tokenizer, ids, options.stop)]  # not the padding generate() adds after it
        texts.append(text)
        kept.append(ids)
        reasons.append(reason)
    return texts, kept, reasons
