"""Sizes of each part, read from safetensors headers without loading any weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from lambdasplit.split.load import OpenedSource
from lambdasplit.split.manifest import DTYPE_NAMES
from lambdasplit.split.parts import part_keys
from lambdasplit.split.quantize import BLOCK_MIN, ZERO, estimated_kind, split_companion, stored_bytes

_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
_FLOATS = ("F32", "F16", "BF16")  # read in the load's dtype (split/parts.py); others load as stored


@dataclass
class PartSize:
    parameters: int
    bytes: int
    precision: str


def part_sizes(opened: OpenedSource, dtype: torch.dtype, quantize: str | None = None) -> dict[str, PartSize]:
    """Each part's parameters, bytes and precision as a load with `dtype` and `quantize` holds them:
    what an export stores quantized as stored, the device parts' float weights as `quantize` would
    store them (a quantized export's own scheme wins), every other float tensor in `dtype`."""
    checkpoint = opened.checkpoint
    tied = bool(getattr(opened.config, "tie_word_embeddings", False))
    stored: dict[str, tuple[list[int], str]] = {}
    for file in checkpoint.files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                stored[key] = (list(tensor.get_shape()), tensor.get_dtype())
    if opened.exported is not None and opened.exported.quantize is not None:
        quantize = opened.exported.quantize
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {}
    for role in ("head", "body", "tail"):
        scheme = None if role == "body" else quantize
        params = size = 0
        for key in (k for k in part_keys(checkpoint.keys, opened.spec, role, tied) if k in stored):
            shape, stored_dtype = stored[key]
            numel = _numel(shape)
            if not split_companion(key)[1]:
                params += numel * (2 if key + ZERO in stored or key + BLOCK_MIN in stored else 1)  # two 4-bit values a byte
            if split_companion(key)[1] or stored_dtype not in _FLOATS:  # stored quantized: loaded as it is
                size += numel * _ITEMSIZE.get(stored_dtype, 4)
            else:
                size += stored_bytes(tuple(shape), estimated_kind(key, scheme) if scheme and key.endswith(".weight") else None, itemsize)
        sizes[role] = PartSize(params, size, _precision(scheme, dtype))
    return sizes


def _numel(shape: list[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def _precision(scheme: str | None, dtype: torch.dtype) -> str:
    """int8 / int4 (whose embeddings and LM head are int8) / gguf-exact (split/quantize.py), else the dtype."""
    return scheme or DTYPE_NAMES[dtype]
