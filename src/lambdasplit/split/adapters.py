"""Per-architecture adapters: how to cut a config and where each part's tensors live.

Every supported family stores its decoder as `model.embed_tokens`, `model.layers.N`, `model.norm`
and `lm_head`, and its transformers model class accepts `inputs_embeds`, so a part is simply the
family's own model class built from a config with fewer layers. The adapter says how to shorten
that config (layer counts and per-layer attention types) and how checkpoint keys map to part keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PretrainedConfig

from lambdasplit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    """How one architecture family is cut into parts."""

    family: str
    # Per-layer config lists that must be sliced together with the layers.
    per_layer_fields: tuple[str, ...] = ("layer_types",)

    def sub_config(self, config: PretrainedConfig, start: int, stop: int) -> PretrainedConfig:
        """A copy of `config` describing only decoder layers [start, stop)."""
        data = config.to_dict()
        data.pop("quantization_config", None)
        data["num_hidden_layers"] = stop - start
        for field in self.per_layer_fields:
            values = data.get(field)
            if isinstance(values, list) and len(values) == config.num_hidden_layers:
                data[field] = values[start:stop]
        sub = type(config).from_dict(data)
        sub._attn_implementation = config._attn_implementation
        return sub

    @staticmethod
    def layer_key(key: str) -> tuple[int, str] | None:
        """(layer index, rest) for a decoder-layer key such as 'model.layers.3.mlp.up_proj.weight'."""
        match = _LAYER_KEY.match(key)
        return (int(match.group(1)), match.group(2)) if match else None


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

_REGISTRY: dict[str, Adapter] = {
    "llama": Adapter("Llama 2/3, SmolLM2"),
    "mistral": Adapter("Mistral"),
    "qwen2": Adapter("Qwen2"),
    "qwen3": Adapter("Qwen3"),
    "gemma3_text": Adapter("Gemma 3"),
}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(config: PretrainedConfig) -> Adapter:
    """The adapter for a config, or an error naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        names = ", ".join(f"{t} ({a.family})" for t, a in sorted(_REGISTRY.items()))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: {names}"
        )
    return _REGISTRY[model_type]
