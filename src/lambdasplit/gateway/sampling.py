"""The gateway's own processors: `logprobs` (recorded from the raw logits, vLLM's default
"raw_logprobs") and `response_format`'s JSON-schema constraint (lm-format-enforcer).

Both go to `generate_ids` as its `logits_processor`, which runs them before the processors that the
request's `SamplingParams` build (device/sampling.py): penalties, logit bias, temperature, top-k,
top-p and a seeded draw. Each request carries its own processors while the model is shared.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, PrefixConstrainedLogitsProcessor, PreTrainedTokenizerBase


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
