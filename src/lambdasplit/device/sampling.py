"""Sampling settings and the next-token choice, built on transformers' own logits processors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lambdasplit.errors import LambdaSplitError


@dataclass
class SamplingConfig:
    """Greedy when `greedy` is set (the default); otherwise temperature / top-k / top-p sampling."""

    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

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


class Sampler:
    """Chooses each next token as transformers' `generate()` would for the same settings."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        processors = LogitsProcessorList()
        if config.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if not config.greedy:
            if config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                processors.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1.0:
                processors.append(TopPLogitsWarper(config.top_p))
        self.processors = processors
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def __call__(self, sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids (B,) from the last position's logits (B, V) and all ids so far (B, S)."""
        scores = self.processors(sequences, logits.float())
        if self.config.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(logits.device)
