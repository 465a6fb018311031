"""Sizes of each part, read from safetensors headers without loading any weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from lambdasplit.split.load import OpenedSource
from lambdasplit.split.parts import part_keys


@dataclass
class PartSize:
    parameters: int
    bytes: int


def part_sizes(opened: OpenedSource, dtype: torch.dtype) -> dict[str, PartSize]:
    checkpoint = opened.checkpoint
    tied = bool(getattr(opened.config, "tie_word_embeddings", False))
    available = set(checkpoint.keys)
    counts: dict[str, int] = {}
    for file in checkpoint.files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                numel = 1
                for dim in handle.get_slice(key).get_shape():
                    numel *= dim
                counts[key] = numel
    sizes = {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    for role in ("head", "body", "tail"):
        keys = [k for k in part_keys(checkpoint.keys, opened.spec, role, tied) if k in available]
        params = sum(counts[k] for k in keys)
        sizes[role] = PartSize(params, params * itemsize)
    return sizes
