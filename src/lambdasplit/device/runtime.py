"""SplitDevice: what runs on the phone or laptop — tokenizer, head and tail, loaded from a source.

Token ids and text stay here; only hidden states go to the body through a BodyClient. Generation is
transformers' `generate()` over `SplitModelForCausalLM` (device/model.py, device/generation.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from lambdasplit.device.body import BodyClient
from lambdasplit.errors import PromptError
from lambdasplit.split.load import OpenedSource, device_runners, open_source, resolve_dtype, resolve_quantize
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.parts import PartRunner

if TYPE_CHECKING:
    from lambdasplit.device.generation import GenerationOptions, GenerationResult
    from lambdasplit.device.model import SplitModelForCausalLM


class SplitDevice:
    """Head and tail of a split model, with the tokenizer."""

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
        self._model: SplitModelForCausalLM | None = None

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | None = None,
        split: tuple[int, int] | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        allow_shallow: bool = False,
        quantize: str | None = None,
    ) -> SplitDevice:
        """Load head + tail (and the tokenizer) from a model source or an exported device part;
        `quantize` (int8, int4) stores their weights quantized (split/quantize.py)."""
        opened = open_source(source, split, allow_shallow)
        torch_dtype = resolve_dtype(dtype, opened)
        quantize = resolve_quantize(quantize, opened)
        head, tail = device_runners(opened, torch_dtype, device, quantize)
        tokenizer = _load_tokenizer(opened)
        return cls(opened, head, tail, tokenizer, opened.manifest("device", torch_dtype, quantize))

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

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
        options: GenerationOptions | None = None,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate from text prompts; `on_text` receives the single row's text as it is produced."""
        input_ids, mask = self.encode(prompts, raw)
        return self.generate_ids(body, input_ids, mask, options, on_text)

    def generate_ids(self, body: BodyClient, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     options: GenerationOptions | None = None, on_text: Callable[[str], None] | None = None,
                     **kwargs: Any) -> GenerationResult:
        """`generation.generate_ids` through this device's `SplitModelForCausalLM` (transformers' generate())."""
        from lambdasplit.device.generation import generate_ids

        return generate_ids(self.model, body, input_ids, attention_mask, options, on_text, **kwargs)

    @property
    def model(self) -> SplitModelForCausalLM:
        """This device as a transformers model (made once; the body is given per generation)."""
        if self._model is None:
            from lambdasplit.device.model import SplitModelForCausalLM

            self._model = SplitModelForCausalLM(self).eval()
        return self._model


def _load_tokenizer(opened: OpenedSource) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer; None for weight-only directories (benchmarks with random weights)."""
    path = opened.checkpoint.path
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(path), config=opened.config)  # an exported part's config.json is a stub


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
