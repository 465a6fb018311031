"""SplitRuntime: what runs on the phone or laptop — the split model (head and tail) and its tokenizer.

Token ids and text stay here; only hidden states go to the body through a BodyClient. The model
(device/model.py) and the tokenizer (device/tokens.py) know nothing of each other; generation
(device/generation.py) takes both, and this class pairs them for the CLI, gateway, UI and audit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationResult, generate_ids
from lambdasplit.device.model import SplitModelForCausalLM
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.device.tokens import PromptTokenizer


class SplitRuntime:
    """Head and tail of a split model (as a transformers model), with the tokenizer."""

    def __init__(self, model: SplitModelForCausalLM, tokens: PromptTokenizer) -> None:
        self.model = model  # the body is given per generation
        self.tokens = tokens
        self.opened, self.spec, self.config = model.opened, model.spec, model.config
        self.head, self.tail, self.manifest = model.head, model.tail, model.manifest
        self.eos_ids, self.pad_id = tokens.eos_ids, tokens.pad_id

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | None = None,
        split: tuple[int, int] | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        allow_shallow: bool = False,
        quantize: str | None = None,
    ) -> SplitRuntime:
        """Load head + tail (and the tokenizer) from a model source or an exported device part;
        `quantize` (int8, int4, gguf-exact) stores their weights quantized (split/quantize.py)."""
        model = SplitModelForCausalLM.from_source(source, split, dtype, device, allow_shallow, quantize)
        return cls(model, PromptTokenizer.load(model.opened))

    @property
    def max_context(self) -> int:
        return self.model.max_context

    @property
    def has_tokenizer(self) -> bool:
        return self.tokens.has_tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokens.tokenizer

    def encode_chat(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """Token ids (1, T) of a multi-turn conversation through the model's chat template."""
        return self.tokens.encode_chat(messages)

    def encode(self, prompts: str | list[str], raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, left-padded; the chat template is applied unless `raw`."""
        return self.tokens.encode(prompts, raw)

    def generate(
        self,
        body: BodyClient,
        prompts: str | list[str],
        options: SamplingParams | None = None,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate from text prompts; `on_text` receives the single row's text as it is produced."""
        input_ids, mask = self.encode(prompts, raw)
        return self.generate_ids(body, input_ids, mask, options, on_text)

    def generate_ids(self, body: BodyClient, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     options: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
                     **kwargs: Any) -> GenerationResult:
        """`generation.generate_ids` with this device's model and tokenizer (transformers' generate())."""
        return generate_ids(self.model, self.tokens, body, input_ids, attention_mask, options, on_text, **kwargs)
