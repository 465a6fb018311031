"""`SamplingParams`: what one request asks of the sampler, built by the CLI, the gateway, the UI and
the Python API alike, and turned into `generate()` arguments in one place (`generate_kwargs`).

Every setting becomes a logits processor of our own, in transformers' order (repetition penalty,
OpenAI's presence/frequency penalties, logit bias, then temperature, top-k and top-p), and the
`generate()` keywords that would build the same processors from the model's generation_config are
set to None: no default of the model's file overrides, or doubles, a setting the request made. A
seeded request draws its token with its own `torch.Generator` (`SeededSampling`), never by
reseeding torch's global generator, which concurrent requests share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lambdasplit.errors import LambdaSplitError

# generate()'s keywords that SamplingParams sets (the processors they would build are ours).
SAMPLING_KEYWORDS = frozenset({"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty"})


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling and stopping, checked with messages that name the CLI options. Greedy
    unless `greedy` is False; `speculate` and `draft_tokens` choose this request's drafting
    (generation.SPECULATE_HELP), which never changes the tokens of a greedy or seeded request."""

    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers' (divides a seen token's positive logit)
    presence_penalty: float = 0.0  # OpenAI's (subtracts, over the generated tokens only)
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    speculate: str | None = None
    draft_tokens: int | None = None  # the first draft's length, the draft head's longest chain or a tree's nodes (None: the mode's default)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LambdaSplitError("--max-new-tokens must be at least 1")
        if self.temperature <= 0:
            raise LambdaSplitError("--temperature must be > 0 (use --greedy for deterministic decoding)")
        if not 0 < self.top_p <= 1:
            raise LambdaSplitError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise LambdaSplitError("--top-k must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise LambdaSplitError("--repetition-penalty must be > 0")
        if not all(self.stop):
            raise LambdaSplitError("--stop strings must not be empty (an empty string would match at once)")
        if not all(math.isfinite(x) for x in (self.presence_penalty, self.frequency_penalty, *self.logit_bias.values())):
            raise LambdaSplitError("penalties and logit biases must be finite numbers")
        if self.draft_tokens is not None and not 1 <= self.draft_tokens <= 64:
            raise LambdaSplitError("--draft-tokens must be from 1 to 64")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise LambdaSplitError("--seed must be from 0 to 2**63 - 1")


class SeededSampling(LogitsProcessor):
    """Draws each row's next token from the processed scores with this request's own `torch.Generator`
    and leaves only that token possible, so generate()'s multinomial (which reads torch's global
    generator, shared by every thread) can pick nothing else; generate() takes no generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float().cpu(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated so far (not the prompt,
    as vLLM counts them): logit[t] -= presence * (count[t] > 0) + frequency * count[t].
    transformers has no processor with this definition (its repetition penalty divides)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


def processors(params: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """The request's processors in transformers' order (`prompt_len`: the batch's prompt width); a
    sampled request ends with its warpers and, when seeded, the draw with its own generator."""
    out: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        out.append(OpenAIPenalties(prompt_len, params.presence_penalty, params.frequency_penalty))
    if params.logit_bias:
        out.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in params.logit_bias.items()]))
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    if params.seed is not None:
        out.append(SeededSampling(params.seed))
    return out


def generate_kwargs(params: SamplingParams, prompt_len: int, first: list[LogitsProcessor] | None = None) -> dict[str, Any]:
    """The one mapping of `params` to `generate()` arguments (drafting is added by the model).
    `first` are the caller's processors, which see the raw logits before ours (the gateway's
    logprob recorder and JSON-schema constraint: a constraint's -inf stays -inf through every
    penalty and warper, so it may come first)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens, "do_sample": not params.greedy,
        "temperature": None, "top_k": None, "top_p": None, "repetition_penalty": None,
        "logits_processor": LogitsProcessorList([*(first or []), *processors(params, prompt_len)]),
    }
    if params.ignore_eos:
        kwargs["min_new_tokens"] = params.max_new_tokens
    return kwargs
