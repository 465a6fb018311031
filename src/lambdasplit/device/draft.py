"""A trained draft head on the device (EAGLE-1 style, issue 24): several tokens per body round trip.

The device already holds what a draft needs: the token embeddings (head), the LM head and the tail's
last hidden state. `DraftHead` is one decoder layer of the model's own family (transformers'
modules, built from the model's config with one layer and a smaller MLP) over
fc([feature_i, embedding(token_(i+1))]); it predicts feature_(i+1), and the model's own LM head,
restricted to a draft vocabulary of the most frequent answer tokens (EAGLE-3's trick: the full
49k-row LM head costs ~12 ms a token on a 2-core CPU, 8k rows ~1 ms), turns it into a token.

The feature is the tail's *post-norm* last hidden state (what the LM head reads): its scale is fixed
by the final norm, so it is a well-conditioned regression target, the head's prediction goes straight
into the LM head without another norm, and it is what transformers returns as `hidden_states[-1]`,
so training on the unsplit model and drafting on the split tail see the same numbers.

Drafts go to the body through transformers' assisted decoding: `DraftHeadCandidates` is a
`CandidateGenerator`, chosen by `SplitModelForCausalLM._get_candidate_generator` when
`generate(assistant_model=Drafter)` is called. The body verifies the whole chain in one frame;
rejected positions are cropped on head, body and tail (CROP), so greedy output equals plain
decoding, and sampling uses speculative sampling's acceptance rule with the draft's probabilities.
This module drafts chains; device/tree.py drafts a static tree with the same head and has the body
verify it in one frame (`--speculate draft-tree`), which accepts more tokens per round trip but
costs the device more drafting and a tail and LM head over more positions (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationConfig, LogitsProcessorList, PretrainedConfig
from transformers.generation.candidate_generator import CandidateGenerator

from lambdasplit import defaults
from lambdasplit.errors import LambdaSplitError
from lambdasplit.split.adapters import adapter_for
from lambdasplit.split.parts import cache_kwarg

log = logging.getLogger(__name__)

FORMAT = "lambdasplit-draft-head/1"
WEIGHTS = "draft_head.safetensors"
CONFIG = "draft_head.json"
SHIPPED = Path(__file__).parent / "draft_data" / "smollm2-135m-instruct"
PROMPTS = Path(__file__).parent / "draft_data"


class DraftHeadError(LambdaSplitError):
    """A draft head directory that is missing, malformed, or made for another model."""


def layer_config(config: PretrainedConfig, intermediate_size: int) -> PretrainedConfig:
    """The model's config for one full-attention decoder layer (its last one) with a smaller MLP and
    no vocabulary of its own: the head borrows the model's embeddings and LM head."""
    text = config.get_text_config()
    sub = adapter_for(text).sub_config(text, text.num_hidden_layers - 1, text.num_hidden_layers)
    sub.intermediate_size = intermediate_size
    sub.vocab_size = 1
    sub.pad_token_id = None
    if getattr(sub, "layer_types", None):  # the draft cache is cropped after every verification
        sub.layer_types = ["full_attention"]
    return sub


def embedding_fingerprint(embedding: torch.Tensor) -> list[float]:
    """Two sums over the first rows of the embedding matrix: a head trained for one model is refused
    for another whose shapes happen to match (dtype casts move them by far less than the tolerance)."""
    rows = embedding[:1024].detach().double().cpu()
    return [float(rows.abs().sum()), float((rows * torch.linspace(-1, 1, rows.shape[1], dtype=torch.float64)).sum())]


class DraftHead(nn.Module):
    """fc([feature, embedding of the next token]) -> one decoder layer -> the next feature."""

    def __init__(self, config: PretrainedConfig, intermediate_size: int, vocab: torch.Tensor) -> None:
        super().__init__()
        self.config = layer_config(config, intermediate_size)
        hidden = self.config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.model = AutoModel.from_config(self.config)
        self.model.embed_tokens = None
        self.model.norm = nn.Identity()
        self.register_buffer("vocab", vocab.to(torch.long).clone())  # draft vocabulary: ids of the model's tokens

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted features (B, T, H) for pairs (features[i], embeddings[i]) at `positions`
        (right padding needs no mask: it only follows the real positions). `mask`: an additive
        (B, 1, T, cache + T) attention mask instead of the causal one, for drafting a tree of
        tokens in one pass per depth (benchmarks/draft_tree.py)."""
        x = self.fc(torch.cat([features, embeddings.to(features.dtype)], dim=-1))
        kwargs: dict[str, Any] = {"inputs_embeds": x, "position_ids": positions, "use_cache": cache is not None}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if cache is not None:
            kwargs[cache_kwarg(self.model)] = cache
        return self.model(**kwargs).last_hidden_state

    def save(self, directory: Path, meta: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
        (directory / CONFIG).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, config: PretrainedConfig) -> tuple[DraftHead, dict[str, Any]]:
        """The head in `directory` for a model with `config` (checked against the head's json)."""
        meta = read_meta(directory)
        text = config.get_text_config()
        for key in ("hidden_size", "vocab_size", "model_type"):
            if meta.get(key) != getattr(text, key, None):
                raise DraftHeadError(f"{directory}: the draft head is for a model with {key} {meta.get(key)!r}, this one has "
                                     f"{getattr(text, key, None)!r}; train one with `lambdasplit train-draft`")
        try:
            tensors = load_file(str(directory / WEIGHTS))
            head = cls(config, int(meta["intermediate_size"]), tensors["vocab"])
            head.load_state_dict(tensors, strict=True)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise DraftHeadError(f"{directory}: unreadable draft head ({' '.join(str(exc).split())[:200]})") from None
        return head.eval(), meta


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except OSError:
        raise DraftHeadError(f"{directory}: not a draft head directory (no {CONFIG}); train one with `lambdasplit train-draft`") from None
    except json.JSONDecodeError as exc:
        raise DraftHeadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DraftHeadError(f"{path}: not a {FORMAT} file")
    if not isinstance(meta.get("intermediate_size"), int) or meta["intermediate_size"] < 1:
        raise DraftHeadError(f"{path}: intermediate_size must be a positive integer")
    return meta


class Drafter:
    """A draft head bound to a model's embeddings and LM head: what `generate(assistant_model=...)`
    receives (generate() only reads its `config`, which is the model's, so the vocabularies match)."""

    def __init__(self, head: DraftHead, embed: nn.Module, lm_head: nn.Module, config: PretrainedConfig,
                 softcap: float | None = None) -> None:
        self.head = head
        self.embed = embed
        self.config = config
        weight = lm_head.weight.detach()
        self.lm_rows = weight[head.vocab.to(weight.device)].to(next(head.parameters()).dtype).contiguous()
        self.vocab_size = int(weight.shape[0])
        self.softcap = softcap

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of predicted features."""
        logits = features @ self.lm_rows.T
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.embed(ids).clone()


@dataclass
class DraftStats:
    """What drafting did in one generation: the benchmarks report device ms per drafted token."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)

    @property
    def ms_per_drafted_token(self) -> float:
        return 1000 * self.seconds / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "ms_per_drafted_token": self.ms_per_drafted_token, "seconds": self.seconds}


class DraftHeadCandidates(CandidateGenerator):
    """transformers' candidate generator for the draft head.

    The split cache hands it the tail's features of every forward (`SplitCache.on_features`). Before
    each verification it feeds the draft layer the pairs (feature_i, token_(i+1)) that were confirmed
    since the last call, then drafts a chain token by token from its own predicted features, and
    crops its cache back to the confirmed pairs (drafted features are guesses, replaced by the tail's
    real ones next time). Positions the cache held before this generation (a continued conversation)
    have no features: the head starts from the first position it saw.
    """

    def __init__(self, drafter: Drafter, cache: Any, generation_config: GenerationConfig,
                 logits_processor: LogitsProcessorList | None) -> None:
        self.drafter = drafter
        self.cache = cache
        self.logits_processor = logits_processor or LogitsProcessorList()
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = int(generation_config.max_length)
        self.max_tokens = int(generation_config.num_assistant_tokens)
        self.confidence = float(generation_config.assistant_confidence_threshold or 0.0)
        eos = generation_config._eos_token_tensor
        self.eos = set(eos.view(-1).tolist()) if eos is not None else set()
        self.start = cache.get_seq_length()  # the first position whose feature the tail gives us
        self.features: torch.Tensor | None = None  # (1, n, H): positions start .. start + n - 1
        self.draft_cache = drafter.head.new_cache()
        self.confirmed = 0  # pairs in draft_cache built from real features
        self.proposed = 0
        self.stats = DraftStats()
        cache.on_features = self._record
        cache.draft_stats = self.stats

    def _record(self, features: torch.Tensor) -> None:
        """Features of the positions the last forward added (the cache has already grown by them)."""
        begin = self.cache.get_seq_length() - features.shape[1] - self.start
        features = features.detach().to(self.drafter.lm_rows.dtype)
        self.features = features if self.features is None else torch.cat([self.features[:, :begin], features], dim=1)

    @torch.inference_mode()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, torch.Tensor | None]:
        length = input_ids.shape[1]
        known = length - 1 - self.start  # pairs (f_i, x_(i+1)) with i < length - 1 are all confirmed
        budget = min(self.max_tokens, self.max_length - length - 1)
        self.proposed = 0
        if self.features is None or known < 1 or budget < 1 or self.features.shape[1] < known:
            return input_ids, None
        began = time.perf_counter()
        head, device = self.drafter.head, self.drafter.lm_rows.device
        if self.draft_cache.get_seq_length() > self.confirmed:  # drop the last chain's guessed features
            self.draft_cache.crop(self.confirmed - self.draft_cache.get_seq_length())
        first = self.confirmed
        features = self.features[:, first:known].to(device)
        tokens = input_ids[:, self.start + first + 1:length].to(device)
        positions = torch.arange(self.start + first, self.start + known, device=device)[None]
        self.confirmed = known
        ids = input_ids.to(device)
        drafted_logits = []
        for _ in range(budget):
            predicted = head(features, self.drafter.embeddings(tokens), positions, self.draft_cache)[:, -1:]
            token, logits, confident = self._choose(ids, predicted[:, 0])
            if not confident:
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            drafted_logits.append(logits)
            if int(token) in self.eos:
                break
            features, tokens, positions = predicted, token[:, None], positions[:, -1:] + 1
        self.proposed = ids.shape[1] - length
        self.stats.seconds += time.perf_counter() - began
        if not self.proposed:
            return input_ids, None
        self.stats.drafted += self.proposed
        self.stats.rounds += 1
        self.stats.lengths.append(self.proposed)
        return ids, (torch.stack(drafted_logits, dim=1) if self.do_sample else None)

    def _choose(self, ids: torch.Tensor, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next draft token from predicted features: the generation's own logits processors run
        on the full vocabulary (tokens outside the draft vocabulary get -inf), then argmax, or a sample
        whose distribution goes to speculative sampling as q."""
        sub = self.drafter.logits(predicted).float()
        logits = torch.full((1, self.drafter.vocab_size), float("-inf"), device=sub.device)
        logits[:, self.drafter.head.vocab] = sub
        logits = self.logits_processor(ids, logits)
        probs = logits.softmax(dim=-1)
        token = torch.multinomial(probs, 1)[:, 0] if self.do_sample else logits.argmax(dim=-1)
        confident = self.do_sample or float(probs[0, token]) >= self.confidence
        return token, logits, confident

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        self.stats.accepted += min(int(num_matches), self.proposed)

    @property
    def num_drafting_tokens(self) -> int:
        return self.max_tokens


def load_drafter(spec: str, model: Any) -> tuple[Drafter, dict[str, Any]]:
    """`draft-head` (the shipped head of the embedded model) or `draft-head:DIR`, bound to `model`
    (a SplitModelForCausalLM) and checked against its embeddings; with the head's json."""
    directory = Path(spec.partition(":")[2]).expanduser() if ":" in spec else SHIPPED
    head, meta = DraftHead.load(directory, model.config)
    embed = model.head.module.embed_tokens
    fingerprint = embedding_fingerprint(embed.weight)
    expected = meta.get("embedding_fingerprint")
    if not (isinstance(expected, list) and len(expected) == 2
            and all(abs(a - b) <= 1e-2 * max(1.0, abs(b)) for a, b in zip(fingerprint, expected, strict=True))):
        where = "the shipped draft head (for the embedded SmolLM2-135M-Instruct)" if directory == SHIPPED else str(directory)
        raise DraftHeadError(f"{where} was trained for another model's embeddings; train one for this model with "
                             "`lambdasplit train-draft` and pass --speculate draft-head:DIR")
    head = head.to(device=model.device, dtype=model.dtype)
    tail = model.tail.module
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return Drafter(head, embed, tail.lm_head, model.config, softcap), meta


def bound_drafter(model: Any, spec: str) -> tuple[Drafter, dict[str, Any]]:
    """`load_drafter`, once per model and head directory."""
    drafters = model.__dict__.setdefault("_draft_heads", {})
    if spec not in drafters:
        drafters[spec] = load_drafter(spec, model)
    return drafters[spec]


def drafting_kwargs(model: Any, spec: str, draft_tokens: int) -> dict[str, Any]:
    """`generate()` arguments for `--speculate draft-head[:DIR]`: the bound head (loaded once per
    model and directory), the longest chain, and the confidence below which a chain stops."""
    return {"assistant_model": bound_drafter(model, spec)[0], "num_assistant_tokens": draft_tokens,
            "assistant_confidence_threshold": defaults.DRAFT_CONFIDENCE}
