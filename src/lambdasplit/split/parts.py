"""Build the head, body and tail as the architecture's own transformers modules, with fewer layers.

A part is the family's model class (e.g. `LlamaModel`) built from a config that describes only its
layers, with the weights it does not own removed: the head has no final norm, the body has no
embeddings and no norm, the tail has no embeddings. Running a part therefore uses transformers' own
forward, mask and cache code, which keeps splits exact and survives library upgrades.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, PretrainedConfig

from lambdasplit.split.adapters import Adapter, adapter_for
from lambdasplit.split.checkpoint import Checkpoint
from lambdasplit.split.quantize import COMPANIONS, finish_quantized, prepare_quantized, split_companion
from lambdasplit.split.spec import SplitSpec

# accelerate's init_empty_weights patches nn.Module globally: while a part is built, a parameter
# assigned in any thread (load_state_dict, a weight tie) lands on the meta device. Whoever assigns
# parameters to a loaded model holds this lock (the builds here, SplitModelForCausalLM's post_init).
BUILD_LOCK = threading.Lock()
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
LM_HEAD_KEY = "lm_head.weight"


def part_keys(checkpoint_keys: list[str], spec: SplitSpec, role: str, tied: bool) -> list[str]:
    """The checkpoint keys that `role` needs; nothing else is read."""
    start, stop = spec.range(role)
    keys = [k for k in checkpoint_keys if (lk := Adapter.layer_key(k)) and start <= lk[0] < stop]
    if role == "head":
        keys.append(EMBED_KEY)
    if role == "tail":
        keys.append(NORM_KEY)
        keys.append(EMBED_KEY if tied or LM_HEAD_KEY not in checkpoint_keys else LM_HEAD_KEY)
    present = set(checkpoint_keys)  # a quantized part's embedding / LM head bring their scales (and zeros)
    return keys + [k + s for k in keys if k in (EMBED_KEY, LM_HEAD_KEY) for s in COMPANIONS if k + s in present]


def renamed(key: str, role: str, start: int) -> str:
    """Checkpoint key -> key inside the part module (layers renumbered from 0); a quantized weight's
    scale and zero follow their weight."""
    key, suffix = split_companion(key)
    return _renamed(key, role, start) + suffix


def _renamed(key: str, role: str, start: int) -> str:
    prefix = "model." if role == "tail" else ""
    layer = Adapter.layer_key(key)
    if layer is not None:
        return f"{prefix}layers.{layer[0] - start}.{layer[1]}"
    if key == EMBED_KEY:
        return LM_HEAD_KEY if role == "tail" else "embed_tokens.weight"
    return key  # model.norm.weight and lm_head.weight keep their names in the tail


def build_part(
    checkpoint: Checkpoint,
    spec: SplitSpec,
    role: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: PretrainedConfig | None = None,
    shared: dict[str, torch.Tensor] | None = None,
    quantize: str | None = None,
) -> nn.Module:
    """The `role` part as an eval-mode module holding only its own weights.

    `shared` lets the device reuse a tensor already loaded for another part (the tied embedding
    matrix serves both the head's lookup and the tail's LM head). `quantize` (int8, int4, gguf-exact) stores the
    part's projections and embeddings quantized (split/quantize.py); weights that arrive quantized
    (an exported quantized part) load as such either way.
    """
    config = config or checkpoint.config
    adapter = adapter_for(config)
    sub = adapter.sub_config(config, *spec.range(role))
    with BUILD_LOCK:  # the whole build runs under init_empty_weights
        return _build(checkpoint, spec, role, dtype, device, config, sub, shared or {}, quantize)


def _build(
    checkpoint: Checkpoint,
    spec: SplitSpec,
    role: str,
    dtype: torch.dtype,
    device: str | torch.device,
    config: PretrainedConfig,
    sub: PretrainedConfig,
    shared: dict[str, torch.Tensor],
    quantize: str | None,
) -> nn.Module:
    start, _ = spec.range(role)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with init_empty_weights():
        module = (AutoModelForCausalLM if role == "tail" else AutoModel).from_config(sub, dtype=dtype)
    base = module.model if role == "tail" else module
    base.embed_tokens = base.embed_tokens if role == "head" else None
    if role == "tail":  # no embeddings to tie lm_head to here: the split model ties it to the head's
        module.all_tied_weights_keys = {}
    if role != "tail":
        base.norm = nn.Identity()
    keys = part_keys(checkpoint.keys, spec, role, tied)
    wanted = [k for k in keys if k not in shared]
    tensors = checkpoint.read([k for k in wanted if not split_companion(k)[1]], dtype=dtype)
    tensors.update(checkpoint.read([k for k in wanted if split_companion(k)[1]]))  # scales stay as stored (bf16)
    tensors.update({k: v for k, v in shared.items() if split_companion(k)[0] in keys})
    state = {renamed(k, role, start): v.to(device) for k, v in tensors.items()}
    state = prepare_quantized(module, state, quantize, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device)
    finish_quantized(module, shared.values())
    skinny_linears(module)
    return module.eval()


SKINNY_ROWS = 4  # positions a projection takes as W @ x^T: a verification frame of the default 3 drafts
SKINNY_LM_HEAD_ROWS = 8


class SkinnyLinear(nn.Linear):
    """A float32 projection on the CPU that computes a few positions (2 to `skinny_rows`) as W @ x^T.

    For so few rows the BLAS picks a poor kernel for x @ W^T. On 2 cores, streaming SmolLM2's 26
    body layers (weights not in cache): one position 36 ms either way, 2-4 positions 43-55 ms
    through `F.linear` and 20-22 ms as W @ x^T (5 and 8 positions: about even); its 49,152 x 576 LM
    head: 2-8 positions 18-26 ms against 3.3-7.7 ms (one: 11 ms). So a speculative verification
    frame cost the tail and a CPU body more than a plain step. One position, the plain decode step,
    keeps `F.linear`, the unsplit model's own op, bit for bit; the few-row product equals it within
    float rounding.
    """

    skinny_rows = SKINNY_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not 1 < rows <= self.skinny_rows or self.weight.device.type != "cpu" or self.weight.dtype != torch.float32:
            return super().forward(x)  # also after the part was moved to a GPU or another dtype
        out = (self.weight @ x.reshape(rows, -1).T).T.contiguous()  # F.linear's layout (kernels want unit strides)
        out = out + self.bias if self.bias is not None else out
        return out.view(*x.shape[:-1], self.out_features)


def skinny_linears(part: nn.Module) -> None:
    """Give a part's plain float32 CPU projections the few-row product of `SkinnyLinear` (in place:
    the weights, and the LM head's tie to the embedding, stay the same tensors)."""
    for name, child in part.named_modules():
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
            child.__class__ = SkinnyLinear
            if name.rpartition(".")[2] == "lm_head":
                child.skinny_rows = SKINNY_LM_HEAD_ROWS


def tree_ancestors(parents: Sequence[int]) -> torch.Tensor:
    """(T, T) bool: row i marks node i and its ancestors (`parents[i] < i`, -1 for a root)."""
    allowed = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            allowed[node] |= allowed[parent]
    return allowed


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(module: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; accept either."""
    cls = type(module)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(module.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


@dataclass
class PartRunner:
    """Runs one part over a growing sequence, keeping its own KV cache and attention-mask history.

    Head, body and tail each hold a runner; fed the same new mask columns, they compute the same
    position ids as `generate()` does, so the split reproduces the unsplit model.
    """

    module: nn.Module
    role: str
    config: PretrainedConfig

    def __post_init__(self) -> None:
        self.layers = self.config.num_hidden_layers
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config) if self.layers else None
        self.mask: torch.Tensor | None = None

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (cache and mask history)."""
        if length >= self.seq_len:
            return
        if length == 0:
            self.reset()
            return
        if self.cache is not None:
            self.cache.crop(length - self.seq_len)  # negative: positions to remove, in every transformers 5.x
        self.mask = self.mask[:, :length]

    @property
    def seq_len(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def batch(self) -> int | None:
        return None if self.mask is None else self.mask.shape[0]

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
        on_features: Callable[[torch.Tensor], None] | None = None, tree: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Extend the sequence by x's T positions; ids for the head, hidden states otherwise.

        Returns hidden states (head, body) or logits (tail) for the new positions. The tail hands
        `on_features` the final norm's output at every new position (a draft head's input).
        `tree` (one row, no padding): position i's parent among the new positions (-1 for the
        first), so each attends to the sequence, its ancestors and itself at position ids one
        past its parent's, as the body verifies a draft tree (wire/protocol.py's TREE); all T
        positions are cached in order and the caller crops to the accepted prefix.
        """
        batch, length = x.shape[0], x.shape[1]
        device = x.device
        new_mask = (
            torch.ones(batch, length, dtype=torch.long, device=device)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.long)
        )
        mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        if tree is None:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -length:]
            attention: torch.Tensor = mask
        else:
            positions, attention = self._tree_inputs(tree, length, attention_mask)
        self.mask = mask
        inputs = {"input_ids": x} if self.role == "head" else {"inputs_embeds": x}
        if self.layers == 0:
            return self._no_layers(x, logits_to_keep, on_features)
        kwargs = {
            **inputs,
            "attention_mask": attention,
            "position_ids": positions,
            cache_kwarg(self.module): self.cache,
            "use_cache": True,
        }
        if self.role == "tail":
            # transformers' hidden_states[-1] is the final norm's output (last_hidden_state)
            out = self.module(**kwargs, logits_to_keep=logits_to_keep, output_hidden_states=on_features is not None)
            if on_features is not None:
                on_features(out.hidden_states[-1])
            return out.logits
        return self.module(**kwargs).last_hidden_state

    def _tree_inputs(self, tree: Sequence[int], length: int, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and the additive 4D mask (1, 1, T, seq + T) of a tree of T new positions."""
        if self.batch not in (None, 1) or attention_mask is not None or len(tree) != length:
            raise ValueError("a tree extends one row without padding by one position per parent")
        past = self.mask if self.mask is not None else torch.ones(1, 0, dtype=torch.long)
        device = past.device
        allowed = tree_ancestors(tree).to(device)
        depth = allowed.sum(-1) - 1  # a node's ancestors in the tree are its depth
        positions = (int(past.sum()) + depth)[None]
        dtype = self.module.dtype if self.layers else torch.float32
        keys = torch.cat([past[0].bool().expand(length, -1), allowed], dim=1)
        additive = torch.zeros(keys.shape, dtype=dtype, device=device).masked_fill_(~keys, torch.finfo(dtype).min)
        return positions, additive[None, None]

    def _no_layers(self, x: torch.Tensor, logits_to_keep: int, on_features: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
        """A part with no decoder layers (K=0, an empty body, M=0): only its non-layer modules run."""
        if self.role == "head":
            return self.module.embed_tokens(x)
        if self.role == "body":
            return x
        hidden = self.module.model.norm(x)
        if on_features is not None:
            on_features(hidden)
        logits = self.module.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / softcap) * softcap if softcap else logits
