"""The gateway's sampler: OpenAI's sampling fields as transformers logits processors.

The gateway hands `generate()` a complete `LogitsProcessorList`, and its `GenerationOptions` leave
the processors `generate()` would build itself neutral (temperature 1, top_p 1, no top_k; a seed
samples with the request's own generator, `device/generation.py`'s SeededSampling, appended last). That fixes the order — raw
logits are recorded for `logprobs` first (vLLM's default, "raw_logprobs"), then repetition,
presence/frequency penalties, `logit_bias`, the JSON-schema constraint, and only then temperature,
top-k and top-p, as transformers orders its own — and lets each request carry its own processors
while the model is shared.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from lambdasplit.device.generation import sampling_warpers
from lambdasplit.gateway.schema import Sampling


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated so far (not the prompt,
    as vLLM counts them): logit[t] -= presence * (count[t] > 0) + frequency * count[t].
    transformers has no processor with this definition (its repetition penalty divides).
    `prompt_len` None takes the width of the first ids it sees, the prompt's (for a batch built
    elsewhere: a protected request's rows)."""

    def __init__(self, prompt_len: int | None, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-softmax of the latest raw logits; `take` reads the chosen tokens' entries
    once generate() has picked them (from the on_tokens callback, before the next step)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def take(self, chosen: list[int]) -> list[TokenLogprob]:
        """One entry per row for this step's tokens (one token per row: speculation is off)."""
        assert self.last is not None, "take() before the first step"
        rows = self.last
        picked = rows.gather(1, torch.tensor(chosen, device=rows.device).view(-1, 1)).squeeze(1).tolist()
        if self.top:
            values, ids = rows.topk(self.top, dim=-1)
            tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        else:
            tops = [()] * len(chosen)
        return [TokenLogprob(t, p, top) for t, p, top in zip(chosen, picked, tops, strict=True)]


class JsonSchemaConstraint:
    """JSON-schema constrained decoding through lm-format-enforcer's tokenizer-independent core (its
    transformers integration does not import on transformers 5). The vocabulary analysis takes a
    second or two, so it is done once per tokenizer, on first use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self._data: Any = None
        self._lock = threading.Lock()

    def _tokenizer_data(self) -> Any:
        from lmformatenforcer import TokenEnforcerTokenizerData

        with self._lock:
            if self._data is None:
                tokenizer = self.tokenizer
                zero = tokenizer.encode("0", add_special_tokens=False)[-1]
                special = set(tokenizer.all_special_ids)
                regular = []
                for token in range(len(tokenizer)):
                    if token in special:
                        continue
                    # decoding after "0" shows whether the token starts a word (a leading space)
                    after_zero = tokenizer.decode([zero, token])[1:]
                    regular.append((token, after_zero, len(after_zero) > len(tokenizer.decode([token]))))
                self._data = TokenEnforcerTokenizerData(
                    regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"), self.eos_ids, False, len(tokenizer)
                )
            return self._data

    def processor(self, schema: dict[str, Any], rows: int) -> LogitsProcessor:
        """A processor allowing, per row, only tokens that keep the text a prefix of valid JSON for `schema`."""
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        data = self._tokenizer_data()
        enforcers = [TokenEnforcer(data, JsonSchemaParser(schema)) for _ in range(rows)]

        def allowed(row: int, sequence: torch.Tensor) -> list[int]:
            return enforcers[row].get_allowed_tokens(sequence.tolist()).allowed_tokens

        return PrefixConstrainedLogitsProcessor(allowed, num_beams=1)


def logits_processors(
    sampling: Sampling, prompt_len: int | None, recorder: LogprobRecorder | None, constraint: LogitsProcessor | None
) -> LogitsProcessorList:
    """Every processor of one request, in the order described in the module docstring."""
    processors: list[LogitsProcessor] = [recorder] if recorder is not None else []
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.presence_penalty or sampling.frequency_penalty:
        processors.append(OpenAIPenalties(prompt_len, sampling.presence_penalty, sampling.frequency_penalty))
    if sampling.logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in sampling.logit_bias.items()]))
    if constraint is not None:
        processors.append(constraint)
    if not sampling.greedy:
        processors.extend(sampling_warpers(sampling.temperature, sampling.top_k, sampling.top_p))
    return LogitsProcessorList(processors)
