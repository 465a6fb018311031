"""PromptTokenizer: the device's text side — the tokenizer, prompt and chat encoding, EOS and padding.

It knows the checkpoint, not the split model, so `generation.generate_ids` takes it next to the
model and neither imports the other (`SplitRuntime` in device/runtime.py pairs the two).
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from lambdasplit.errors import PromptError
from lambdasplit.split.load import OpenedSource


class PromptTokenizer:
    """A checkpoint's tokenizer (None for weight-only directories), its EOS ids and its padding id."""

    def __init__(self, opened: OpenedSource, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.opened = opened
        self._tokenizer = tokenizer
        self.eos_ids = _eos_ids(opened, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer is not None else getattr(opened.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @classmethod
    def load(cls, opened: OpenedSource) -> PromptTokenizer:
        return cls(opened, _load_tokenizer(opened))

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
