"""SplitModelForCausalLM: the split model as a transformers model, so `generate()` drives it.

Its forward runs head -> body client -> tail and returns `CausalLMOutputWithPast`; its `SplitCache`
holds the head's and tail's KV here and stands for the body's KV on the server (its length). So
every `generate()` feature (greedy, seeded sampling, repetition penalty, top-k/p, stop strings,
streamers, left-padded batches) and `pipeline("text-generation")` work unchanged, and give the
unsplit model's tokens.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Cache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
from transformers.modeling_outputs import CausalLMOutputWithPast

from lambdasplit import defaults
from lambdasplit.device.body import BodyClient
from lambdasplit.errors import LambdaSplitError, PromptError
from lambdasplit.split.load import OpenedSource, device_runners, open_source, resolve_dtype, resolve_quantize
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.parts import BUILD_LOCK, PartRunner

log = logging.getLogger(__name__)

# transformers renamed `past_key_values` to `cache` in 5.2x (generate's kwarg and the output field).
CACHE = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


class SplitCache(Cache):
    """The head's and tail's KV caches (local runners) and, through the body client's session, the
    body's KV on the server; a new one starts a new sequence on all three."""

    def __init__(self, head: PartRunner, tail: PartRunner, body: BodyClient) -> None:
        super().__init__(layers=[])
        self.head = PartRunner(head.module, "head", head.config)
        self.tail = PartRunner(tail.module, "tail", tail.config)
        self.body = body
        self.steps: list[tuple[float, float, float]] = []  # (head, body, tail) seconds per forward
        self.on_features: Callable[[torch.Tensor], None] | None = None  # a draft head's input (device/draft.py)
        self.draft_stats: Any = None  # what that draft head did (draft.DraftStats)
        body.reset()

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.head.seq_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_linear(self) -> list[bool]:
        """One full-attention sequence to generate(), which then feeds a continued cache only the
        positions it lacks (the gateway's multi-turn reuse)."""
        return [False]

    def crop(self, max_length: int) -> None:
        """Drop positions on head, tail and body: `crop(-k)` drops the last k (transformers'
        assisted decoding, after the tail rejects draft tokens); a positive value is the length
        to keep."""
        max_length = int(max_length)  # transformers 5.17 passes a 0-d tensor
        length = self.get_seq_length() + max_length if max_length <= 0 else max_length
        if not 0 <= length <= self.get_seq_length():
            raise ValueError(f"cannot crop {self.get_seq_length()} positions to {length}")
        for runner in (self.head, self.tail):  # checked before anything is cropped, so the parts stay in step
            if runner.cache is not None and any(type(layer) is not DynamicLayer for layer in runner.cache.layers):
                raise NotImplementedError(
                    "speculative decoding needs full-attention layers on the device; this model's head or tail "
                    "has sliding-window layers, which cannot be cropped yet"
                )
        self.head.crop(length)
        self.tail.crop(length)
        self.body.crop(length)

    @property
    def is_croppable(self) -> bool:
        return True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by the split model: the body's rows cannot be reordered yet")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("selecting rows of the split model's cache is not supported yet")

    @property
    def is_compileable(self) -> bool:
        return False


class AdaptivePromptLookup(PromptLookupCandidateGenerator):
    """Prompt lookup whose draft length follows its acceptance, like transformers' "heuristic"
    schedule for draft models: +2 after a fully accepted draft, -1 after a rejection. A one-token
    draft that is rejected pauses drafting for 1, 2, 4 ... up to 16 steps, so chat that never
    repeats the prompt decodes almost as plain decoding does (every drafted position costs the
    device a head, tail and LM-head pass, and the body a position)."""

    proposed = 0
    longest = 64
    pause = 0  # steps left without drafting
    backoff = 0  # the next pause's length

    def get_candidates(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> tuple:
        if self.pause:
            self.pause -= 1
            self.proposed = 0
            return input_ids, None
        out = super().get_candidates(input_ids, *args, **kwargs)
        self.proposed = out[0].shape[1] - input_ids.shape[1]
        return out

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        if not self.proposed:  # no n-gram matched or paused: nothing was drafted, nothing to learn
            return
        if num_matches >= self.proposed:
            self.num_output_tokens = min(self.num_output_tokens + 2, self.longest)
            self.backoff = 0
        elif self.num_output_tokens > 1:
            self.num_output_tokens -= 1
        elif num_matches == 0:
            self.backoff = min(2 * self.backoff or 1, 16)
            self.pause = self.backoff


class SplitModelForCausalLM(PreTrainedModel, GenerationMixin):
    """Head and tail on this machine, the body behind a `BodyClient` (in process or a server).

    Like a transformers model it owns its config and its modules (the head's and the tail's), and
    `post_init` ties the tail's LM head to the head's embedding where the config ties them; the
    parts come loaded (`from_source`), so nothing is initialised.
    """

    base_model_prefix = "split"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _tied_weights_keys = {"tail_module.lm_head.weight": "head_module.embed_tokens.weight"}

    def __init__(self, opened: OpenedSource, head: PartRunner, tail: PartRunner, manifest: PartManifest,
                 body: BodyClient | None = None) -> None:
        super().__init__(opened.config)
        self.opened, self.spec, self.manifest = opened, opened.spec, manifest
        self.head, self.tail = head, tail  # the runners SplitCache copies, one per sequence
        self.body = body
        # Registered so that .device, .dtype and .to() see the device's weights.
        self.head_module: nn.Module = head.module
        self.tail_module: nn.Module = tail.module
        try:
            self.generation_config = GenerationConfig.from_pretrained(opened.checkpoint.path)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(opened.config)
        with BUILD_LOCK:  # the tie assigns a parameter: not while another thread builds a part
            self.post_init()

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike[str] | None = None,
        split: tuple[int, int] | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        allow_shallow: bool = False,
        quantize: str | None = None,
    ) -> SplitModelForCausalLM:
        """Head and tail of a model source or an exported device part, with no body yet (one is
        given per sequence: `new_cache(body)`); `quantize` (int8, int4, gguf-exact) stores their weights quantized."""
        opened = open_source(source, split, allow_shallow)
        torch_dtype = resolve_dtype(dtype, opened)
        quantize = resolve_quantize(quantize, opened)
        head, tail = device_runners(opened, torch_dtype, device, quantize)
        return cls(opened, head, tail, opened.manifest("device", torch_dtype, quantize)).eval()

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        source: str | os.PathLike[str] | None = None,
        split: tuple[int, int] | None = None,
        body: BodyClient | str | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        quantize: str | None = None,
        **body_options: Any,
    ) -> SplitModelForCausalLM:
        """Load head and tail from `source`; `body` is a `BodyClient`, a server URL (`ws://`,
        `wss://`; `body_options` go to `BodyConfig`), or None for the body in this process.
        `quantize` (int8, int4, gguf-exact) quantizes head and tail weights; the body is unaffected."""
        model = cls.from_source(source, split, dtype, device, quantize=quantize)
        if isinstance(body, str):
            from lambdasplit.device.connect import BodyConfig, connect_body

            body = connect_body(BodyConfig(server=body, **body_options), model.manifest)
        elif body is None:  # the engine is imported only for a body in this process
            from lambdasplit.engine.local import load_local_body

            body = load_local_body(None if source is None else str(source), split, dtype, device)
        model.body = body
        return model

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    cache_kwarg = CACHE  # generate()'s name for a cache passed in

    def new_cache(self, body: BodyClient | None = None) -> SplitCache:
        """A new sequence over `body` (default: the model's own), e.g. one per concurrent request."""
        body = body or self.body
        if body is None:
            raise ValueError("this SplitModelForCausalLM has no body: pass one to new_cache(body)")
        return SplitCache(self.head, self.tail, body)

    def drafting_kwargs(self, options: Any, batch: int, body: BodyClient | None = None) -> dict[str, Any]:
        """`generate()` arguments for `options.speculate` (see generation.SPECULATE_HELP) over
        `body` (default: the model's own)."""
        mode = options.speculate
        if mode is None:
            return {}
        if batch > 1:
            raise PromptError("speculative decoding drafts for one sequence at a time; drop --speculate for batches")
        if mode == "prompt-lookup":
            return {"prompt_lookup_num_tokens": options.draft_tokens or defaults.DRAFT_TOKENS}
        if mode == "draft-tree" or mode.startswith("draft-tree:"):
            from lambdasplit.device.tree import tree_kwargs

            # A tree is verified greedily; sampling drafts the head's chain (speculative sampling).
            tree = tree_kwargs(self, mode, body or self.body, options.draft_tokens or defaults.DRAFT_TREE_NODES) if options.greedy else None
            if tree is not None:
                return tree
            if options.greedy:
                log.warning("the body verifies no draft trees (a server without them, or a body with sliding-window "
                            "layers or tensor parallel): drafting chains instead")
            mode = mode.replace("draft-tree", "draft-head", 1)
        if mode == "draft-head" or mode.startswith("draft-head:"):
            from lambdasplit.device.draft import drafting_kwargs

            return drafting_kwargs(self, mode, options.draft_tokens or defaults.DRAFT_TOKENS)
        if mode == "self":
            raise LambdaSplitError(
                "self-drafting (head + tail without the body) is not offered: its drafts agree with the full model on "
                "0-12% of tokens for splits up to 8,8 (`python3 -m benchmarks self-draft`), too few to pay for verifying "
                "them; use --speculate prompt-lookup or a small draft model's path"
            )
        draft = self._draft_model(mode)
        draft.generation_config.num_assistant_tokens = options.draft_tokens or defaults.DRAFT_TOKENS
        draft.generation_config.num_assistant_tokens_schedule = "heuristic"  # adapts to the acceptance rate
        return {"assistant_model": draft}

    def _draft_model(self, path: str) -> PreTrainedModel:
        """A small local model with this model's tokenizer, loaded once per path."""
        from transformers import AutoModelForCausalLM

        from lambdasplit.split.manifest import PartManifest
        from lambdasplit.split.sources import resolve_source

        drafts = self.__dict__.setdefault("_drafts", {})
        if path not in drafts:
            try:
                checkpoint = resolve_source(path)
            except LambdaSplitError as exc:
                raise LambdaSplitError(f"--speculate {path}: {exc}") from None
            if PartManifest.read(checkpoint.path) is not None:
                raise LambdaSplitError(f"--speculate {path}: an exported part holds only some layers; a draft model must be whole")
            draft = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), dtype=self.dtype).to(self.device).eval()
            vocab = draft.config.get_text_config().vocab_size
            if vocab != self.config.get_text_config().vocab_size:
                raise LambdaSplitError(
                    f"--speculate {path}: the draft model's vocabulary has {vocab} tokens, this model's "
                    f"{self.config.get_text_config().vocab_size}; a draft model must share the tokenizer"
                )
            drafts[path] = draft
        return drafts[path]

    def _get_candidate_generator(self, generation_config: GenerationConfig, input_ids: torch.LongTensor,
                                 inputs_tensor: torch.Tensor, logits_processor: Any, model_kwargs: dict,
                                 *args: Any, **kwargs: Any) -> Any:
        """The draft head's generator (device/draft.py) when generate() was given a `Drafter`; prompt
        lookup drafts with AdaptivePromptLookup; other drafting is transformers' own."""
        from lambdasplit.device.draft import Drafter, DraftHeadCandidates

        if isinstance(drafter := kwargs.get("assistant_model"), Drafter):
            return DraftHeadCandidates(drafter, model_kwargs[CACHE], generation_config, logits_processor)
        if generation_config.prompt_lookup_num_tokens is None:
            return super()._get_candidate_generator(
                generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, *args, **kwargs
            )
        return AdaptivePromptLookup(
            eos_token_id=generation_config._eos_token_tensor,
            num_output_tokens=generation_config.prompt_lookup_num_tokens,
            max_matching_ngram_size=generation_config.max_matching_ngram_size or 2,
            max_length=generation_config.max_length,
            logits_processor=logits_processor,
            vocab_size=self.config.get_text_config().vocab_size,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """Every generate() call starts a new sequence on head, body and tail (unless given a cache)."""
        if model_kwargs.get(CACHE) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE] = self.new_cache()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SplitCache | None = None,
        past_key_values: SplitCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        tree: list[int] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Extend the sequence by input_ids' T positions. The runners derive position ids from the
        mask columns exactly as the unsplit model does, so `position_ids` is not needed. `tree`:
        the T positions are a draft tree (each one's parent, device/tree.py), verified in one
        body round trip; every position is cached until the caller crops."""
        state = cache if cache is not None else past_key_values
        if state is None:
            state = self.new_cache()
        length = input_ids.shape[1]
        columns = attention_mask[:, -length:] if attention_mask is not None else None
        mask = columns if columns is not None and not bool(columns.all()) else None
        t0 = time.perf_counter()
        hidden = state.head(input_ids, mask, tree=tree)
        t1 = time.perf_counter()
        hidden = state.body.forward(hidden, mask, tree=tree)
        t2 = time.perf_counter()
        # The runners work under inference_mode; a plain copy lets logits processors edit it in place.
        logits = state.tail(hidden, mask, logits_to_keep=logits_to_keep, on_features=state.on_features, tree=tree).clone()
        state.steps.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return CausalLMOutputWithPast(logits=logits, **{CACHE: state})
